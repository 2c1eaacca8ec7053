"""KV cache: static pre-allocation vs a dynamic cache in padded batches vs the paged cache, in one KV budget; the
paged cache's waste by output length and page size; the quantized caches' quality on the main job's trained model and
their bytes per token.

    python benchmarks/kv_cache.py                 # 64 requests, 300 training steps (cached): ~8 min on 2 cores
    python benchmarks/kv_cache.py --parts quality --train-steps 1000
    python benchmarks/kv_cache.py --fast          # the test suite's mode

Part 1, serving (--parts serving). Requests: prompts cut from standard-library functions (signature + docstring,
<= --max-prompt tokens), new tokens ~ log-normal (median --median-new, sigma 0.6, clipped to [8, 4 x median]),
seeded. The KV budget holds --budget-tokens tokens of the model's cache:

    static     every sequence reserves max_len (the longest prompt + the longest output) tokens
    dynamic    batches in arrival order, each padded to its longest prompt + its longest output
    paged      transformers' continuous batching, num_blocks = the budget in page_size blocks: a sequence holds
               ceil(written / page_size) blocks

Concurrency and waste (reserved, never written) are counted at each sequence's full length over the first batch;
the paged run is also measured in transformers' allocator (every request with its own max_new_tokens, the block
tables sampled at each forward: requests holding blocks, never-written slots). Tokens/s: every request generated
with each scheme, untracked, after a warm-up (CPU time, one run, ratios against static).

Part 2, lengths (--parts lengths): static's and the paged cache's waste (at full length and over each sequence's
life) and paged/static concurrency from the request lengths alone, for output medians --study-medians and pages
--study-pages.

Part 3, quality (--parts quality): quality against the float32 dynamic cache, teacher-forced on held-out stdlib
text (next-token agreement, logit cosine past the residual window, validation loss; the model in bfloat16 as a scale
row), and each cache's bytes per token in bfloat16 by tokens held (--contexts), residual window included.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from generate_within_budget import stdlib_requests, trained_model  # noqa: E402
from memopt.estimation.kv_cache import KVCacheConfig, blocks_needed, cache_shape, make_cache  # noqa: E402
from memopt.tracker.kv_cache import cache_bytes  # noqa: E402


def _written(p: int, n: int) -> int:
    return p + n - 1  # the last generated token is never fed back


def plan_rows(lengths: list[tuple[int, int]], budget_tokens: int, page: int) -> list[dict]:
    """How many sequences each scheme holds at once in `budget_tokens` and the reserved cache never written, over
    the first batch (requests in arrival order, each counted at its full length: the reservation it ends with)."""
    max_len = max(p for p, _ in lengths) + max(n for _, n in lengths)
    rows = []
    # static: budget // max_len sequences, each reserving max_len
    c = max(1, min(len(lengths), budget_tokens // max_len))
    written = sum(_written(p, n) for p, n in lengths[:c])
    rows.append(dict(name=f"static (max_len {max_len})", concurrent=c, waste=1 - written / (c * max_len), batch=c,
                     kind="static"))
    # dynamic, padded: the largest first batch (in arrival order) whose padded cache fits
    c = 1
    while c < len(lengths):
        pad = max(p for p, _ in lengths[:c + 1]) + max(n for _, n in lengths[:c + 1])
        if (c + 1) * pad > budget_tokens:
            break
        c += 1
    pad = max(p for p, _ in lengths[:c]) + max(n for _, n in lengths[:c])
    written = sum(_written(p, n) for p, n in lengths[:c])
    rows.append(dict(name="dynamic, padded batches", concurrent=c, waste=1 - written / (c * pad), batch=c,
                     kind="dynamic"))
    # paged: ceil(written / page) blocks per sequence (memopt.estimate's count)
    blocks = budget_tokens // page
    used, c = 0, 0
    for p, n in lengths:
        need = blocks_needed([(p, n)], page)
        if used + need > blocks:
            break
        used, c = used + need, c + 1
    written = sum(_written(p, n) for p, n in lengths[:c])
    rows.append(dict(name=f"paged (page {page}, {blocks} blocks)", concurrent=c, waste=1 - written / (used * page),
                     batch=c, kind="paged", num_blocks=blocks))
    return rows


@contextmanager
def allocator_probe():
    """Samples transformers' paged cache at every forward (its first layer's update): the requests holding blocks,
    the distinct blocks they hold and the tokens those blocks hold (prompt + generated so far, as allocated for
    this step). Yields the list of samples ``(requests, tokens, slots)`` and the cache (its tensor's bytes)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    samples: list[tuple[int, int, int]] = []
    live: dict[str, int] = {}
    seen: dict[str, Any] = {}
    store, free, update = (PagedAttentionCache.can_store_request_tokens, PagedAttentionCache.free_blocks,
                           PagedAttentionCache.update)

    def can_store(self, state, request_len, dry_run=False):
        ok = store(self, state, request_len, dry_run)
        if ok and not dry_run:
            live[state.request_id] = state.current_len() + request_len
        return ok

    def free_blocks(self, request_id, no_cache=False):
        live.pop(request_id, None)
        return free(self, request_id, no_cache)

    def on_update(self, key_states, value_states, layer_idx, kwargs):
        if layer_idx == min(self.layer_to_allocator):
            seen["cache"] = self
            slots = 0
            for a in self.cache_allocators.values():
                held = set().union(*(a.block_table.get(r, ()) for r in live)) if live else set()
                slots += len(held) * a.tokens_per_page
            samples.append((len(live), sum(live.values()), slots))
        return update(self, key_states, value_states, layer_idx, kwargs)

    PagedAttentionCache.can_store_request_tokens, PagedAttentionCache.free_blocks = can_store, free_blocks
    PagedAttentionCache.update = on_update
    try:
        yield samples, seen
    finally:
        PagedAttentionCache.can_store_request_tokens, PagedAttentionCache.free_blocks = store, free
        PagedAttentionCache.update = update


def run_paged(model, reqs, kv: KVCacheConfig) -> tuple[int, list[tuple[int, int, int]], int]:
    """Every request through continuous batching with its own number of new tokens (as a server gets them):
    tokens generated, the allocator's samples, the cache tensor's bytes."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=max(len(ids) for ids, _ in reqs),
                          max_generated_length=max(n for _, n in reqs), num_requests=len(reqs))
    done: dict[str, Any] = {}
    with allocator_probe() as (samples, seen):
        with model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=5,
                                                       workload_hints=hints, **kv.generate_kwargs()) as manager:
            ids = [manager.add_request(list(p), max_new_tokens=n) for p, n in reqs]
            while len(done) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    done[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError("continuous batching stopped before every request finished")
    tokens = sum(len(r.generated_tokens) for r in done.values())
    asked = sum(n for _, n in reqs)
    if tokens != asked:
        raise RuntimeError(f"continuous batching generated {tokens} tokens, the requests asked for {asked}")
    cache = seen["cache"].cache_tensor
    return tokens, samples, cache.numel() * cache.element_size()


def warm_up(model, reqs, row: dict, page: int) -> None:
    """A short untimed generation with the scheme first: the first call of each path pays one-off costs (lazy
    imports, mask and kernel set-up) that are not tokens/s."""
    ids = reqs[0][0][:8]
    if row["kind"] == "paged":
        run_paged(model, [(ids, 2)], KVCacheConfig("paged", page_size=page, num_blocks=4, max_batch_tokens=64))
    else:
        kw = {"cache_implementation": "static"} if row["kind"] == "static" else {}
        model.generate(torch.tensor([ids]), do_sample=False, pad_token_id=0, max_new_tokens=2, min_new_tokens=2, **kw)


def serving(model, reqs, budget_tokens: int, page: int) -> list[dict]:
    lengths = [(len(ids), n) for ids, n in reqs]
    rows = plan_rows(lengths, budget_tokens, page)
    max_len = max(p for p, _ in lengths) + max(n for _, n in lengths)
    # tokens/s, measured: every request generated with each scheme, untracked (CPU time)
    for row in rows:
        warm_up(model, reqs, row, page)
        t0, tokens = time.process_time(), 0
        if row["kind"] == "paged":
            kv = KVCacheConfig("paged", page_size=page, num_blocks=row["num_blocks"], max_batch_tokens=256)
            tokens, samples, row["cache_bytes"] = run_paged(model, reqs, kv)
            busy = [s for s in samples if s[0]]
            peak = max(busy, key=lambda s: (s[2], s[0]))
            row.update(measured_concurrent=max(s[0] for s in busy), peak_waste=1 - peak[1] / peak[2],
                       mean_waste=1 - sum(s[1] for s in busy) / sum(s[2] for s in busy), steps=len(samples))
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


def lengths_study(tokenizer, n: int, medians: list[int], pages: list[int], max_prompt: int, max_files: int | None,
                  static_seqs: int = 8) -> list[dict]:
    """Waste and concurrency from the lengths alone (the same block count as memopt.estimate and the allocator),
    for output-length distributions of the given medians: static reserving max_len vs paged at each page size, in
    a budget that holds `static_seqs` static sequences."""
    rows = []
    for median in medians:
        lengths = [(len(ids), new) for ids, new in stdlib_requests(tokenizer, n, median, 1, max_prompt=max_prompt,
                                                                      max_files=max_files)]
        max_len = max(p for p, _ in lengths) + max(m for _, m in lengths)
        written = [_written(p, m) for p, m in lengths]
        row = dict(median=median, n=len(lengths), mean_prompt=sum(p for p, _ in lengths) / len(lengths),
                   mean_new=sum(m for _, m in lengths) / len(lengths), mean_len=sum(written) / len(written),
                   max_len=max_len, static_waste=1 - sum(written) / (len(written) * max_len), paged={})
        # over each sequence's life: the tokens held after each forward (prompt, then one more a step) against the
        # blocks they take, summed over the steps (what the allocator measure above averages)
        held = torch.cat([torch.arange(p_, _written(p_, m) + 1) for p_, m in lengths]).double()
        for page in pages:
            slots = sum(blocks_needed([lp], page) * page for lp in lengths)
            life = 1 - held.sum().item() / (torch.ceil(held / page) * page).sum().item()
            budget_blocks = static_seqs * max_len // page
            used, c = 0, 0
            for lp in lengths:
                need = blocks_needed([lp], page)
                if used + need > budget_blocks:
                    break
                used, c = used + need, c + 1
            row["paged"][page] = (1 - sum(written) / slots, life, c)
        rows.append(row)
    return rows


@torch.no_grad()
def quality(model, corpus, kinds: list[KVCacheConfig], ctx: int, batch: int) -> list[dict]:
    """Teacher-forced: the context fed one chunk at a time through each cache (prefill of `ctx // 2`, then 16-token
    chunks), logits against the float32 dynamic cache's. A last row, for scale: the whole model in bfloat16 (weights,
    activations and a bf16 dynamic cache), as models are usually served: the argmax flips that rounding alone makes."""
    starts = torch.linspace(0, corpus.val.numel() - ctx - 2, batch).long()
    x = corpus.val[starts[:, None] + torch.arange(ctx + 1)]
    ids, labels = x[:, :-1], x[:, 1:]
    outs = {}
    half = copy.deepcopy(model).to(torch.bfloat16)
    for key, net, kv in [(KVCacheConfig("dynamic"), model, KVCacheConfig("dynamic"))] + \
            [(kv, model, kv) for kv in kinds] + [("bf16", half, KVCacheConfig("dynamic"))]:
        try:
            cache = make_cache(kv, net.config, max_len=ctx)
        except ImportError as exc:
            outs[key] = exc
            continue
        logits, pos = [], ctx // 2
        logits.append(net(input_ids=ids[:, :pos], cache=cache, use_cache=True).logits.float())
        while pos < ctx:
            step = min(16, ctx - pos)
            logits.append(net(input_ids=ids[:, pos:pos + step], cache=cache, use_cache=True).logits.float())
            pos += step
        outs[key] = (torch.cat(logits, 1), cache_bytes(cache) / (batch * ctx))
    del half
    ref, ref_bytes = outs[KVCacheConfig("dynamic")]
    rows = []
    skip = ctx // 2 + 128  # past the prefill and the residual window: positions that read quantized keys
    for kv, res in outs.items():
        name = "bf16 model, bf16 dynamic cache (for scale)" if kv == "bf16" else _label(kv)
        if isinstance(res, Exception):
            rows.append(dict(name=name if not kv.nbits else kv.kind, error=str(res)))
            continue
        lg, per_token = res
        a, b = lg[:, skip:], ref[:, skip:]
        rows.append(dict(name=name, bytes_per_token=per_token,
                         ratio=per_token / ref_bytes, agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                         cosine=F.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1).mean().item(),
                         loss=F.cross_entropy(lg.flatten(0, 1), labels.flatten()).item()))
    return rows


def bytes_by_context(config, kinds: list[KVCacheConfig], contexts: list[int], window: int,
                     dtype: torch.dtype = torch.bfloat16) -> dict[tuple[str, int], float]:
    """Bytes per token of each cache (transformers' real cache objects, the model's shapes, batch 1) holding `ctx`
    tokens written as generation writes them: a prompt of ``ctx - window`` tokens, then `window` tokens one at a
    time (a quantized cache's full-precision residual window holds them: half of ``residual_length`` is its mean
    fill while decoding, as it is re-quantized when full). Values random: the storage does not depend on them."""
    layers, kv_heads, head_dim = cache_shape(config)
    g = torch.Generator().manual_seed(0)
    out = {}
    for kv in [KVCacheConfig("dynamic")] + kinds:
        for ctx in contexts:
            try:
                cache = make_cache(kv, config, max_len=ctx)
            except ImportError:
                continue
            for n in [ctx - window] + [1] * window:
                for layer in range(layers):
                    k, v = (torch.randn(1, kv_heads, n, head_dim, generator=g).to(dtype) for _ in range(2))
                    cache.update(k, v, layer)
            out[(_label(kv), ctx)] = cache_bytes(cache) / ctx
    return out


def _label(kv: KVCacheConfig) -> str:
    if not kv.nbits:
        return kv.kind
    return f"{kv.kind} ({kv.resolved_backend()}, group {kv.group_size}, residual {kv.residual_length})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--median-new", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=200, help="prompt tokens at most (part 1)")
    p.add_argument("--budget-tokens", type=int, default=4096, help="the KV budget, in tokens of the model's cache")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--ctx", type=int, default=512, help="context of the quality study")
    p.add_argument("--study-requests", type=int, default=512, help="requests per distribution of the lengths study")
    p.add_argument("--study-medians", default="64,128,256,512", help="median new tokens of the lengths study")
    p.add_argument("--study-pages", default="8,16,32")
    p.add_argument("--study-max-prompt", type=int, default=1024)
    p.add_argument("--contexts", default="512,1024,2048,4096,8192", help="tokens held, for the bf16 bytes table")
    p.add_argument("--quality-batch", type=int, default=8, help="sequences of the quality study")
    p.add_argument("--parts", default="serving,lengths,quality", help="which parts to run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier CPU times on a shared machine)")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    max_files = None
    if args.fast:
        args.requests, args.median_new, args.budget_tokens, args.train_steps, args.ctx = 6, 8, 320, 5, 288
        args.quality_batch = 4
        args.max_prompt, args.study_requests, args.study_medians, args.contexts = 48, 64, "64,256", "512,2048"
        max_files = 40
    warnings.simplefilter("ignore")
    model, corpus = trained_model(args.train_steps, max_files, quiet=True)
    reqs = stdlib_requests(corpus.tokenizer, args.requests, args.median_new, 0, max_prompt=args.max_prompt,
                           max_files=max_files or 40)
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 4
    lengths = [(len(ids), n) for ids, n in reqs]
    print(f"model: the main job's tiny preset trained {args.train_steps} steps; {per_token:,} B of KV per token "
          f"(float32); {len(reqs)} requests (prompts {min(q for q, _ in lengths)}-{max(q for q, _ in lengths)} "
          f"tokens, mean {sum(q for q, _ in lengths) / len(lengths):.0f}; new tokens {min(n for _, n in lengths)}-"
          f"{max(n for _, n in lengths)}, log-normal median {args.median_new}), KV budget {args.budget_tokens} "
          f"tokens ({args.budget_tokens * per_token / 2**20:.2f} MiB); {args.threads} torch thread(s)\n", flush=True)
    parts = set(args.parts.split(","))
    if "serving" in parts:
        t0 = time.perf_counter()
        rows = serving(model, reqs, args.budget_tokens, args.page_size)
        base = rows[0]
        print("| scheme | concurrent sequences | vs static | reserved KV never written | tokens/s (CPU) | vs static |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['concurrent']} | {r['concurrent'] / base['concurrent']:.2f}x | {100 * r['waste']:.1f}% "
                  f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
        paged = rows[-1]
        print(f"\n(counted at each sequence's full length, over the first batch in arrival order.) paged, measured in "
              f"transformers' allocator over {paged['steps']} forwards, every request with its own new tokens: up to "
              f"{paged['measured_concurrent']} requests holding blocks at once; reserved never written "
              f"{100 * paged['peak_waste']:.1f}% when the most blocks were in use, {100 * paged['mean_waste']:.1f}% "
              f"averaged over the forwards; cache tensor {paged['cache_bytes']:,} B (budget {args.budget_tokens * per_token:,}"
              f" B + transformers' two trash sectors) [{time.perf_counter() - t0:.0f} s]\n", flush=True)

    if "lengths" in parts:
        pages = [int(x) for x in args.study_pages.split(",")]
        study = lengths_study(corpus.tokenizer, args.study_requests, [int(x) for x in args.study_medians.split(",")],
                              pages, args.study_max_prompt, max_files)
        print(f"lengths study: {study[0]['n']} requests per row, prompts = standard-library functions up to the end of "
              f"their docstring (at most {args.study_max_prompt} tokens), new tokens log-normal (sigma 0.6, clipped to "
              f"[8, 4 x median]; seeded); budget = 8 static sequences of max_len; paged cell: never written at each "
              f"sequence's full length / over its life (the tokens held after each forward against their blocks) "
              f"(sequences at once vs static)\n")
        print("| new tokens, median | mean prompt | mean new | max_len | static: never written | "
              + " | ".join(f"paged, page {pg}" for pg in pages) + " |")
        print("|---:|---:|---:|---:|---:|" + "---:|" * len(pages))
        for r in study:
            print(f"| {r['median']} | {r['mean_prompt']:.0f} | {r['mean_new']:.0f} | {r['max_len']} | "
                  f"{100 * r['static_waste']:.1f}% | "
                  + " | ".join(f"{100 * r['paged'][pg][0]:.1f}% / {100 * r['paged'][pg][1]:.1f}% ({r['paged'][pg][2] / 8:.1f}x)"
                               for pg in pages) + " |")
        print(flush=True)

    if "quality" in parts:
        kinds = [KVCacheConfig("fp8"), KVCacheConfig("int4", backend="hqq"),
                 KVCacheConfig("int4", backend="hqq", group_size=128), KVCacheConfig("int2", backend="hqq")]
        t0 = time.perf_counter()
        print(f"quality against the float32 dynamic cache, teacher-forced on held-out stdlib text, {args.quality_batch} x {args.ctx} tokens "
              f"(prefill {args.ctx // 2}, then 16-token chunks; positions after the residual window); bytes/token of the "
              f"float32 cache at {args.ctx} tokens (measured)\n")
        print("| KV cache | bytes/token (float32) | vs float32 dynamic | next-token agreement | logit cosine | val loss |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in quality(model, corpus, kinds, args.ctx, args.quality_batch):
            if "error" in r:
                print(f"| {r['name']} | skipped: {r['error']} |")
                continue
            print(f"| {r['name']} | {r['bytes_per_token']:.1f} | {r['ratio']:.3f}x | {r['agree']:.4f} | "
                  f"{r['cosine']:.5f} | {r['loss']:.4f} |")
        contexts = [int(x) for x in args.contexts.split(",")]
        window = 64
        sizes = bytes_by_context(model.config, kinds, contexts, window)
        print(f"\nbytes per token in bfloat16 against the bfloat16 dynamic cache, by tokens held (transformers' cache "
              f"objects, this model's shapes, batch 1; the last {window} tokens written one at a time: the residual "
              f"window's mean fill)\n")
        print("| KV cache (bf16) | " + " | ".join(f"{c} tokens" for c in contexts) + " |")
        print("|---|" + "---:|" * len(contexts))
        for name in dict.fromkeys(k for k, _ in sizes):
            print(f"| {name} | " + " | ".join(f"{sizes[name, c]:.0f} B ({sizes[name, c] / sizes['dynamic', c]:.3f}x)"
                                             for c in contexts) + " |")
        print(f"[{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
