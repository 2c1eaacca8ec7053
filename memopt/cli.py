"""memopt's command line: thin argparse over the library.

    memopt inspect CONFIG.json [--checkpoint full|selective|offload|N] [--attention sdpa|none]
    memopt report CONFIG.json --batch-size B --seq-len S [--checkpoint ...] [--quant ...] [--lora R] [--loss chunked]
                  [--json | --csv | --plot out.png]

    memopt estimate CONFIG.json --batch-size 1 --seq-len 2048 [--dtype bfloat16] [--checkpoint full] [--quant 4bit]
                    [--lora 16] [--optimizer adamw] [--device cuda] [--world-size N] [--mode train|generate] [--json]
    memopt plan CONFIG.json --budget 24GiB --batch-size 1 --seq-len 2048 [--dtype bfloat16] [--json]
    memopt plan CONFIG.json --mode generate --budget 24GiB --seq-len 8192 [--new-tokens N] [--sequences N]
                [--kv-cache dynamic,paged,fp8,int4,int2,offloaded] [--kv-heads 8] [--no-quant] [--json]

`inspect` builds the model from a local transformers config.json on the meta device (no weights, no memory, no
download), applies memopt and prints what it did to each layer. `report` builds it for real (random weights),
applies memopt, runs a warm-up training step (so the optimizer state exists) and one tracked step on random
tokens, and prints the per-layer memory report. `estimate` predicts the peak of a training step (or of generation)
on fake tensors, without allocating; `plan` finds the cheapest memopt options that fit a budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _checkpoint_arg(value: str) -> Any:
    if value.isdigit():
        return int(value)
    return {"none": None, "true": True}.get(value.lower(), value)


def _build_from_config(path: str, device: str = "meta", dtype=None):
    from .estimation import build_model, load_config

    try:
        return build_model(load_config(path), device, dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"memopt: {exc}") from None


def _inspect(args: argparse.Namespace) -> int:
    import memopt

    model = _build_from_config(args.config)
    attention = None if args.attention.lower() == "none" else args.attention
    try:
        memopt.apply(model, checkpoint=_checkpoint_arg(args.checkpoint), attention=attention)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise SystemExit(f"memopt: {exc}") from None
    record = memopt.applied(model)
    print(json.dumps(record.to_dict(), indent=2) if args.json else record)
    return 0


def _dtype(name: str):
    from .estimation import dtype_from_name

    try:
        return dtype_from_name(name)
    except ValueError:
        raise SystemExit(f"memopt: --dtype {name!r} is not supported; use float32, bfloat16 or float16") from None


def _report(args: argparse.Namespace) -> int:
    import torch

    import memopt
    from memopt.estimation import step_loss

    if args.batch_size < 1 or args.seq_len < 1:
        raise SystemExit(f"memopt: --batch-size and --seq-len must be positive, got {args.batch_size} and {args.seq_len}")
    model = _build_from_config(args.config, device=args.device, dtype=_dtype(args.dtype))
    attention = None if args.attention.lower() == "none" else args.attention
    quant = None if args.quant.lower() == "none" else args.quant
    try:
        memopt.apply(model, checkpoint=_checkpoint_arg(args.checkpoint), attention=attention, quant=quant,
                     lora=args.lora or None, loss=None if args.loss.lower() == "none" else args.loss)
        optimizer = memopt.optimizer(model, args.optimizer)
    except (ValueError, TypeError, NotImplementedError, ImportError) as exc:
        raise SystemExit(f"memopt: {exc}") from None
    vocab = getattr(model.config, "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
    model.train()

    def step() -> None:
        try:
            out = model(input_ids=ids, labels=ids)
        except (TypeError, ValueError):  # a bare AutoModel takes no labels
            out = model(input_ids=ids)
        step_loss(out).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state exists in the tracked step, as in any step after the first
    with memopt.track(model, optimizer) as tracker:
        for _ in range(args.steps):
            step()
    report = tracker.report()
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print(report.to_json())
    elif args.csv:
        print(report.to_csv(), end="")
    else:
        print(report.table(depth=args.depth))
    return 0


def _estimate_kwargs(args: argparse.Namespace) -> dict:
    return dict(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, device=args.device,
                world_size=args.world_size)


def _fail(exc: Exception) -> SystemExit:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SystemExit(f"memopt: {msg}")


def _estimate(args: argparse.Namespace) -> int:
    import memopt

    try:
        est = memopt.estimate(
            args.config, optimizer=args.optimizer, mode=args.mode, checkpoint=_checkpoint_arg(args.checkpoint),
            attention=None if args.attention.lower() == "none" else args.attention,
            quant=None if args.quant.lower() == "none" else args.quant, lora=args.lora or None,
            loss=None if args.loss.lower() == "none" else args.loss, **_estimate_kwargs(args),
        )
        fits = None if args.budget is None else est.fits(args.budget)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        raise _fail(exc) from None
    if args.json:
        d = est.to_dict()
        d.pop("report")
        if fits is not None:
            d["fits"] = fits
        print(json.dumps(d, indent=1))
    else:
        print(est)
        if fits is not None:
            print(f"fits {args.budget}: {'yes' if fits else 'no'}")
    return 0


def _plan_generate(args: argparse.Namespace) -> int:
    """``memopt plan CONFIG --mode generate``: how many sequences of --seq-len fit --budget, and how."""
    import memopt

    kinds = None if args.kv_cache is None else [k.strip() for k in args.kv_cache.split(",") if k.strip()]
    kv_heads = None if args.kv_heads is None else [int(k) for k in args.kv_heads.split(",")]
    try:
        result = memopt.plan(args.config, args.budget, mode="generate", seq_len=args.seq_len, dtype=args.dtype,
                             device=args.device, new_tokens=args.new_tokens, sequences=args.sequences,
                             kv_caches=kinds, allow_quant=not args.no_quant, kv_heads=kv_heads,
                             page_size=args.page_size, device_memory=args.device_memory)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        raise _fail(exc) from None
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0 if result.fits else 2


def _plan(args: argparse.Namespace) -> int:
    import memopt

    if args.mode == "generate":
        return _plan_generate(args)
    try:
        result = memopt.plan(args.config, args.budget, allow_lora=not args.no_lora, **_estimate_kwargs(args))
    except (FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        raise _fail(exc) from None
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0 if result.fits else 2


def _add_technique_args(p: argparse.ArgumentParser, optimizers: str) -> None:
    """What `memopt.apply` takes, as `report` and `estimate` spell it."""
    p.add_argument("--checkpoint", default="none", help="full | selective | offload | N | none (default: none)")
    p.add_argument("--attention", default="sdpa", help="sdpa | none (default: sdpa)")
    p.add_argument("--quant", default="none", help="4bit | nf4 | fp4 | 8bit | none (default: none)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (default: no LoRA)")
    p.add_argument("--loss", default="none", help="chunked | none (default: none)")
    p.add_argument("--optimizer", default="adamw", help=f"{optimizers} (default: adamw)")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="path to a transformers config.json (or its folder)")
    p.add_argument("--batch-size", type=int, default=1, help="per device (default: 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="default: 2048")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default: bfloat16)")
    p.add_argument("--device", default="cuda", help="cuda | cpu: whose allocator to count as (default: cuda)")
    p.add_argument("--world-size", type=int, default=1, help="FSDP2 ranks; the estimate is per rank (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memopt", description="Make PyTorch training fit in memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what memopt.apply would do to a model built from a local config.json")
    p.add_argument("config", help="path to a transformers config.json (or its folder)")
    p.add_argument("--checkpoint", default="full", help="full | selective | offload | N | none (default: full)")
    p.add_argument("--attention", default="sdpa", help="sdpa | none (default: sdpa)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("report", help="one real training step of a model built from a local config.json, with the "
                                      "per-layer memory report")
    p.add_argument("config", help="path to a transformers config.json (or its folder)")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    _add_technique_args(p, optimizers="adamw | adamw8bit | paged_adamw8bit")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=1, help="tracked steps after the warm-up (default: 1)")
    p.add_argument("--depth", type=int, default=None, help="fold the table to this module depth")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--csv", action="store_true", help="print one CSV row per layer")
    p.add_argument("--plot", metavar="PNG", help="also write the plot to this file (needs matplotlib)")
    p.set_defaults(run=_report)

    p = sub.add_parser("estimate", help="predict a training step's peak memory without allocating (fake tensors)")
    _add_shape_args(p)
    _add_technique_args(p, optimizers="adamw | adamw8bit | paged_adamw8bit | sgd")
    p.add_argument("--mode", default="train", help="train | generate (default: train)")
    p.add_argument("--budget", default=None, help="also say whether it fits, e.g. 24GiB")
    p.set_defaults(run=_estimate)

    p = sub.add_parser("plan", help="the cheapest memopt options whose estimated peak fits a budget")
    _add_shape_args(p)
    p.add_argument("--budget", required=True, help="device memory, e.g. 24GiB or 80GB")
    p.add_argument("--no-lora", action="store_true", help="only options that train every weight (no quant + LoRA)")
    g = p.add_argument_group("--mode generate: sequences of --seq-len tokens at once, the KV cache and vLLM settings")
    g.add_argument("--mode", default="train", choices=("train", "generate"), help="default: train")
    g.add_argument("--new-tokens", type=int, default=None, help="generated tokens per sequence (default seq-len/4)")
    g.add_argument("--sequences", type=int, default=None, help="target: this many sequences at once")
    g.add_argument("--kv-cache", default=None, help="cache kinds to consider, comma-separated: dynamic,paged,fp8,"
                                                    "int4,int2,offloaded (default: all but offloaded)")
    g.add_argument("--kv-heads", default=None, help="key/value head counts the model may be converted to, e.g. 8,4")
    g.add_argument("--no-quant", action="store_true", help="keep the weights in --dtype (no 8/4-bit weights)")
    g.add_argument("--page-size", type=int, default=16, help="paged cache block size (default 16, vLLM's)")
    g.add_argument("--device-memory", default=None, help="the device's memory, for vLLM's gpu_memory_utilization")
    p.set_defaults(run=_plan)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
