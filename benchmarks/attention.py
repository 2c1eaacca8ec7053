"""Peak memory and step time of eager vs SDPA attention on the Llama-style bench model, over sequence lengths.

    python benchmarks/attention.py                  # seq 256, 512, 1024, 2048; hidden 512, 6 layers, batch 4, fp32
    python benchmarks/attention.py --seqs 256 512   # fewer lengths

The eager row is the model built with attn_implementation="eager"; the sdpa row is the same model after
`memopt.apply(model)` (attention="sdpa" is the default). One forward+backward per measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import memopt  # noqa: E402
from _common import batch, bench_args, fresh, llama, machine, run_rows  # noqa: E402
from memopt._units import format_bytes  # noqa: E402


def main(argv=None) -> dict:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.set_defaults(steps=2)
    args = parser.parse_args(argv)
    results = {}
    for seq in args.seqs:
        run = argparse.Namespace(**{**vars(args), "seq": seq})
        base = llama(run, attn_implementation="eager")
        variants = {"eager": fresh(base), "sdpa": fresh(base, lambda m: memopt.apply(m))}
        rows = run_rows(variants, batch(run), run)
        results[seq] = {r.name: r for r in rows}
    print(f"\nAttention: Llama-style h={args.hidden} L={args.layers} heads={args.heads} vocab={args.vocab} "
          f"batch={args.batch} fp32, forward+backward")
    print(f"machine: {machine(args.device)}")
    print("| seq | eager peak | sdpa peak | sdpa/eager | eager step | sdpa step | sdpa/eager | loss eager | loss sdpa |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq, r in results.items():
        e, s = r["eager"], r["sdpa"]
        print(f"| {seq} | {format_bytes(e.peak_bytes)} | {format_bytes(s.peak_bytes)} | {s.peak_bytes / e.peak_bytes:.2f}x"
              f" | {e.step_s * 1000:.0f} ms | {s.step_s * 1000:.0f} ms | {s.step_s / e.step_s:.2f}x"
              f" | {e.loss:.4f} | {s.loss:.4f} |")
    return results


if __name__ == "__main__":
    main()
