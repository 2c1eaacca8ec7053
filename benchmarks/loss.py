"""Peak memory and step time of the chunked loss on the Llama-style bench model, with and without checkpointing.

    python benchmarks/loss.py                   # vocab 8000 and 32000; hidden 512, 6 layers, batch 4, seq 512, fp32
    python benchmarks/loss.py --vocabs 32000    # one vocabulary

Rows, per vocabulary: the plain step; transformers' own gradient_checkpointing_enable (non-reentrant); memopt
checkpoint=True (full); memopt loss="chunked"; both. All in one process, timed round-robin. Target at vocab 32000:
full checkpointing + chunked loss <= 0.40x the plain step's peak at <= 1.12x its time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import memopt  # noqa: E402
from _common import batch, bench_args, fresh, hf_gradient_checkpointing, llama, print_table, run_rows  # noqa: E402


def main(argv=None) -> dict:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8000, 32000])
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: memopt's choice)")
    args = parser.parse_args(argv)
    loss = memopt.LossConfig(chunk_size=args.chunk_size)
    results = {}
    for vocab in args.vocabs:
        run = argparse.Namespace(**{**vars(args), "vocab": vocab})
        base = llama(run)
        variants = {
            "plain": fresh(base),
            "transformers gradient_checkpointing_enable": fresh(base, hf_gradient_checkpointing),
            "memopt checkpoint=True (full)": fresh(base, lambda m: memopt.apply(m, checkpoint=True)),
            "memopt loss='chunked'": fresh(base, lambda m: memopt.apply(m, loss=loss)),
            "memopt checkpoint=True + loss='chunked'": fresh(base, lambda m: memopt.apply(m, checkpoint=True, loss=loss)),
        }
        rows = run_rows(variants, batch(run), run)
        print_table(
            rows, "plain",
            f"Chunked loss: Llama-style h={args.hidden} L={args.layers} heads={args.heads} vocab={vocab} "
            f"batch={args.batch} seq={args.seq} fp32, forward+backward",
            run,
        )
        results[vocab] = {r.name: r for r in rows}
    return results


if __name__ == "__main__":
    main()
