"""Which SDPA kernel ran, over a model's first forwards; and the start of each forward for the shared masks.

`FirstForwards` sits on the model's own forward (outermost of memopt's patches). Over the first two eager forwards
it runs a `TorchDispatchMode` counting the SDPA kernels (`memopt.applied(model)`, technique "attention:backend") and a
`TorchFunctionMode` that warns once, with PyTorch's reasons, when a call fell back to the math kernel (which does
materialise the N x N matrix). Both are context managers: an exception, KeyboardInterrupt included, leaves no mode
behind. Under torch.compile it steps aside: the kernels are Inductor's choice, made inside the graph.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..._log import warn_once
from ..._modules import compiled_parts
from ..._patch import ForwardPatch
from ..._record import Applied

_BACKEND_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "_scaled_dot_product_fused_attention_overrideable": "fused",
}
PROBED_FORWARDS = 2


class _KernelSpy(TorchDispatchMode):
    """Counts the SDPA kernels that run. The math fall-back is recognised by `aten._safe_softmax`, which only SDPA's
    math path calls (a user's softmax is `aten._softmax`)."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        kernel = _BACKEND_OPS.get(name) or ("math" if name == "_safe_softmax" else None)
        if kernel is not None:
            self.counts[kernel] = self.counts.get(kernel, 0) + 1
        return func(*args, **(kwargs or {}))


_RUNNING: list["FirstForwards"] = []  # probes whose forward runs now


def sdpa(args: tuple, kwargs: dict, func: Callable = F.scaled_dot_product_attention) -> Any:
    """`func(*args, **kwargs)` (an SDPA call); while a probe runs, a call that took the math kernel says why, once.
    For SDPA calls memopt makes itself (hand-written attention), which no TorchFunctionMode of the probe sees: they
    run inside the op that triggered them."""
    probe = _RUNNING[-1] if _RUNNING else None
    if probe is None or torch.compiler.is_compiling():
        return func(*args, **kwargs)
    before = probe.counts.get("math", 0)
    out = func(*args, **kwargs)
    if probe.counts.get("math", 0) > before:
        _warn_math(type(probe.module).__name__, args, kwargs)
    return out


class _MathWatch(TorchFunctionMode):
    """Around direct calls of F.scaled_dot_product_attention: when one ran the math kernel, says why, once."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return sdpa(args, kwargs, func)


class FirstForwards(ForwardPatch):
    """The model's forward: probes the SDPA kernels on the first forwards, starts each forward for the shared masks."""

    rank = 200  # outermost: the probe sees everything the forward runs

    def __init__(self, module: nn.Module, inner: Callable | None, record: Applied | None, masks: list):
        super().__init__(module, inner)
        self.record = record  # None: no probing (AttentionConfig(report_backend=False))
        self.masks = masks  # the shared masks of the transformers models inside (see masks.py)
        self.forwards_left = PROBED_FORWARDS if record is not None else 0
        self.counts: dict[str, int] = {}
        self.running = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or self.running:
            return self.call_inner(*args, **kwargs)
        for shared in self.masks:
            shared.new_forward()
        if self.forwards_left <= 0:
            return self.call_inner(*args, **kwargs)
        compiled = compiled_parts(self.module)
        if compiled:  # a dispatch mode would make torch.compile run those modules' eager code: no probing
            self.forwards_left = 0
            self.record.set("attention:backend", "", "skipped", "SDPA kernels not probed: parts of the model are "
                            f"compiled with torch.compile ({', '.join(n or '<root>' for n in compiled[:3])}), and "
                            "the kernels there are Inductor's choice")
            return self.call_inner(*args, **kwargs)
        self.running = True
        _RUNNING.append(self)
        try:
            with _KernelSpy(self.counts), _MathWatch():
                return self.call_inner(*args, **kwargs)
        finally:
            _RUNNING.remove(self)
            self.running = False
            self.forwards_left -= 1
            detail = ", ".join(f"{k} x{v}" for k, v in sorted(self.counts.items())) or "none ran"
            if self.counts.get("math"):
                detail += " (math materialises the N x N matrix)"
            self.record.set("attention:backend", "", "applied", f"SDPA kernels seen in the first forwards: {detail}")


def _warn_math(where: str, args: tuple, kwargs: dict) -> None:
    q = args[0] if args else kwargs.get("query")
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    reasons = _math_reasons(args, kwargs) if q.is_cuda else []
    if not q.is_cuda and dropout:
        reasons.append("the CPU flash kernel takes no dropout: set the attention dropout to 0")
    if not q.is_cuda and isinstance(mask, torch.Tensor) and mask.requires_grad:
        reasons.append("the attn_mask requires grad (a learned position bias, as in T5), which no CPU fused kernel "
                       "differentiates")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype} has no fused kernel")
    if mask is not None and q.is_cuda:
        reasons.append("an explicit attn_mask rules out the flash kernel: pass is_causal=True instead of a causal mask")
    why = "; ".join(reasons) or "no fused kernel accepted these inputs"
    warn_once(
        f"sdpa-math-{where}",
        f"scaled_dot_product_attention fell back to the math kernel in {where}, which materialises the "
        f"(batch, heads, seq, seq) attention matrix: {why}",
    )


def _math_reasons(args: tuple, kwargs: dict) -> list[str]:
    """Why PyTorch's CUDA kernels refused these inputs, in PyTorch's own words."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        values = [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]
        params = SDPAParams(*values[:3], values[3], values[4] or 0.0, bool(values[5]), bool(kwargs.get("enable_gqa")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            can_use_flash_attention(params, True)
            can_use_efficient_attention(params, True)
        return [str(w.message).strip() for w in caught]
    except Exception as exc:  # the introspection API changes between releases; the warning must not fail
        return [f"(could not ask PyTorch why: {type(exc).__name__})"]
