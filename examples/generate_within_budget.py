"""Generate within a memory budget: plan the KV cache with memopt, then generate with the plan and see what it took.

    python examples/generate_within_budget.py                     # tiny preset, 24 MiB budget, 24 stdlib prompts
    python examples/generate_within_budget.py --budget 16MiB --requests 48
    python examples/generate_within_budget.py --fast              # the test suite's mode (9MiB, 4 short prompts)

The model is the main job's (examples/finetune_causal_lm.py's tiny preset trained on the standard library's source
for --train-steps steps with its own build_model / train_step / schedule; the trained weights are cached under
~/.cache/memopt and reused). Prompts are cut from standard-library functions (their signature and docstring), the
number of new tokens per request drawn from a log-normal distribution (median --median-new, sigma 0.6, clipped to
[8, 4 x median]; seeded). Then:

    memopt.plan(config, budget, mode="generate", ...)   how many sequences fit, with which cache, the vLLM settings
    model.generate_batch(prompts, **plan.generate_kwargs)   (or model.generate in batches) under memopt.track
    the tracked memory table, and predicted against measured peak and KV cache
"""

from __future__ import annotations

import argparse
import ast
import functools
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memopt  # noqa: E402
from _data import default_cache_dir, load_corpus, random_batch, stdlib_files  # noqa: E402
from memopt._units import format_bytes  # noqa: E402


