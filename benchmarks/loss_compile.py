"""loss='chunked' under torch.compile (inductor): step time and the largest vocabulary-wide buffer of the graphs
inductor compiles, for nanoGPT as its users write it (ignore_index=-1 padding, its own F.cross_entropy).

Rows: plain nanoGPT and memopt loss='chunked' (+ checkpoint=True), each eager and torch.compile'd. Step time is the
mean of `--steps` steps after `--warmup` (CPU clock by default: this machine is shared); "logits-sized" is the
largest tensor of shape (tokens, vocab) or (batch, seq, vocab) in the post-grad forward and backward graphs that
inductor lowers (compiled rows), or the largest one an op allocates (eager rows, a dispatch mode): the plain step has
the logits, their softmax and gradient; the chunked one has none, its largest vocabulary-wide buffer is a chunk.

    python benchmarks/loss_compile.py [--vocab 8192 --batch 4 --seq 256 --chunk-size 128] [--clock wall]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import memopt  # noqa: E402
from models import NanoGPT  # noqa: E402


class _Largest:
    """The largest (tokens, vocab)-shaped tensor seen, in bytes."""

    def __init__(self, tokens: int, vocab: int) -> None:
        self.tokens, self.vocab, self.bytes, self.chunk = tokens, vocab, 0, 0

    def see(self, t: torch.Tensor) -> None:
        if not (t.dim() and t.shape[-1] == self.vocab and all(isinstance(d, int) for d in t.shape)):
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
            for t in pytree.tree_leaves(node.meta.get("val")):
                if isinstance(t, torch.Tensor):
                    self.largest.see(t)

    def uuid(self) -> bytes:
        return str(id(self)).encode()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    base = NanoGPT(d=args.d, vocab_size=args.vocab, block_size=args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, -args.seq // 8 :] = -1  # nanoGPT's padding
    idx, tokens = ids[:, :-1], args.batch * args.seq

    rows, losses = [], {}
    loss_cfg = memopt.LossConfig(chunk_size=args.chunk_size)
    for name, options in (("plain", {}), ("loss='chunked'", dict(loss=loss_cfg)),
                          ("checkpoint=True + loss='chunked'", dict(checkpoint=True, loss=loss_cfg))):
        for compiled in (False, True):
            model = copy.deepcopy(base)
            memopt.apply(model, **options)  # attention='sdpa' for every row: only the loss (and checkpoint) differ
            model.train()
            largest = _Largest(tokens, args.vocab)
            torch._dynamo.reset()
            run = model
            if compiled:
                torch._inductor.config.post_grad_custom_post_pass = _GraphPass(largest)
                run = torch.compile(model)
            started = time.perf_counter()
            for p in model.parameters():
                p.grad = None
            if compiled:
                loss = run(idx, targets)[1]
                loss.backward()
            else:
                with _Allocations(largest):
                    loss = run(idx, targets)[1]
                    loss.backward()
            first = time.perf_counter() - started
            torch._inductor.config.post_grad_custom_post_pass = None
            losses[(name, compiled)] = loss.item()
            for _ in range(args.warmup - 1):
                run(idx, targets)[1].backward()
            start = clock()
            for _ in range(args.steps):
                for p in model.parameters():
                    p.grad = None
                run(idx, targets)[1].backward()
            step = (clock() - start) / args.steps
            rows.append((name, "inductor" if compiled else "eager", first, step, largest.bytes, largest.chunk))

    print(f"nanoGPT d={args.d} vocab={args.vocab} batch={args.batch} seq={args.seq} chunk_size={args.chunk_size}; "
          f"logits {tokens * args.vocab * 4 / 2**20:.1f} MiB float32; step time: {args.clock} clock, mean of "
          f"{args.steps} steps; torch {torch.__version__}")
    print(f"| model | run | first step (s, incl. compile) | step ms | vs eager | logits-sized MiB | chunk MiB |")
    print("|---|---|---|---|---|---|---|")
    eager = {name: step for name, run, _, step, _, _ in rows if run == "eager"}
    for name, run, first, step, logits, chunk in rows:
        print(f"| {name} | {run} | {first:.1f} | {step * 1e3:.1f} | {step / eager[name]:.2f}x | "
              f"{logits / 2**20:.2f} | {chunk / 2**20:.2f} |")
    spread = max(losses.values()) - min(losses.values())
    print(f"losses: {', '.join(f'{v:.6f}' for v in losses.values())} (spread {spread:.2e})")


if __name__ == "__main__":
    main()
