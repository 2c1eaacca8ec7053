"""memopt.optimizer: an optimizer over the trainable parameters only, with bitsandbytes 8-bit state where asked."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn


def _adamw(params: list, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **kwargs)


def _adamw8bit(params: list, **kwargs: Any) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, **kwargs)


def _paged_adamw8bit(params: list, **kwargs: Any) -> torch.optim.Optimizer:
    if not all(p.is_cuda for p in params):
        raise ValueError(
            "optimizer='paged_adamw8bit' pages its state through CUDA unified memory, so it needs the parameters on a "
            "CUDA device; on CPU use 'adamw8bit'"
        )
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, **kwargs)


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "paged_adamw8bit": _paged_adamw8bit,
}


def optimizer(model: nn.Module, name: str = "adamw", **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over `model`'s trainable parameters only (frozen and quantized weights get no state).

    Args:
        model: the model, after `memopt.apply`.
        name: ``"adamw"`` (torch AdamW: 8 bytes of state per trainable parameter in fp32), ``"adamw8bit"``
            (bitsandbytes: 2 bytes per parameter plus block statistics, same update quality in practice),
            ``"paged_adamw8bit"`` (the same, paged through CUDA unified memory to survive memory spikes; CUDA only).
        **kwargs: passed to the optimizer (lr, weight_decay, betas, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.optimizer expects an nn.Module, got {type(model).__name__}")
    if name not in _OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not supported; use {', '.join(map(repr, _OPTIMIZERS))}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: quantized weights are frozen; add lora=r to train")
    if name != "adamw":
        from .transforms.quant import require_bitsandbytes

        require_bitsandbytes(f"optimizer={name!r}")
    return _OPTIMIZERS[name](params, **kwargs)
