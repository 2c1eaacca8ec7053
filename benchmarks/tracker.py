"""What memopt.track costs, and whether its peak agrees with PyTorch's MemTracker, on the Llama-style bench model.

    python benchmarks/tracker.py        # hidden 512, 6 layers, 8 heads, vocab 8000, batch 4, seq 512, fp32, AdamW

One training step (forward, backward, AdamW step, zero_grad) is timed untracked, under `memopt.track` and under
PyTorch's `MemTracker`, round-robin in one process, for the plain model and with `checkpoint=True`. Targets: a
tracked step <= 1.10x an untracked one; peaks within 5% of MemTracker's.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import batch, bench_args, fresh, llama, machine  # noqa: E402
from memopt._units import format_bytes  # noqa: E402


def _step(model, opt, inputs) -> None:
    model(**inputs).loss.backward()
    opt.step()
    opt.zero_grad()


def _untracked(model, opt, inputs) -> None:
    _step(model, opt, inputs)


def _memopt(model, opt, inputs) -> int:
    with memopt.track(model, opt) as tracker:
        _step(model, opt, inputs)
    return tracker.report().peak_bytes


def _memtracker(model, opt, inputs) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        _step(model, opt, inputs)
    return mt.get_tracker_snapshot("peak")[torch.device(str(next(model.parameters()).device))]["Total"]


WAYS = {"untracked": _untracked, "memopt.track": _memopt, "PyTorch MemTracker": _memtracker}


def main(argv=None) -> list[dict]:
    args = bench_args(__doc__.splitlines()[0]).parse_args(argv)
    base = llama(args)
    inputs = batch(args)
    results = []
    for label, fn in {"plain": None, "checkpoint=True": lambda m: memopt.apply(m, checkpoint=True)}.items():
        model = fresh(base, fn)().to(args.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _step(model, opt, inputs)  # optimizer state exists: a steady-state step
        peaks = {name: way(model, opt, inputs) for name, way in WAYS.items() if name != "untracked"}
        times: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(args.steps):
            for name, way in WAYS.items():
                t0 = time.perf_counter()
                way(model, opt, inputs)
                times[name].append(time.perf_counter() - t0)
        t = {name: statistics.median(v) for name, v in times.items()}
        results.append({"model": label, "peaks": peaks, "times": t})
    print(f"\nTracker overhead and agreement: Llama-style h={args.hidden} L={args.layers} vocab={args.vocab} "
          f"batch={args.batch} seq={args.seq} fp32, AdamW step")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}")
    print("| model | memopt.track peak | MemTracker peak | agreement | untracked step | memopt.track step | overhead "
          "| MemTracker step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        p, t = r["peaks"], r["times"]
        print(f"| {r['model']} | {format_bytes(p['memopt.track'])} | {format_bytes(p['PyTorch MemTracker'])} | "
              f"{p['memopt.track'] / p['PyTorch MemTracker']:.4f} | {t['untracked'] * 1e3:.0f} ms | "
              f"{t['memopt.track'] * 1e3:.0f} ms | {t['memopt.track'] / t['untracked']:.2f}x | "
              f"{t['PyTorch MemTracker'] * 1e3:.0f} ms |")
    return results


if __name__ == "__main__":
    main()
