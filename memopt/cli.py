"""memopt's command line: thin argparse over the library.

    memopt inspect CONFIG.json [--checkpoint full|selective|offload|N] [--attention sdpa|none]

`inspect` builds the model from a local transformers config.json on the meta device (no weights, no memory, no
download), applies memopt and prints what it did to each layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _checkpoint_arg(value: str) -> Any:
    if value.isdigit():
        return int(value)
    return {"none": None, "true": True}.get(value.lower(), value)


def _build_from_config(path: str):
    import torch
    import transformers

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"memopt: config file not found: {path}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(p.parent if p.name == "config.json" else p))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise SystemExit(f"memopt: could not read a transformers config from {path}: {exc}") from None
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
    auto = (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel)
    with torch.device("meta"):
        for cls in auto:
            try:
                return cls.from_config(config)
            except ValueError:
                continue
    raise SystemExit(f"memopt: no transformers model class builds from {path} ({type(config).__name__})")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memopt", description="Make PyTorch training fit in memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what memopt.apply would do to a model built from a local config.json")
    p.add_argument("config", help="path to a transformers config.json (or its folder)")
    p.add_argument("--checkpoint", default="full", help="full | selective | offload | N | none (default: full)")
    p.add_argument("--attention", default="sdpa", help="sdpa | none (default: sdpa)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
