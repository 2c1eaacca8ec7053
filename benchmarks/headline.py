"""The headline comparison: one fine-tuning job done four ways, in one process, on the same model and data.

    python benchmarks/headline.py [--steps 10] [--budget 300MiB] [--png docs/headline.png]

Rows (Llama-style bench model, hidden 512, 6 layers, vocab 8000, batch 4, seq 512, fp32 on CPU):
  1. plain: full fine-tune, AdamW;
  2. the transformers + peft + bitsandbytes way: `BitsAndBytesConfig` 4-bit NF4 + double quant,
     `prepare_model_for_kbit_training` (gradient checkpointing on), `get_peft_model` LoRA r16 on all linear layers;
  3. one `memopt.apply(model, checkpoint=True, quant="4bit", lora=16)` call;
  4. whatever `memopt.plan` picks for `--budget` (default: half of row 1's measured peak).
Per row: the step's peak (`memopt.track`: CPU storage accounting; CUDA: max_memory_allocated), the median step time
(all rows' steps interleaved, so the machine's noise falls on every row alike), and the loss curve over the same
batches. Also draws one PNG.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import bench_args, llama, machine  # noqa: E402
from memopt._units import format_bytes  # noqa: E402
from quant import _hf_qlora  # noqa: E402


def _batches(args, n: int = 2) -> list[dict]:
    """`n` fixed batches, cycled: the loss falls as the model fits them, the same for every row."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def main(argv=None) -> dict:
    parser = bench_args(__doc__.splitlines()[0])
    parser.set_defaults(steps=10)
    parser.add_argument("--budget", default=None, help="memory budget for the memopt.plan row (default: half of "
                                                        "the plain row's peak)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--png", default=None, help="write the comparison figure here")
    args = parser.parse_args(argv)
    base = llama(args)
    batches = _batches(args)
    tmp = tempfile.mkdtemp()

    def seeded(build):
        def wrapped():
            torch.manual_seed(0)  # LoRA's A matrices drawn alike in rows 2-4
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return build().to(args.device).train()
        return wrapped

    rows: dict[str, dict] = {
        "plain full fine-tune": {"build": seeded(lambda: copy.deepcopy(base)), "optimizer": "adamw"},
        "transformers + peft + bitsandbytes QLoRA r16 (+GC)": {"build": seeded(_hf_qlora(base, tmp)),
                                                               "optimizer": "adamw"},
        "memopt.apply(checkpoint=True, quant='4bit', lora=16)": {
            "build": seeded(lambda: memopt.apply(copy.deepcopy(base), checkpoint=True, quant="4bit", lora=16)),
            "optimizer": "adamw"},
    }
    for row in rows.values():
        row["model"] = row["build"]()
        row["opt"] = memopt.optimizer(row["model"], row["optimizer"], lr=args.lr)
    plain = rows["plain full fine-tune"]
    plain["peak"] = _peak(plain, batches[0], args.device)

    budget = args.budget or plain["peak"] // 2
    config = copy.deepcopy(base.config)
    plan = memopt.plan(config, budget, batch_size=args.batch, seq_len=args.seq,
                       device="cuda" if args.device.startswith("cuda") else "cpu", dtype=torch.float32)
    print(plan, file=sys.stderr)
    opts = ", ".join(f"{k}={v!r}" for k, v in plan.options.items())
    name = f"memopt.plan({format_bytes(memopt.estimation.parse_bytes(budget))}): {plan.name}"
    rows[name] = {"build": seeded(lambda: memopt.apply(copy.deepcopy(base), **plan.options)), "optimizer": plan.optimizer,
                  "plan": f"apply({opts}), optimizer {plan.optimizer!r}", "predicted": plan.estimate.peak_bytes}
    rows[name]["model"] = rows[name]["build"]()
    rows[name]["opt"] = memopt.optimizer(rows[name]["model"], plan.optimizer, lr=args.lr)
    for row in rows.values():
        row.setdefault("peak", None)
        row["peak"] = row["peak"] or _peak(row, batches[0], args.device)
        row["losses"], row["times"] = [], []

    for step in range(args.steps):  # interleaved: every row sees the same batch at the same time
        for row in rows.values():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            row["losses"].append(_step(row, batches[step % len(batches)]))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            row["times"].append(time.perf_counter() - t0)

    print(f"\nHeadline: Llama-style h={args.hidden} L={args.layers} vocab={args.vocab} batch={args.batch} "
          f"seq={args.seq}, fp32, AdamW lr {args.lr}, {args.steps} steps over {len(batches)} fixed batches")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}")
    ref = rows["transformers + peft + bitsandbytes QLoRA r16 (+GC)"]
    print("| way | step peak | vs plain | vs transformers+peft | step time | vs transformers+peft | first loss | "
          "last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        t = statistics.median(row["times"])
        print(f"| {name} | {format_bytes(row['peak'])} | {row['peak'] / plain['peak']:.2f}x | "
              f"{row['peak'] / ref['peak']:.2f}x | {t * 1e3:.0f} ms | {t / statistics.median(ref['times']):.2f}x | "
              f"{row['losses'][0]:.4f} | {row['losses'][-1]:.4f} |")
    print(f"plan: {rows[name].get('plan')}; predicted peak {format_bytes(rows[name]['predicted'])}, measured "
          f"{format_bytes(rows[name]['peak'])}")
    if args.png:
        _plot(rows, args.png)
    return {n: {k: v for k, v in r.items() if k in ("peak", "losses", "times")} for n, r in rows.items()}


def _step(row: dict, batch: dict) -> float:
    opt = row["opt"]
    loss = row["model"](**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _peak(row: dict, batch: dict, device: str) -> int:
    """Peak of one steady-state step (the optimizer state exists after a first, untracked one)."""
    _step(row, batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(row, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with memopt.track(row["model"], row["opt"]) as tracker:
        _step(row, batch)
    return tracker.report().peak_bytes


def _plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    short = ["plain", "transformers+peft\nQLoRA (+GC)", "memopt.apply\n4bit+LoRA+ckpt", "memopt.plan"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    colours = ["#8c8c8c", "#dd8452", "#4c72b0", "#55a868"]
    a.bar(short, [rows[n]["peak"] / 2**20 for n in names], color=colours)
    a.set_ylabel("step peak (MiB)")
    b.bar(short, [statistics.median(rows[n]["times"]) * 1e3 for n in names], color=colours)
    b.set_ylabel("median step time (ms)")
    for n, s, col, style in zip(names, short, colours, ["-", "-", "--", "--"]):  # memopt's rows dashed: they overlap
        c.plot(range(1, len(rows[n]["losses"]) + 1), rows[n]["losses"], style, label=s.replace("\n", " "), color=col)
    c.set_xlabel("step")
    c.set_ylabel("loss")
    c.legend(fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
