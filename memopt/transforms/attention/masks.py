"""One float mask per forward for transformers layers, where that is exactly what SDPA would have made.

SDPA turns a bool attn_mask into an additive float mask inside every call, and the fused kernels keep that copy for
backward: one (batch, 1, seq, seq) tensor per layer. Converting each of the model's bool masks once per forward,
before the layers see it, leaves one copy per distinct mask that all layers share. Models that alternate masks
(sliding-window and full layers) keep one per kind.

That is only exact where the layer hands its bool mask to SDPA unchanged (a slice of it at most). A model that builds
something else from it (T5 family: ``where(mask, position_bias, min)`` for a bool mask, ``position_bias + mask`` for a
float one) would compute other numbers. So the first forward that hands a layer a bool mask runs as is and checks,
under a `TorchFunctionMode`, that the mask reaches `scaled_dot_product_attention` as its attn_mask; sharing starts
with the next forward only if it did (the verdict waits for the next forward so that checkpointing's recompute of
this step sees what its forward saw). Under torch.compile the layers run as is: the graph converts the mask.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..._patch import ForwardPatch


class SharedMask:
    """One per transformers model: the verdict (None = not checked yet) and the float masks of this forward."""

    def __init__(self) -> None:
        self.ok: bool | None = None
        self.verdict: bool | None = None  # found during a forward; `ok` takes it at the next forward's start
        self.slots: list[tuple[weakref.ref, weakref.ref]] = []  # (bool mask, its float version)

    def __getstate__(self) -> dict:
        return {"ok": self.ok, "verdict": self.verdict}  # weak references do not pickle; a new forward makes masks

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.ok, self.verdict = state["ok"], state["verdict"]

    def new_forward(self) -> None:
        if self.ok is None and self.verdict is not None:
            self.ok = self.verdict

    def float_of(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self.slots = [(m, f) for m, f in self.slots if m() is not None and f() is not None]
        for m, f in self.slots:
            if m() is mask and f().dtype == dtype:
                return f()
        # (batch, 1, T, S): 0 where attended, -inf where masked, as aten's convert_boolean_attn_mask makes it
        float_mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        self.slots.append((weakref.ref(mask), weakref.ref(float_mask)))
        return float_mask


class _ReachesSdpa(TorchFunctionMode):
    """Whether `mask` (or a view of it) is what SDPA gets as attn_mask, and nothing else is."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask
        self.reached = 0
        self.other = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            given = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            if given is self.mask or (isinstance(given, torch.Tensor) and given._base is self.mask):
                self.reached += 1
            elif given is not None:
                self.other += 1
        return func(*args, **kwargs)


class MaskShare(ForwardPatch):
    """On each transformers layer of a model switched to SDPA: its bool attention mask becomes the shared float one
    (see the module docstring)."""

    rank = 10  # inside checkpointing, so the recompute makes the same substitution

    def __init__(self, module: nn.Module, inner: Callable | None, shared: SharedMask, index: int | None):
        super().__init__(module, inner)
        self.shared = shared
        self.index = index  # the position of attention_mask in forward's arguments (self excluded)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shared = self.shared
        if shared.ok is False or torch.compiler.is_compiling():
            return self.call_inner(*args, **kwargs)
        positional = self.index is not None and len(args) > self.index
        mask = args[self.index] if positional else kwargs.get("attention_mask")
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not isinstance(hidden, torch.Tensor)
                or not hidden.is_floating_point()):
            return self.call_inner(*args, **kwargs)
        if shared.ok is None:
            if shared.verdict is False:
                return self.call_inner(*args, **kwargs)
            with _ReachesSdpa(mask) as check:
                out = self.call_inner(*args, **kwargs)
            if check.other or not check.reached:
                shared.verdict = False
            elif shared.verdict is None:
                shared.verdict = True
            return out
        float_mask = shared.float_of(mask, hidden.dtype)
        if positional:
            args = (*args[: self.index], float_mask, *args[self.index + 1 :])
        else:
            kwargs = {**kwargs, "attention_mask": float_mask}
        return self.call_inner(*args, **kwargs)