def trained_model(steps: int, max_files: int | None, seed: int = 0, quiet: bool = False):
    """The main job's tiny model trained for `steps` steps (cached), its corpus; eval mode, SDPA, cache on."""
    import finetune_causal_lm as job

    corpus = load_corpus(4096, max_files, quiet=quiet)
    path = Path(default_cache_dir()) / f"kvcache-tiny-{corpus.vocab_size}-{corpus.files}files-{steps}steps-{seed}.pt"
    torch.manual_seed(seed)
    model = job.build_model("tiny", corpus.vocab_size, 128, torch.float32, torch.device("cpu"))
    if path.is_file():
        model.load_state_dict(torch.load(path))
    else:
        if not quiet:
            print(f"training the main job's tiny model for {steps} steps (cached in {path}) ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memopt.apply(model, checkpoint=True)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sched = job.cosine_schedule(opt, steps)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            job.train_step(model, opt, random_batch(corpus.train, 8, 128, g), sched, clip=1.0)
        memopt.remove(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.config.use_cache = model.generation_config.use_cache = True  # the main job trains without a cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model)  # SDPA attention
    return model.eval(), corpus


@functools.lru_cache(maxsize=4)
def _function_heads(max_files: int | None) -> tuple[str, ...]:
    """Every standard-library function with a docstring: its source up to the end of the docstring."""
    heads = []
    for path in stdlib_files(max_files):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                heads.append("\n".join(lines[node.lineno - 1:node.body[0].end_lineno]))
    return tuple(heads)


def stdlib_requests(tokenizer, n: int, median_new: int, seed: int = 0, max_prompt: int = 200,
                    max_files: int | None = 40) -> list[tuple[list[int], int]]:
    """`n` requests: (prompt token ids, new tokens). Prompts: a standard-library function's source up to the end of
    its docstring (at most `max_prompt` tokens); new tokens ~ log-normal(median `median_new`, sigma 0.6), clipped
    to [8, 4 x median]."""
    rng = random.Random(seed)
    heads = list(_function_heads(max_files))
    rng.shuffle(heads)
    out = []
    for text in heads[:n]:
        ids = tokenizer.encode(text).ids[:max_prompt]
        new = int(min(4 * median_new, max(8, round(math.exp(rng.gauss(math.log(median_new), 0.6))))))
        out.append((ids, new))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default=None, help="device memory for the generation (default 24MiB: tiny model; "
                                                  "--fast: 9MiB, a few sequences)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--median-new", type=int, default=48, help="median new tokens per request (log-normal)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of the main job's training (cached)")
    p.add_argument("--max-files", type=int, default=None, help="stdlib files for the corpus (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=200, help="prompt tokens at most")
    p.add_argument("--fast", action="store_true", help="40 files, 5 training steps, 4 short requests (the tests)")
    args = p.parse_args(argv)
    if args.fast:
        args.max_files, args.train_steps, args.requests, args.median_new, args.max_prompt = 40, 5, 4, 8, 48
    args.budget = args.budget or ("9MiB" if args.fast else "24MiB")
    model, corpus = trained_model(args.train_steps, args.max_files, args.seed)
    reqs = stdlib_requests(corpus.tokenizer, args.requests, args.median_new, args.seed, max_prompt=args.max_prompt,
                           max_files=args.max_files or 40)
    lengths = [(len(ids), new) for ids, new in reqs]
    seq_len = max(pl for pl, _ in lengths) + max(n for _, n in lengths)  # a batch: its longest prompt, padded
    print(f"model: the main job's tiny preset ({sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters, "
          f"trained {args.train_steps} steps), float32 on cpu")
    print(f"{len(reqs)} requests from standard-library functions: prompts {min(pl for pl, _ in lengths)}-"
          f"{max(pl for pl, _ in lengths)} tokens, new tokens {min(n for _, n in lengths)}-"
          f"{max(n for _, n in lengths)} (log-normal, median {args.median_new}); planned for {seq_len}")

    t0 = time.process_time()
    plan = memopt.plan(model.config, args.budget, mode="generate", seq_len=seq_len,
                       new_tokens=max(n for _, n in lengths), device="cpu", dtype="float32",
                       kv_caches=["dynamic", "paged"], allow_quant=False)
    print(f"\nmemopt.plan ({time.process_time() - t0:.1f} s CPU):\n{plan}\n")
    if not plan.fits:
        print("nothing fits this budget: raise --budget")
        return {"fits": False}
    prompts = [ids for ids, _ in reqs]
    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    max_new = max(n for _, n in lengths)
    paged = plan.kv_cache.kind == "paged"
    # what memopt predicts for the run below: the batches as they run (paged: every request at once in the plan's
    # blocks; generate_batch takes one max_new_tokens for all)
    batches = [[pl for pl, _ in lengths]] if paged else \
        [[pl for pl, _ in lengths[i:i + plan.sequences]] for i in range(0, len(lengths), plan.sequences)]
    kw = dict(mode="generate", device="cpu", dtype="float32", kv_cache=plan.kv_cache)
    predicted = max((memopt.estimate(model.config, requests=[(pl, max_new) for pl in b], **kw) if paged else
                     memopt.estimate(model.config, batch_size=len(b), seq_len=max(b) + max_new, new_tokens=max_new,
                                     **kw)).peak_bytes for b in batches)
    t0 = time.perf_counter()
    with memopt.track(model) as tracker:
        if paged:
            out = model.generate_batch(prompts, generation_config=gen, max_new_tokens=max_new, progress_bar=False,
                                       **plan.generate_kwargs)
            tokens = sum(len(r.generated_tokens) for r in out.values())
        else:  # batches of plan.sequences, left-padded to the longest prompt
            tokens = 0
            for i in range(0, len(prompts), plan.sequences):
                chunk = prompts[i:i + plan.sequences]
                width = max(len(c) for c in chunk)
                ids = torch.tensor([[0] * (width - len(c)) + c for c in chunk])
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
                res = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=max_new,
                                     min_new_tokens=max_new, **plan.generate_kwargs)
                tokens += (res.shape[1] - width) * len(chunk)
    seconds = time.perf_counter() - t0
    report = tracker.report()
    print("memory of the generation (memopt.track), one row per block:\n")
    print(report.table(depth=3))
    kv_peak = report.peak_breakdown.get("kv_cache", 0)
    print(f"\nthe plan: {plan.sequences} sequences of {seq_len} tokens at once, peak {format_bytes(plan.estimate.peak_bytes)}"
          f"; this run ({len(prompts)} requests{'' if paged else f' in {len(batches)} batch(es)'}): predicted "
          f"{format_bytes(predicted)}, measured {format_bytes(report.peak_bytes)} ({report.peak_bytes / predicted:.3f}x "
          f"the prediction; {report.peak_bytes / plan.budget_bytes:.0%} of the budget {format_bytes(plan.budget_bytes)}"
          f"); KV cache at the peak {format_bytes(kv_peak)}")
    print(f"{tokens} tokens generated in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s)")
    return {"fits": True, "peak": report.peak_bytes, "budget": plan.budget_bytes, "predicted": predicted,
            "kind": plan.kv_cache.kind}


if __name__ == "__main__":
    main()
