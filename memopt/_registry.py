"""A small registry of transforms keyed by config type (torchao's `register_quantize_module_handler` idea).

A technique is one file in `memopt/transforms/` and one `@register_transform(ConfigType, ...)` on its apply function.
`memopt.apply` runs the registered transforms in ascending `order`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ._record import Entry


@dataclass(frozen=True)
class Transform:
    technique: str  # the name `memopt.applied` files its entries under
    order: int  # position in `memopt.apply`'s fixed order (lower runs first)
    plan: Callable[[nn.Module, Any], Any]  # checks the config against the model; must not change the model
    apply: Callable[[nn.Module, Any, Any], list[Entry]]  # (model, config, plan) -> entries; changes the model
    remove: Callable[[nn.Module], None] | None  # undoes `apply`, if the technique can be undone
    # (model, config, plan, [(other config, other plan)] of the same `apply` call): raises if the other
    # techniques would change what this plan relies on (a head that quantization would swap, say)
    check: Callable[[nn.Module, Any, Any, list[tuple[Any, Any]]], None] | None = None


_TRANSFORMS: dict[type, Transform] = {}


def register_transform(
    config_type: type,
    *,
    technique: str,
    order: int,
    plan: Callable[[nn.Module, Any], Any],
    remove: Callable[[nn.Module], None] | None = None,
    check: Callable[[nn.Module, Any, Any, list[tuple[Any, Any]]], None] | None = None,
) -> Callable:
    def decorator(apply_fn: Callable[[nn.Module, Any, Any], list[Entry]]) -> Callable:
        _TRANSFORMS[config_type] = Transform(technique, order, plan, apply_fn, remove, check)
        return apply_fn

    return decorator


def transform_for(config: Any) -> Transform:
    return _TRANSFORMS[type(config)]


def transforms() -> list[Transform]:
    return sorted(_TRANSFORMS.values(), key=lambda t: t.order)
