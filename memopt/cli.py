"""memopt's command line: thin argparse over the library.

    memopt inspect CONFIG.json [--checkpoint full|selective|offload|N] [--attention sdpa|none]
    memopt report CONFIG.json --batch-size B --seq-len S [--precision P] [--checkpoint ...] [--quant ...] [--lora R]
                  [--loss chunked] [--json | --csv | --plot out.png]

    memopt estimate CONFIG.json --batch-size 1 --seq-len 2048 [--precision bf16-mixed] [--checkpoint full]
                    [--quant 4bit] [--lora 16] [--optimizer adamw] [--device cuda] [--world-size N]
                    [--mode train|generate] [--budget 24GiB] [--json]
    memopt plan CONFIG.json --budget 24GiB --batch-size 1 --seq-len 2048 [--precision bf16-mixed,bf16-true]
                [--optimizer adamw,adamw8bit] [--headroom 0.1] [--no-lora] [--json]
    memopt plan CONFIG.json --mode generate --budget 24GiB --seq-len 8192 [--new-tokens N] [--sequences N]
                [--kv-cache dynamic,paged,fp8,int4,int2,offloaded] [--kv-heads 8] [--no-quant] [--json]

`inspect` builds the model from a local transformers config (a JSON file of any name, or a folder holding a
config.json) on the meta device (no weights, no memory, no download), applies memopt and prints what it did to each
layer. `report` builds it for real (random weights), applies memopt, runs a warm-up training step (so the optimizer
state exists) and one tracked step on random tokens, and prints the per-layer memory report. `estimate` predicts the
peak of a training step (or of generation) on fake tensors, without allocating; `plan` finds the cheapest memopt
options that fit a budget.

Precision (`memopt.precision`): ``--precision`` names it (32-true, bf16-mixed, 16-mixed, bf16-true, 16-true);
``--dtype`` alone names the parameters' dtype, as its "-true" precision; both must agree. Neither: "bf16-mixed" for
estimate and plan (the recipe most fine-tunes run: float32 weights and AdamW state, bf16 autocast; "bf16-true" for
``estimate --mode generate``), "32-true" for report (a CPU step). Bad input exits with status 1 and one line on stderr, ``memopt: ...`` (set
``MEMOPT_TRACEBACK=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# what a user's bad input raises, anywhere below: one line, exit status 1
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError, NotImplementedError, KeyError)


def _checkpoint_arg(value: str) -> Any:
    if value.isdigit():
        return int(value)
    return {"none": None, "true": True}.get(value.lower(), value)


def _none(value: str) -> Any:
    return None if value.lower() == "none" else value


def _build_from_config(path: str, device: str = "meta", dtype=None):
    from .estimation import build_model, load_config

    return build_model(load_config(path), device, dtype)


def _inspect(args: argparse.Namespace) -> int:
    import memopt

    model = _build_from_config(args.config)
    memopt.apply(model, checkpoint=_checkpoint_arg(args.checkpoint), attention=_none(args.attention))
    record = memopt.applied(model)
    print(json.dumps(record.to_dict(), indent=2) if args.json else record)
    return 0


def _dtype(name: str | None):
    if name is None:
        return None
    from .precision import dtype_from_name

    try:
        return dtype_from_name(name)
    except ValueError:
        raise SystemExit(f"memopt: --dtype {name!r} is not supported; use float32, bfloat16 or float16") from None


def _precision(args: argparse.Namespace, default: str):
    """The run's `Precision` from --precision / --dtype (see the module docstring)."""
    from .precision import resolve_precision

    dtype = _dtype(args.dtype)
    if args.precision is None and dtype is None:
        return resolve_precision(default)[0]
    return resolve_precision(args.precision, dtype)[0]


def _check_device(device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"memopt: --device {device!r} is not supported; use cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"memopt: --device {device}: CUDA is not available here (torch {torch.__version__}); "
                         "use --device cpu")


