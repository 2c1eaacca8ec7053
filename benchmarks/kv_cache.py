"""KV cache: static pre-allocation vs a dynamic cache in padded batches vs the paged cache, in one KV budget; and the
quantized caches' bytes per token and quality on the main job's trained model.

    python benchmarks/kv_cache.py                 # 64 requests, 300 training steps (cached), a few minutes
    python benchmarks/kv_cache.py --fast          # the test suite's mode

Part 1, serving. Requests: prompts cut from standard-library functions (signature + docstring, <= 200 tokens), new
tokens ~ log-normal (median --median-new, sigma 0.6, clipped to [8, 4 x median]), seeded. In a KV budget of
--kv-budget bytes per token-slot... precisely: the budget holds --budget-tokens tokens of the model's KV cache:

    static     every sequence reserves max_len (the longest prompt + the longest output) tokens
    dynamic    batches in arrival order, each padded to its longest prompt + its longest output
    paged      transformers' continuous batching, num_blocks = the budget in page_size blocks: a sequence holds
               ceil(written / page_size) blocks

Concurrency is how many sequences hold cache at once at the start (the first batch); waste is the fraction of the
reserved cache never written (over the first batch); tokens/s is measured by generating every request with each
scheme on the trained model (CPU time, one run, ratios against static).

Part 2, quantized caches: bytes per token of the cache after generation (tracked, scales and residual window
included) against the float32 dynamic cache, and quality against it, teacher-forced on held-out stdlib text:
next-token agreement and logit cosine over the positions after the residual window, and the validation loss.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import memopt  # noqa: E402
from generate_within_budget import stdlib_requests, trained_model  # noqa: E402
from memopt.estimation.kv_cache import KVCacheConfig, make_cache  # noqa: E402
from memopt.tracker.kv_cache import cache_bytes  # noqa: E402


def serving(model, reqs, budget_tokens: int, page: int) -> list[dict]:
    lengths = [(len(ids), n) for ids, n in reqs]
    max_len = max(p for p, _ in lengths) + max(n for _, n in lengths)
    rows = []
    # static: budget // max_len sequences, each reserving max_len
    c = max(1, min(len(reqs), budget_tokens // max_len))
    written = sum(p + n - 1 for p, n in lengths[:c])
    rows.append(dict(name=f"static (max_len {max_len})", concurrent=c, waste=1 - written / (c * max_len), batch=c,
                     kind="static"))
    # dynamic, padded: the largest first batch (in arrival order) whose padded cache fits
    c = 1
    while c < len(reqs):
        pad = max(p for p, _ in lengths[:c + 1]) + max(n for _, n in lengths[:c + 1])
        if (c + 1) * pad > budget_tokens:
            break
        c += 1
    pad = max(p for p, _ in lengths[:c]) + max(n for _, n in lengths[:c])
    written = sum(p + n - 1 for p, n in lengths[:c])
    rows.append(dict(name="dynamic, padded batches", concurrent=c, waste=1 - written / (c * pad), batch=c,
                     kind="dynamic"))
    # paged: blocks as sequences reach them
    blocks = budget_tokens // page
    used, c = 0, 0
    for p, n in lengths:
        need = math.ceil((p + n - 1) / page)
        if used + need > blocks:
            break
        used, c = used + need, c + 1
    written = sum(p + n - 1 for p, n in lengths[:c])
    rows.append(dict(name=f"paged (page {page}, {blocks} blocks)", concurrent=c, waste=1 - written / (used * page),
                     batch=c, kind="paged", num_blocks=blocks))
    # tokens/s, measured: every request generated with each scheme
    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    for row in rows:
        t0, tokens = time.process_time(), 0
        if row["kind"] == "paged":
            kv = KVCacheConfig("paged", page_size=page, num_blocks=row["num_blocks"], max_batch_tokens=256)
            with memopt.track(model) as tracker:
                out = model.generate_batch([ids for ids, _ in reqs], generation_config=gen,
                                           max_new_tokens=max(n for _, n in lengths), progress_bar=False,
                                           **kv.generate_kwargs())
            tokens = sum(len(r.generated_tokens) for r in out.values())
            row["tracked_kv"] = tracker.report().peak_breakdown["kv_cache"]
        else:
            for i in range(0, len(reqs), row["batch"]):
                chunk = reqs[i:i + row["batch"]]
                width = max(len(ids) for ids, _ in chunk)
                new = max(n for _, n in chunk)
                x = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in chunk])
                mask = (torch.arange(width) >= width - torch.tensor([len(ids) for ids, _ in chunk])[:, None]).long()
                kw = {"cache_implementation": "static"} if row["kind"] == "static" else {}
                if row["kind"] == "static":  # reserved for the longest request of all, as a server would
                    new = max_len - width
                model.generate(x, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=new,
                               min_new_tokens=new, **kw)
                tokens += sum(n for _, n in chunk)  # the tokens the requests asked for
        row["tokens_per_s"] = tokens / (time.process_time() - t0)
    return rows


@torch.no_grad()
def quality(model, corpus, kinds: list[KVCacheConfig], ctx: int, batch: int) -> list[dict]:
    """Teacher-forced: the context fed one chunk at a time through each cache (prefill of `ctx // 2`, then 16-token
    chunks), logits against the float32 dynamic cache's."""
    starts = torch.linspace(0, corpus.val.numel() - ctx - 2, batch).long()
    x = corpus.val[starts[:, None] + torch.arange(ctx + 1)]
    ids, labels = x[:, :-1], x[:, 1:]
    outs = {}
    for kv in [KVCacheConfig("dynamic")] + kinds:
        try:
            cache = make_cache(kv, model.config, max_len=ctx)
        except ImportError as exc:
            outs[kv] = exc
            continue
        logits, pos = [], ctx // 2
        logits.append(model(input_ids=ids[:, :pos], cache=cache, use_cache=True).logits)
        while pos < ctx:
            step = min(16, ctx - pos)
            logits.append(model(input_ids=ids[:, pos:pos + step], cache=cache, use_cache=True).logits)
            pos += step
        outs[kv] = (torch.cat(logits, 1), cache_bytes(cache) / (batch * ctx))
    ref, ref_bytes = outs[KVCacheConfig("dynamic")]
    rows = []
    skip = ctx // 2 + 128  # past the prefill and the residual window: positions that read quantized keys
    for kv, res in outs.items():
        if isinstance(res, Exception):
            rows.append(dict(name=kv.kind, error=str(res)))
            continue
        lg, per_token = res
        a, b = lg[:, skip:], ref[:, skip:]
        rows.append(dict(name=kv.kind + (f" ({kv.resolved_backend()})" if kv.nbits else ""), bytes_per_token=per_token,
                         ratio=per_token / ref_bytes, agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                         cosine=F.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1).mean().item(),
                         loss=F.cross_entropy(lg.flatten(0, 1), labels.flatten()).item()))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--median-new", type=int, default=64)
    p.add_argument("--budget-tokens", type=int, default=4096, help="the KV budget, in tokens of the model's cache")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--ctx", type=int, default=512, help="context of the quality study")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args(argv)
    max_files = None
    if args.fast:
        args.requests, args.median_new, args.budget_tokens, args.train_steps, args.ctx = 6, 8, 600, 5, 320
        max_files = 40
    warnings.simplefilter("ignore")
    model, corpus = trained_model(args.train_steps, max_files, quiet=True)
    reqs = stdlib_requests(corpus.tokenizer, args.requests, args.median_new, 0, max_files=max_files or 40)
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 4
    print(f"model: the main job's tiny preset trained {args.train_steps} steps; {per_token:,} B of KV per token "
          f"(float32); {len(reqs)} requests, KV budget {args.budget_tokens} tokens "
          f"({args.budget_tokens * per_token / 2**20:.2f} MiB)\n")
    rows = serving(model, reqs, args.budget_tokens, args.page_size)
    base = rows[0]
    print("| scheme | concurrent sequences | vs static | reserved KV never written | tokens/s (CPU) | vs static |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['concurrent']} | {r['concurrent'] / base['concurrent']:.2f}x | {100 * r['waste']:.1f}% "
              f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    paged = rows[-1]
    print(f"\npaged cache tensor tracked: {paged.get('tracked_kv', 0):,} B "
          f"(budget {args.budget_tokens * per_token:,} B + transformers' two trash sectors)\n")
    kinds = [KVCacheConfig("fp8"), KVCacheConfig("int4", backend="hqq"), KVCacheConfig("int2", backend="hqq")]
    print("| KV cache | bytes/token | vs float32 dynamic | vs bf16 | next-token agreement | logit cosine | val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in quality(model, corpus, kinds, args.ctx, 4):
        if "error" in r:
            print(f"| {r['name']} | skipped: {r['error']} |")
            continue
        print(f"| {r['name']} | {r['bytes_per_token']:.1f} | {r['ratio']:.3f}x | {2 * r['ratio']:.3f}x | "
              f"{r['agree']:.4f} | {r['cosine']:.5f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
