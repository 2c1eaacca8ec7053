"""loss='chunked' under torch.compile (inductor): step time and the largest vocabulary-wide buffer of the graphs
inductor compiles, for nanoGPT as its users write it (ignore_index=-1 padding, its own F.cross_entropy).

Rows: plain nanoGPT and memopt loss='chunked' (+ checkpoint=True), each eager and torch.compile'd. Step time is the
median of `--steps` round-robin steps after `--warmup` (CPU clock by default: this machine is shared); "logits-sized" is the
largest tensor of shape (tokens, vocab) or (batch, seq, vocab) in the post-grad forward and backward graphs that
inductor lowers (compiled rows), or the largest one an op allocates (eager rows, a dispatch mode): the plain step has
the logits, their softmax and gradient; the chunked one has none, its largest vocabulary-wide buffer is a chunk.

    python benchmarks/loss_compile.py [--vocab 8192 --batch 4 --seq 256 --chunk-size 128] [--clock wall] [--threads 1]
    python benchmarks/loss_compile.py --backend aot   # AOTAutograd's graphs without Inductor's code generation
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memopt  # noqa: E402
from _common import _Threads, machine  # noqa: E402
from models import NanoGPT  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


class _Largest:
    """The largest (tokens, vocab)-shaped tensor seen, in bytes."""

    def __init__(self, tokens: int, vocab: int) -> None:
        self.tokens, self.vocab, self.bytes, self.chunk = tokens, vocab, 0, 0

    def see(self, t: torch.Tensor) -> None:
        # sizes first: comparing a symbolic size (the partitioner's RNG state) adds a guard while compiling
        # floating point only: Inductor's (1, vocab) int64 index row of the loss's backward is no logits chunk
        if not (t.dim() and t.is_floating_point() and all(isinstance(d, int) for d in t.shape)
                and t.shape[-1] == self.vocab):
            return
        n = t.untyped_storage().nbytes()
        if math.prod(t.shape[:-1]) == self.tokens:
            self.bytes = max(self.bytes, n)
        elif math.prod(t.shape[:-1]) < self.tokens:
            self.chunk = max(self.chunk, n)


class _GraphPass(CustomGraphPass):
    """Inductor's post-grad hook: sees the forward and backward graphs it lowers."""

    def __init__(self, largest: _Largest) -> None:
        self.largest = largest

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if _is_view(node):  # a view allocates nothing (the head's weight transposed is (d, vocab), not a chunk)
                continue
            for t in pytree.tree_leaves(node.meta.get("val")):
                if isinstance(t, torch.Tensor):
                    self.largest.see(t)

    def uuid(self) -> bytes:
        return str(id(self)).encode()


def _is_view(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


class _Allocations(TorchDispatchMode):
    def __init__(self, largest: _Largest) -> None:
        super().__init__()
        self.largest = largest

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest.see(t)
        return out


def _aot_backend(largest: _Largest):
    """AOTAutograd with Inductor's partitioner, its graphs run without code generation (seconds, not minutes): the
    forward and backward graphs it hands on are the ones the custom pass sees, before Inductor's own fusions."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def inspect(gm: torch.fx.GraphModule, example_inputs):
        _GraphPass(largest)(gm.graph)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=inspect, bw_compiler=inspect, partition_fn=min_cut_rematerialization_partition)


def _step(run, idx, targets, model) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    loss = run(idx, targets)[1]
    loss.backward()
    return loss


def main(argv=None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (round-robin; the median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row, the compiling one included")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--backend", choices=("inductor", "aot"), default="inductor",
                        help="inductor, or 'aot': AOTAutograd with Inductor's partitioner, no code generation "
                             "(the graphs' buffers without Inductor's fusions; fast, for tests)")
    parser.add_argument("--threads", type=int, action=_Threads, metavar="N", help="torch.set_num_threads(N)")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    base = NanoGPT(d=args.d, n_layer=args.layers, vocab_size=args.vocab, block_size=args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, -args.seq // 8 :] = -1  # nanoGPT's padding
    idx, tokens = ids[:, :-1], args.batch * args.seq

    # Once, before any row compiles: a reset drops the compiled code of the rows before it, which would then
    # compile again inside the timed steps.
    torch._dynamo.reset()
    counters.clear()
    rows, losses = [], {}
    loss_cfg = memopt.LossConfig(chunk_size=args.chunk_size)
    for name, options in (("plain", {}), ("loss='chunked'", dict(loss=loss_cfg)),
                          ("checkpoint=True + loss='chunked'", dict(checkpoint=True, loss=loss_cfg))):
        for compiled in (False, True):
            model = copy.deepcopy(base)
            memopt.apply(model, **options)  # attention='sdpa' for every row: only the loss (and checkpoint) differ
            model.train()
            largest = _Largest(tokens, args.vocab)
            run = model
            if compiled and args.backend == "inductor":
                torch._inductor.config.post_grad_custom_post_pass = _GraphPass(largest)
                run = torch.compile(model, dynamic=False)
            elif compiled:
                run = torch.compile(model, backend=_aot_backend(largest), dynamic=False)
            started = time.perf_counter()
            if compiled:  # the forward and backward graphs compile in this step
                loss = _step(run, idx, targets, model)
            else:
                with _Allocations(largest):
                    loss = _step(run, idx, targets, model)
            first = time.perf_counter() - started
            torch._inductor.config.post_grad_custom_post_pass = None
            losses[(name, compiled)] = loss.item()
            for _ in range(args.warmup - 1):
                _step(run, idx, targets, model)
            rows.append({"name": name, "run": (args.backend if compiled else "eager"), "first": first,
                         "logits": largest.bytes, "chunk": largest.chunk, "times": [], "call": (run, model)})
    frames = counters["frames"]["ok"]
    for _ in range(args.steps):
        for row in rows:
            run, model = row["call"]
            start = clock()
            _step(run, idx, targets, model)
            row["times"].append(clock() - start)
    recompiled = counters["frames"]["ok"] - frames

    print(f"nanoGPT d={args.d} layers={args.layers} vocab={args.vocab} batch={args.batch} seq={args.seq} "
          f"chunk_size={args.chunk_size}; "
          f"logits {tokens * args.vocab * 4 / 2**20:.1f} MiB float32; step time: {args.clock} clock, median of "
          f"{args.steps} round-robin steps after {args.warmup}")
    print(f"machine: {machine('cpu')}; torch {torch.__version__}")
    print("| model | run | first step (s, incl. compile) | step ms | vs eager | logits-sized MiB | chunk MiB |")
    print("|---|---|---|---|---|---|---|")
    eager = {r["name"]: statistics.median(r["times"]) for r in rows if r["run"] == "eager"}
    out = []
    for r in rows:
        step = statistics.median(r["times"])
        out.append((r["name"], r["run"], r["first"], step, r["logits"], r["chunk"]))
        print(f"| {r['name']} | {r['run']} | {r['first']:.1f} | {step * 1e3:.1f} | {step / eager[r['name']]:.2f}x | "
              f"{r['logits'] / 2**20:.2f} | {r['chunk'] / 2**20:.2f} |")
    spread = max(losses.values()) - min(losses.values())
    print(f"losses: {', '.join(f'{v:.6f}' for v in losses.values())} (spread {spread:.2e})")
    print(f"WARNING: {recompiled} frame(s) compiled during the timed steps" if recompiled
          else "no graph compiled during the timed steps")
    return out


if __name__ == "__main__":
    main()
