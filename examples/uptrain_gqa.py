"""Convert a multi-head Llama to grouped-query and multi-query attention with memopt, and uptrain it (GQA paper).

    python examples/uptrain_gqa.py --threads 1            # the study: 42 min on this project's shared 2-core machine
    python examples/uptrain_gqa.py --mha runs/uptrain_gqa/mha   # reuse the MHA model a previous run trained

The MHA model is the main job's tiny Llama (examples/finetune_causal_lm.py: hidden 128, 4 layers, vocab 4096, the
same 1.90M parameters) with its hidden size split into 8 heads of 16, so that H/2, H/4 and 1 key/value heads are
three different models. It is trained on the standard-library corpus (2000 steps of 8 x 128 tokens by default,
warm-up and cosine decay: 0.7 epochs, until its validation loss falls by about 1% per 10% of the steps; or loaded
with --mha) and saved to --out/mha with `save_pretrained`. Then, for K in {H/2, H/4, 1} and each pooling (mean: the
paper's; first: its ablation), a copy is converted and set up for uptraining in one call,

    memopt.apply(model, kv_heads=memopt.KVHeadsConfig(K, pooling), checkpoint=True, loss="chunked")

and uptrained for --uptrain-fraction (5%) of the MHA's steps. The MHA model itself is trained for the same extra
steps as a control: how much of the uptrained models' gain is just more training. It prints one table (validation
loss of the MHA model, of each converted model right after conversion and after uptraining; the KV cache of
generation at --gen-context tokens, measured from the cache tensors; decode tokens/s) and checks the issue's targets:
mean pooling beats first-head pooling right after conversion (and after uptraining, which is what the paper's
ablation compares), GQA at H/4 after uptraining is within 2% of the MHA validation loss, the KV cache is exactly
K/H of the MHA's. It writes results.json and uptrain.png (validation loss against uptraining steps, one line per K
and pooling) to --out. --threads 1 is much faster than torch's default two threads on a machine shared with other
jobs (0.5 s instead of 4 s per MHA step here).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import transformers

import memopt
from _data import eval_batches, load_corpus, random_batch
from finetune_causal_lm import PRESETS, cosine_schedule, evaluate, train_step
from memopt._units import format_bytes


def mha_config(vocab_size: int, heads: int) -> transformers.LlamaConfig:
    shape = {**PRESETS["tiny"], "num_attention_heads": heads, "num_key_value_heads": heads}
    return transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, **shape)


def train(model: nn.Module, corpus_ids: torch.Tensor, steps: int, lr: float, args: argparse.Namespace, seed: int,
          val: list[torch.Tensor] | None = None, every: int = 0, label: str = "") -> list[tuple[int, float]]:
    """`steps` AdamW steps (warm-up then cosine decay to 10% of `lr`, gradient clipping at 1) on random windows;
    the validation loss every `every` steps (and at 0 and at the end) when `val` is given."""
    optimizer = memopt.optimizer(model, "adamw", lr=lr)
    scheduler = cosine_schedule(optimizer, steps)
    g = torch.Generator().manual_seed(seed)
    curve = [] if val is None else [(0, evaluate(model, val, args.device))]
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        ids = random_batch(corpus_ids, args.batch_size, args.seq_len, g).to(args.device)
        losses.append(train_step(model, optimizer, ids, scheduler, clip=1.0).item())
        if val is not None and (step % every == 0 or step == steps):
            curve.append((step, evaluate(model, val, args.device)))
        if args.progress and (step % max(1, steps // 10) == 0 or step == steps):
            print(f"  {label} step {step}/{steps}: train loss {statistics.fmean(losses[-20:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return curve


def cache_bytes(cache: Any) -> int:
    """Bytes of the KV cache `generate()` returned, from its tensors."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def generation(model: nn.Module, prompt: torch.Tensor, new_tokens: int, clock, repeats: int = 3) -> tuple[int, float]:
    """(KV cache bytes of a greedy `generate()` of prompt + new_tokens, decode tokens/s): the decode rate timed on
    the loop `generate()` runs (after the prefill, one token per forward, the DynamicCache growing by one position
    per step), the median of `repeats` runs."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    times = []
    for _ in range(repeats):
        step = model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # the prefill, not timed
        cache, nxt = step.past_key_values, step.logits[:, -1:].argmax(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames past_key_values to cache
            t0 = clock()
            for _ in range(new_tokens):
                step = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = step.logits[:, -1:].argmax(-1)
            times.append(clock() - t0)
    return cache_bytes(out.past_key_values), prompt.shape[0] * new_tokens / statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heads", type=int, default=8, help="query heads of the MHA model (hidden 128 split in these)")
    p.add_argument("--mha", default=None, metavar="DIR",
                   help="a saved MHA model (save_pretrained folder) to start from instead of training one")
    p.add_argument("--mha-steps", type=int, default=2000, help="training steps of the MHA model")
    p.add_argument("--uptrain-fraction", type=float, default=0.05, help="uptraining steps / MHA steps")
    p.add_argument("--kv-heads", type=int, nargs="+", default=None, help="default: H/2, H/4, 1")
    p.add_argument("--poolings", nargs="+", choices=("mean", "first"), default=["mean", "first"],
                   help="pooling methods to convert with (the targets that compare them need both)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the MHA training")
    p.add_argument("--uptrain-lr", type=float, default=1e-3, help="peak learning rate of uptraining")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches (the same ones every time)")
    p.add_argument("--eval-points", type=int, default=10, help="validation losses along each uptraining run")
    p.add_argument("--gen-context", type=int, default=1024, help="prompt tokens of the generation measurement")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated after the prompt")
    p.add_argument("--gen-batch", type=int, default=8, help="sequences generated at once")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="decode time as this process's CPU time (steadier on a shared machine) or wall time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is faster for this small model on a "
                        "machine shared with other jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/uptrain_gqa")
    p.add_argument("--plot", default=None, help="where the plot goes (default: --out/uptrain.png)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines")
    args = p.parse_args(argv)
    for flag in ("heads", "mha_steps", "batch_size", "seq_len", "eval_batches", "eval_points", "gen_tokens",
                 "gen_batch", "gen_context"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 < args.uptrain_fraction <= 1:
        p.error(f"--uptrain-fraction {args.uptrain_fraction} must be in (0, 1]")
    H = args.heads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    args.device = device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    corpus = load_corpus(args.vocab_size, args.max_files, args.cache_dir)
    print(corpus)
    val = eval_batches(corpus.val, args.batch_size, args.seq_len, args.eval_batches)

    # -- the MHA model: trained here, or loaded -----------------------------------------------------------------
    torch.manual_seed(args.seed)
    if args.mha is not None:
        mha = transformers.AutoModelForCausalLM.from_pretrained(args.mha).to(device)
        if mha.config.num_key_value_heads != mha.config.num_attention_heads:
            p.error(f"--mha {args.mha} has {mha.config.num_key_value_heads} key/value heads for "
                    f"{mha.config.num_attention_heads} query heads: not a multi-head model")
        H = mha.config.num_attention_heads
        run_file = Path(args.mha) / "mha_run.json"
        meta = json.loads(run_file.read_text()) if run_file.is_file() else {}
        mha_steps = int(meta.get("steps", args.mha_steps))
        mha_seconds = None
        print(f"MHA model: {args.mha} ({mha_steps} training steps)")
    else:
        with device:
            mha = transformers.AutoModelForCausalLM.from_config(mha_config(corpus.vocab_size, H))
        memopt.apply(mha, loss="chunked")  # SDPA and the chunked loss: the fastest plain step on a CPU
        print(f"MHA model: Llama, {sum(t.numel() for t in mha.parameters()) / 1e6:.2f}M parameters, {H} heads of "
              f"{mha.config.hidden_size // H}; training {args.mha_steps} steps of {args.batch_size} x {args.seq_len} "
              f"tokens, lr {args.lr:g}", flush=True)
        t0 = time.perf_counter()
        mha_curve = train(mha, corpus.train, args.mha_steps, args.lr, args, args.seed, val,
                          max(1, args.mha_steps // 20), "MHA")
        mha_seconds = time.perf_counter() - t0
        mha_steps = args.mha_steps
        memopt.remove(mha)
        mha.save_pretrained(out / "mha")
        (out / "mha" / "mha_run.json").write_text(json.dumps({"steps": mha_steps, "curve": mha_curve,
                                                               "seconds": mha_seconds}))
        shown = mha_curve[:: max(1, len(mha_curve) // 10)]
        shown += [] if shown[-1] == mha_curve[-1] else mha_curve[-1:]
        print("MHA validation loss along training (step: loss): " + ", ".join(f"{s}: {v:.3f}" for s, v in shown))
    ks = args.kv_heads or sorted({H // 2, H // 4, 1} - {0}, reverse=True)
    for k in ks:
        if k < 1 or H % k:
            p.error(f"--kv-heads {k} must divide the {H} heads of the MHA model")
    mha_val = evaluate(mha, val, device)
    up_steps = max(1, round(args.uptrain_fraction * mha_steps))
    every = max(1, up_steps // args.eval_points)
    print(f"MHA validation loss {mha_val:.4f}; uptraining: {up_steps} steps ({args.uptrain_fraction:.0%} of "
          f"{mha_steps}), lr {args.uptrain_lr:g}", flush=True)

    # -- convert, uptrain ----------------------------------------------------------------------------------------
    up_seed = args.seed + 1  # uptraining batches: the same for every model, not the MHA training's
    runs: dict[str, dict[str, Any]] = {}
    control = copy.deepcopy(mha)
    memopt.apply(control, checkpoint=True, loss="chunked")
    runs["MHA"] = {"kv_heads": H, "pooling": "-", "curve": train(control, corpus.train, up_steps, args.uptrain_lr, args,
                                                                up_seed, val, every, "MHA control")}
    models = {"MHA": control}
    for k in ks:
        for pooling in args.poolings:
            name = f"GQA-{k}" if k > 1 else "MQA"
            name += f" {pooling}"
            model = copy.deepcopy(mha)
            t0 = time.perf_counter()
            memopt.apply(model, kv_heads=memopt.KVHeadsConfig(k, pooling), checkpoint=True, loss="chunked")
            convert_s = time.perf_counter() - t0
            curve = train(model, corpus.train, up_steps, args.uptrain_lr, args, up_seed, val, every, name)
            runs[name] = {"kv_heads": k, "pooling": pooling, "curve": curve, "convert_s": convert_s}
            models[name] = model
            print(f"{name}: validation loss {curve[0][1]:.4f} after conversion -> {curve[-1][1]:.4f} after "
                  f"{up_steps} uptraining steps", flush=True)

    # -- the KV cache and decode speed at a long context ----------------------------------------------------------
    g = torch.Generator().manual_seed(args.seed)
    context = min(args.gen_context, mha.config.max_position_embeddings - args.gen_tokens)
    prompt = random_batch(corpus.val, args.gen_batch, context, g).to(device)
    for name, model in models.items():
        if name.endswith("first") and name.replace("first", "mean") in models:
            continue  # the same shapes as the mean-pooled model
        memopt.remove(model)  # generation without training-time checkpointing and chunked loss (a no-op at eval)
        runs[name]["kv_cache_bytes"], runs[name]["decode_tokens_per_s"] = generation(model, prompt, args.gen_tokens,
                                                                                      clock)
        twin = name.replace("mean", "first")
        if twin != name and twin in runs:
            runs[twin].update({key: runs[name][key] for key in ("kv_cache_bytes", "decode_tokens_per_s")})

    # -- the table, the targets ---------------------------------------------------------------------------------
    base_kv = runs["MHA"]["kv_cache_bytes"]
    print(f"\nGQA uptraining on the standard-library corpus: MHA Llama (hidden {mha.config.hidden_size}, "
          f"{mha.config.num_hidden_layers} layers, {H} heads), {mha_steps} training steps of {args.batch_size} x "
          f"{args.seq_len} tokens; uptraining {up_steps} steps with memopt checkpoint=True, loss='chunked'; "
          f"validation {args.eval_batches} x {args.batch_size} x {args.seq_len} tokens; generation of "
          f"{args.gen_tokens} tokens after {context} for {args.gen_batch} sequences, decode tokens/s by "
          f"{args.clock} clock\n")
    print("| model | kv heads | pooling | val loss after conversion | after uptraining | vs MHA | KV cache | vs MHA "
          "| decode tokens/s | vs MHA |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, run in runs.items():
        conv = mha_val if name == "MHA" else run["curve"][0][1]
        final = run["curve"][-1][1]
        rate = run["decode_tokens_per_s"] / runs["MHA"]["decode_tokens_per_s"]
        label = "MHA (+ the same steps, control)" if name == "MHA" else name
        rows.append(f"| {label} | {run['kv_heads']} | {run['pooling']} | {conv:.4f} | {final:.4f} | "
                    f"{final / mha_val - 1:+.2%} | {format_bytes(run['kv_cache_bytes'])} | "
                    f"{run['kv_cache_bytes'] / base_kv:.4f}x | {run['decode_tokens_per_s']:.0f} | {rate:.2f}x |")
    print("\n".join(rows))
    print(f"\nMHA validation loss before the control's extra steps: {mha_val:.4f}")

    def pooling_wins(point: int) -> tuple[bool, str]:
        """Whether mean pooling has the lower validation loss than first-head pooling at every K, at `point`."""
        pairs = [(n, runs[n]["curve"][point][1], runs[n.replace("mean", "first")]["curve"][point][1])
                 for n in runs if n.endswith("mean") and n.replace("mean", "first") in runs]
        detail = ", ".join(f"{n.split()[0]} {m:.4f} vs {f:.4f}" for n, m, f in pairs)
        return all(m < f for _, m, f in pairs), detail

    targets, details = {}, {}
    if set(args.poolings) == {"mean", "first"}:
        targets["mean pooling beats first right after conversion"], details["right after"] = pooling_wins(0)
        targets["mean pooling beats first after uptraining (the paper's ablation compares uptrained models)"], \
            details["after"] = pooling_wins(-1)
    quarter = next((n for n, r in runs.items() if r["kv_heads"] == H // 4 and r["pooling"] == "mean"), None)
    if quarter is not None:
        gap = runs[quarter]["curve"][-1][1] / mha_val - 1
        targets[f"{quarter} within 2% of the MHA validation loss after uptraining"] = gap <= 0.02
        details["quarter"] = f"{gap:+.2%}"
    targets["KV cache exactly K/H of the MHA's"] = all(
        run["kv_cache_bytes"] * H == base_kv * run["kv_heads"] for run in runs.values())
    for (what, ok), detail in zip(targets.items(), [*details.values(), ""]):
        print(f"target: {what}: {'met' if ok else 'NOT met'}" + (f" ({detail})" if detail else ""))
    total = time.perf_counter() - started
    print(f"time: {total:.0f} s" + (f" (MHA training {mha_seconds:.0f} s)" if mha_seconds else ""))

    plot = Path(args.plot) if args.plot else out / "uptrain.png"
    _plot(runs, mha_val, up_steps, plot, H)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "heads": H, "mha_steps": mha_steps,
               "uptrain_steps": up_steps, "mha_val_loss": mha_val, "runs": runs, "targets": targets,
               "seconds": total, "mha_seconds": mha_seconds}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'results.json'}, {plot}, {out / 'mha'}")
    return results


def _plot(runs: dict[str, dict[str, Any]], mha_val: float, steps: int, path: Path, heads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {}
    for name, run in runs.items():
        xs, ys = zip(*run["curve"])
        if name == "MHA":
            ax.plot(xs, ys, color="black", lw=1.5, label=f"MHA ({heads} kv heads), same extra steps")
            continue
        color = colors.setdefault(run["kv_heads"], f"C{len(colors)}")
        ax.plot(xs, ys, color=color, ls="-" if run["pooling"] == "mean" else "--", marker="o", ms=3,
                label=f"{name.split()[0]} ({run['kv_heads']} kv heads), {run['pooling']} pooling")
    ax.axhline(mha_val, color="gray", lw=0.8, ls=":", label="MHA before the extra steps")
    ax.axhline(mha_val * 1.02, color="gray", lw=0.8, ls="-.", label="MHA + 2%")
    ax.set_xlabel(f"uptraining step (of {steps})")
    ax.set_ylabel("validation loss")
    ax.set_title("Uptraining after conversion to fewer key/value heads")
    lo = min(min(y for _, y in r["curve"]) for r in runs.values())
    hi = max(r["curve"][1][1] if len(r["curve"]) > 1 else r["curve"][0][1] for r in runs.values())
    ax.set_ylim(lo - 0.05 * max(1e-3, hi - lo), max(hi, mha_val * 1.03) + 0.25 * max(1e-3, hi - lo))
    ax.legend(fontsize=7, loc="upper right", handlelength=3.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
