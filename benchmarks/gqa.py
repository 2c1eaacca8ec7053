"""The KV cache and decode speed of generation after `memopt.apply(model, kv_heads=K)`, on the Llama-style bench model.

    python benchmarks/gqa.py --clock cpu               # hidden 512, 6 layers, 8 heads; contexts 1024 and 4096
    python benchmarks/gqa.py --contexts 2048 --batch 1

Rows, per context: the multi-head model and its conversions to K = H/2, H/4 and 1 key/value heads (mean pooling;
random weights: the cache and the speed do not depend on them), each generating --new-tokens greedy tokens after a
prompt of the context's length, timed round-robin in one process (median of --steps). Columns: the KV cache
`generate()` returned, measured from its tensors, against `memopt.estimate(config, mode="generate", kv_heads=K)`;
decode tokens/s (--new-tokens greedy steps after the prefill, one token per forward with transformers'
DynamicCache, the loop `generate()` runs); the prefill time; the time of the conversion itself. Target: the cache
is exactly K/H of the multi-head cache, and the estimate predicts it exactly. Quality is examples/uptrain_gqa.py's
business: this model is untrained.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import bench_args, llama, machine  # noqa: E402
from memopt._units import format_bytes  # noqa: E402


def _generate(model, prompt: torch.Tensor, n: int):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, return_dict_in_generate=True, pad_token_id=0, use_cache=True)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, n: int, clock) -> tuple[float, float]:
    """(prefill, decode) time of `n` greedy tokens after `prompt`, the loop `generate()` runs (one token per
    forward, the DynamicCache growing by one position per step), without its bookkeeping."""
    t0 = clock()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    prefill = clock() - t0
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames past_key_values to cache; 4.x has not
        t0 = clock()
        for _ in range(n):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        return prefill, clock() - t0


def main(argv=None) -> dict:
    parser = bench_args(__doc__.splitlines()[0])
    parser.set_defaults(batch=4, steps=3)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated after the prompt")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=None, help="default: H/2, H/4, 1")
    args = parser.parse_args(argv)  # --threads: bench_args sets torch's threads as it parses
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")
    heads = args.heads
    ks = args.kv_heads or sorted({heads // 2, heads // 4, 1} - {0}, reverse=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = {}
    for context in args.contexts:
        run = argparse.Namespace(**{**vars(args), "seq": context + args.new_tokens})
        base = llama(run).to(args.device).eval()
        base.config.use_cache = True
        models, convert_s = {"MHA": base}, {"MHA": 0.0}
        for k in ks:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            memopt.apply(model, kv_heads=k)
            convert_s[f"kv_heads={k}"] = time.perf_counter() - t0
            models[f"kv_heads={k}"] = model
        memopt.apply(base)  # the same attention (SDPA) for the baseline
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, args.vocab, (args.batch, context), generator=g).to(args.device)
        cache, times = {}, {name: ([], []) for name in models}
        for name, model in models.items():
            # also the warm-up; the cache holds context + 1 tokens (the last token generated is never cached)
            cache[name] = _cache_bytes(_generate(model, prompt, 2).past_key_values)
        for _ in range(args.steps):
            for name, model in models.items():  # round-robin: the machine's noise spreads over every row alike
                prefill, decode = decode_seconds(model, prompt, args.new_tokens, clock)
                times[name][0].append(prefill)
                times[name][1].append(decode)
        rows = {}
        for name, model in models.items():
            k = model.config.num_key_value_heads
            est = memopt.estimate(base.config, mode="generate",
                                  batch_size=args.batch, seq_len=context + 2, new_tokens=2, device="cpu",
                                  kv_heads=None if name == "MHA" else k)
            prefill, decode = statistics.median(times[name][0]), statistics.median(times[name][1])
            rows[name] = dict(kv_heads=k, cache=cache[name], estimate=est.kv_cache_bytes,
                              rate=args.batch * args.new_tokens / decode, prefill=prefill, convert=convert_s[name])
        base_row = rows["MHA"]
        clock_note = "CPU time of the process" if args.clock == "cpu" else "wall time"
        print(f"\nKV cache and decode speed: Llama-style h={args.hidden} L={args.layers} heads={heads} "
              f"vocab={args.vocab} fp32, batch {args.batch}, prompt {context} + {args.new_tokens} greedy tokens; {machine(args.device)}; "
              f"torch {torch.__version__}; times by {clock_note}, median of {args.steps}")
        print("| model | kv heads | KV cache (measured) | vs MHA | memopt.estimate | decode tokens/s | vs MHA "
              "| prefill | conversion |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            print(f"| {name} | {r['kv_heads']} | {format_bytes(r['cache'])} | {r['cache'] / base_row['cache']:.4f}x | "
                  f"{format_bytes(r['estimate'])} | {r['rate']:.1f} | {r['rate'] / base_row['rate']:.2f}x | "
                  f"{r['prefill'] * 1000:.0f} ms | {r['convert'] * 1000:.0f} ms |")
        exact = all(r["cache"] * heads == base_row["cache"] * r["kv_heads"] for r in rows.values())
        predicted = all(r["cache"] == r["estimate"] for r in rows.values())
        print(f"target: KV cache exactly K/H of the MHA's: {'met' if exact else 'NOT met'}; "
              f"memopt.estimate predicts it exactly: {'met' if predicted else 'NOT met'}")
        results[context] = rows
    return results


if __name__ == "__main__":
    main()