def _check_output(path: str | None, flag: str) -> None:
    if path is None:
        return
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise SystemExit(f"memopt: {flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"memopt: {flag} {path}: the folder {folder} is not writable")


def _report(args: argparse.Namespace) -> int:
    import torch

    import memopt
    from memopt.estimation import step_loss

    if args.batch_size < 1 or args.seq_len < 1:
        raise SystemExit(f"memopt: --batch-size and --seq-len must be positive, got {args.batch_size} and {args.seq_len}")
    if args.steps < 1:
        raise SystemExit(f"memopt: --steps {args.steps} must be at least 1")
    if args.depth is not None and args.depth < 0:
        raise SystemExit(f"memopt: --depth {args.depth} must be >= 0 (0 folds the model into one row, 3 gives one row "
                         "per block of a transformers model)")
    _check_device(args.device)
    _check_output(args.plot, "--plot")  # before the step, not after it
    precision = _precision(args, "32-true")
    model = _build_from_config(args.config, device=args.device, dtype=precision.param_dtype)
    memopt.apply(model, checkpoint=_checkpoint_arg(args.checkpoint), attention=_none(args.attention),
                 quant=_none(args.quant), lora=args.lora or None, loss=_none(args.loss))
    optimizer = memopt.optimizer(model, args.optimizer)
    device_type = torch.device(args.device).type
    scaler = precision.scaler(device_type)
    vocab = getattr(model.config, "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
    model.train()

    def step() -> None:
        with precision.autocast(device_type):
            try:
                out = model(input_ids=ids, labels=ids)
            except (TypeError, ValueError):  # a bare AutoModel takes no labels
                out = model(input_ids=ids)
            loss = step_loss(out)
        del out
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer state exists in the tracked step, as in any step after the first
    with memopt.track(model, optimizer) as tracker:
        for _ in range(args.steps):
            step()
    report = tracker.report()
    report.notes.append(f"precision {precision.name!r}: {precision.summary}")
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
    return dict(batch_size=args.batch_size, seq_len=args.seq_len, device=args.device, world_size=args.world_size)


def _fail(exc: BaseException) -> SystemExit:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    msg = text.splitlines()[0].strip() if text else type(exc).__name__
    return SystemExit(f"memopt: {msg}")


def _estimate(args: argparse.Namespace) -> int:
    import memopt

    # training: float32 master weights with bf16 autocast, the usual recipe; generation has no master weights
    precision = _precision(args, "bf16-true" if args.mode == "generate" else "bf16-mixed")
    est = memopt.estimate(
        args.config, optimizer=args.optimizer, mode=args.mode, checkpoint=_checkpoint_arg(args.checkpoint),
        attention=_none(args.attention), quant=_none(args.quant), lora=args.lora or None, loss=_none(args.loss),
        precision=precision.name, **_estimate_kwargs(args), **_optimizer_kwargs(args),
    )
    fits = None if args.budget is None else est.fits(args.budget)
    if args.json:
        d = est.to_dict()
        d.pop("report")
        if fits is not None:
            d["fits"] = fits
        print(json.dumps(d, indent=1))
    else:
        print(est)
        if fits is not None:
            print(f"fits {args.budget}: {'yes' if fits else 'no'} (no headroom: `memopt plan` keeps some)")
    return 0


def _optimizer_kwargs(args: argparse.Namespace) -> dict:
    """The training flags of `estimate` (left out with --mode generate, where they mean nothing)."""
    if args.mode == "generate":
        used = [f for f, on in (("--in-backward", args.in_backward), ("--cpu-offload", args.cpu_offload),
                                ("--offload", args.offload)) if on]
        if used:
            raise SystemExit(f"memopt: {', '.join(used)}: training flags; --mode generate has no optimizer step")
        return {}
    return {k: True for k, on in (("in_backward", args.in_backward), ("cpu_offload", args.cpu_offload),
                                  ("offload", args.offload)) if on}


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _headroom(value: str | None) -> Any:
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        return value  # a size: 2GiB
    return f if f < 1 else int(f)


def _plan_generate(args: argparse.Namespace) -> int:
    """``memopt plan CONFIG --mode generate``: how many sequences of --seq-len fit --budget, and how."""
    import memopt

    if args.headroom is not None:
        raise SystemExit("memopt: --headroom is for training plans; with --mode generate pass the budget less the "
                         "headroom you want")
    names = _list(args.precision)
    if names is not None and len(names) > 1:
        raise SystemExit(f"memopt: --precision {args.precision!r}: --mode generate runs in one precision; name one")
    args.precision = names[0] if names else None
    precision = _precision(args, "bf16-true")
    if precision.mixed:
        raise SystemExit(f"memopt: --precision {precision.name}: mixed precision's float32 master weights are for "
                         f"training; generation runs in one dtype: use --precision "
                         f"{precision.name.replace('-mixed', '-true')}")
    kinds = _list(args.kv_cache)
    try:
        kv_heads = None if args.kv_heads is None else [int(k) for k in args.kv_heads.split(",")]
    except ValueError:
        raise SystemExit(f"memopt: --kv-heads {args.kv_heads!r}: give key/value head counts, e.g. 8 or 8,4") from None
    result = memopt.plan(args.config, args.budget, mode="generate", seq_len=args.seq_len,
                         dtype=precision.param_dtype, device=args.device, new_tokens=args.new_tokens,
                         sequences=args.sequences, kv_caches=kinds, allow_quant=not args.no_quant, kv_heads=kv_heads,
                         page_size=args.page_size, device_memory=args.device_memory)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result)
    return 0 if result.fits else 2


def _plan(args: argparse.Namespace) -> int:
    import memopt

    if args.mode == "generate":
        return _plan_generate(args)
    from .precision import resolve_precision

    dtype = _dtype(args.dtype)
    names = _list(args.precision)
    if names is None:
        names = [resolve_precision(None, dtype)[0].name] if dtype is not None else ["bf16-mixed"]
    elif dtype is not None:
        for name in names:
            resolve_precision(name, dtype)  # raises naming both when they disagree
    kwargs: dict[str, Any] = dict(precision=names)
    if args.optimizer is not None:
        kwargs["optimizer"] = _list(args.optimizer)
    if args.in_backward is not None:
        kwargs["in_backward"] = args.in_backward == "yes"
    result = memopt.plan(args.config, args.budget, allow_lora=not args.no_lora, headroom=_headroom(args.headroom),
                         **kwargs, **_estimate_kwargs(args))
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


def _optimizer_names() -> str:
    from .optim import OPTIMIZERS

    return " | ".join(OPTIMIZERS)


def _planned_names() -> str:
    from .estimation import OPTIMIZERS

    return ", ".join(name for name, spec in OPTIMIZERS.items() if spec.plan)


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    """`memopt.optimizer`'s flags and activation offloading, as `estimate` takes them."""
    p.add_argument("--in-backward", action="store_true",
                   help="the optimizer step fused into backward (memopt.optimizer(..., in_backward=True)): gradients "
                        "freed as they are applied")
    p.add_argument("--cpu-offload", action="store_true",
                   help="the optimizer state in host memory (memopt.optimizer(..., cpu_offload=True)); CUDA only")
    p.add_argument("--offload", action="store_true",
                   help="activation offloading (memopt.apply(..., offload=True)): CUDA only; with --device cpu it "
                        "does nothing")


def _add_precision_args(p: argparse.ArgumentParser, default: str, many: bool = False) -> None:
    what = "precisions the plan may choose, preferred first, comma-separated" if many else "the training precision"
    p.add_argument("--precision", default=None,
                   help=f"{what}: 32-true | bf16-mixed | 16-mixed | bf16-true | 16-true (default: {default}, or the "
                        "'-true' precision of --dtype)")
    p.add_argument("--dtype", default=None, help="the parameters' dtype (float32 | bfloat16 | float16); alone: its "
                                                 "'-true' precision; with --precision it must agree")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a transformers config JSON file (any name) or a folder holding config.json")
    p.add_argument("--batch-size", type=int, default=1, help="per device (default: 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="default: 2048")
    p.add_argument("--device", default="cuda", help="cuda | cpu: whose allocator to count as (default: cuda)")
    p.add_argument("--world-size", type=int, default=1, help="FSDP2 ranks; the estimate is per rank (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memopt", description="Make PyTorch training fit in memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what memopt.apply would do to a model built from a local config")
    p.add_argument("config", help="a transformers config JSON file (any name) or a folder holding config.json")
    p.add_argument("--checkpoint", default="full", help="full | selective | offload | N | none (default: full)")
    p.add_argument("--attention", default="sdpa", help="sdpa | none (default: sdpa)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("report", help="one real training step of a model built from a local config, with the "
                                      "per-layer memory report")
    p.add_argument("config", help="a transformers config JSON file (any name) or a folder holding config.json")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    _add_technique_args(p, optimizers="adamw | adamw8bit | paged_adamw8bit")
    _add_precision_args(p, "32-true")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=1, help="tracked steps after the warm-up (default: 1)")
    p.add_argument("--depth", type=int, default=None, help="fold the table to this module depth (>= 0)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report as JSON")
    fmt.add_argument("--csv", action="store_true", help="print one CSV row per layer")
    p.add_argument("--plot", metavar="PNG", help="also write the plot to this file (needs matplotlib)")
    p.set_defaults(run=_report)

    p = sub.add_parser("estimate", help="predict a training step's peak memory without allocating (fake tensors)")
    _add_shape_args(p)
    _add_precision_args(p, "bf16-mixed")
    _add_technique_args(p, optimizers=_optimizer_names())
    _add_optimizer_flags(p)
    p.add_argument("--mode", default="train", help="train | generate (default: train)")
    p.add_argument("--budget", default=None, help="also say whether it fits, e.g. 24GiB")
    p.set_defaults(run=_estimate)

    p = sub.add_parser("plan", help="the cheapest memopt options whose estimated peak fits a budget")
    _add_shape_args(p)
    _add_precision_args(p, "bf16-mixed", many=True)
    p.add_argument("--budget", required=True, help="device memory, e.g. 24GiB or 80GB")
    p.add_argument("--optimizer", default=None, help="the optimizers the plan may choose, comma-separated "
                                                     f"(default: every one the planner searches: {_planned_names()})")
    p.add_argument("--in-backward", default=None, choices=("yes", "no"),
                   help="yes: only plans with the optimizer step in backward; no: only plans without it (default: "
                        "both searched)")
    p.add_argument("--headroom", default=None, help="what a plan leaves free: a fraction of the budget (0.1) or a "
                                                    "size (2GiB); default 10%% of the budget + 0.5 GiB on CUDA")
    p.add_argument("--no-lora", action="store_true", help="only options that train every weight (no LoRA)")
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
    try:
        return args.run(args)
    except _USER_ERRORS as exc:
        if os.environ.get("MEMOPT_TRACEBACK"):
            raise
        raise _fail(exc) from None
    except MemoryError:
        raise SystemExit("memopt: out of host memory (MemoryError); try a smaller --batch-size/--seq-len") from None
    except RuntimeError as exc:  # torch's out-of-memory errors; anything else is a bug worth its traceback
        if "out of memory" not in str(exc).lower() or os.environ.get("MEMOPT_TRACEBACK"):
            raise
        raise _fail(exc) from None


if __name__ == "__main__":
    sys.exit(main())
