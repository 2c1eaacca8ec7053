"""Peak memory and step time under torch.compile on the Llama-style bench model, eager and compiled side by side.

    python benchmarks/compile.py --clock cpu          # hidden 512, 6 layers, vocab 8000, batch 4, seq 512, fp32, Inductor
    python benchmarks/compile.py --backend aot_eager   # the same graphs without code generation (minutes faster)

Rows: the plain model (eager attention in eager; what torch.compile makes of it compiled), memopt
checkpoint=True, memopt checkpoint=True + loss="chunked", each eager and compiled. Peak: the profiler's allocation
events over one forward+backward (memopt.tracker.profiled_peak: the tracker's dispatch mode would make the compiled
step run eagerly), torch.cuda.max_memory_allocated on CUDA; time: median over round-robin steps after two
warm-up steps (compile time excluded; the script says whether anything compiled while steps were timed). Targets
(issue 12): compiled memopt faster than eager memopt and within 1.25x of compiled plain's step time with
checkpointing (the recompute's cost), while keeping eager memopt's peak within 5%.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import batch, bench_args, llama, machine  # noqa: E402
from memopt._units import format_bytes  # noqa: E402
from memopt.tracker import profiled_peak  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

WARMUP = 2  # untimed steps per row before its peak and its timed steps


def _step(model, inputs) -> float:
    for p in model.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    return loss.item()


def _peak(model, inputs, device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(model, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return profiled_peak(lambda: _step(model, inputs))


def main(argv=None) -> list[dict]:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    args = parser.parse_args(argv)
    base = llama(args, attn_implementation="eager")
    inputs = batch(args)
    variants = {
        "plain": lambda m: m,
        "memopt checkpoint=True": lambda m: memopt.apply(m, checkpoint=True),
        "memopt checkpoint=True, loss='chunked'": lambda m: memopt.apply(m, checkpoint=True, loss="chunked"),
    }
    # Once, before any model is compiled: torch._dynamo.reset() drops the compiled code of every model compiled
    # before it, which then compiles again inside the timed steps (the compile time counted as a step).
    torch._dynamo.reset()
    counters.clear()
    models, rows = {}, []
    for name, fn in variants.items():
        for compiled in (False, True):
            model = fn(copy.deepcopy(base)).to(args.device).train()
            label = f"{name}, {'compiled' if compiled else 'eager'}"
            graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
            started = time.perf_counter()
            if compiled:
                model = torch.compile(model, backend=args.backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = _step(model, inputs)  # compile (forward and backward graphs)
            first = time.perf_counter() - started
            for _ in range(WARMUP - 1):  # memopt's kernel probe runs in the first two eager forwards
                _step(model, inputs)
            models[label] = model
            rows.append({"name": label, "peak": _peak(model, inputs, args.device), "loss": loss, "first_s": first,
                         "graphs": counters["stats"]["unique_graphs"] - graphs,
                         "frames": counters["frames"]["ok"] - frames,
                         "times": []})
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    for _ in range(args.steps):
        for row in rows:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            _step(models[row["name"]], inputs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            row["times"].append(clock() - t0)
    # nothing may compile while steps are timed: a recompile would be counted as a step
    recompiled = counters["stats"]["unique_graphs"] - graphs, counters["frames"]["ok"] - frames
    for row in rows:
        row["step_s"] = statistics.median(row["times"])
    _print(rows, args, recompiled)
    return rows


def _print(rows: list[dict], args, recompiled: tuple[int, int]) -> None:
    by = {r["name"]: r for r in rows}
    plain_c = by["plain, compiled"]
    print(f"\ntorch.compile ({args.backend}): Llama-style h={args.hidden} L={args.layers} heads={args.heads} "
          f"vocab={args.vocab} batch={args.batch} seq={args.seq} fp32, forward+backward")
    clock = " (step time: CPU time of the process, all threads)" if args.clock == "cpu" else ""
    print(f"machine: {machine(args.device)}; torch {torch.__version__}{clock}")
    print(f"step time: median of {args.steps} round-robin steps after {WARMUP} untimed ones and the peak's step")
    print("| variant | Dynamo graphs | peak memory | vs compiled plain | step time | vs compiled plain | vs its eager | "
          "first step (compile) | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        eager = by[r["name"].replace("compiled", "eager")]
        graphs = r["graphs"] if r["name"].endswith("compiled") else "-"
        print(f"| {r['name']} | {graphs} | {format_bytes(r['peak'])} | {r['peak'] / plain_c['peak']:.2f}x | "
              f"{r['step_s'] * 1000:.0f} ms | {r['step_s'] / plain_c['step_s']:.2f}x | "
              f"{r['step_s'] / eager['step_s']:.2f}x | {r['first_s']:.1f} s | {r['loss']:.4f} |")
    if any(recompiled):
        print(f"WARNING: {recompiled[0]} graph(s) compiled during the timed steps ({recompiled[1]} frames): those "
              "steps include compile time")
    else:
        print("no graph compiled during the timed steps")
    for name in ("memopt checkpoint=True", "memopt checkpoint=True, loss='chunked'"):
        c, e = by[f"{name}, compiled"], by[f"{name}, eager"]
        print(f"{name}: compiled/eager time {c['step_s'] / e['step_s']:.2f}x (target < 1), compiled/compiled-plain "
              f"time {c['step_s'] / plain_c['step_s']:.2f}x (target <= 1.25), compiled/eager peak "
              f"{c['peak'] / e['peak']:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
