"""Peak memory and step time of activation checkpointing on the Llama-style bench model.

    python benchmarks/checkpoint.py            # hidden 512, 6 layers, 8 heads, vocab 8000, batch 4, seq 512, fp32

Rows: no checkpointing; transformers' own gradient_checkpointing_enable (non-reentrant); memopt full, selective,
every-2. All in one process, timed round-robin. Targets: full <= 1.02x transformers' peak and <= 1.05x its time;
selective >= 15% below the baseline peak at <= 1.10x its time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import memopt  # noqa: E402
from _common import batch, bench_args, fresh, hf_gradient_checkpointing, llama, print_table, run_rows  # noqa: E402


def main(argv=None) -> list:
    args = bench_args(__doc__.splitlines()[0]).parse_args(argv)
    base = llama(args)
    variants = {
        "no checkpointing": fresh(base),
        "transformers gradient_checkpointing_enable": fresh(base, hf_gradient_checkpointing),
        "memopt checkpoint=True (full)": fresh(base, lambda m: memopt.apply(m, checkpoint=True)),
        "memopt checkpoint='selective'": fresh(base, lambda m: memopt.apply(m, checkpoint="selective")),
        "memopt checkpoint=2 (every 2nd)": fresh(base, lambda m: memopt.apply(m, checkpoint=2)),
    }
    rows = run_rows(variants, batch(args), args)
    print_table(
        rows, "no checkpointing",
        f"Checkpointing: Llama-style h={args.hidden} L={args.layers} heads={args.heads} vocab={args.vocab} "
        f"batch={args.batch} seq={args.seq} fp32, forward+backward",
        args,
    )
    return rows


if __name__ == "__main__":
    main()
