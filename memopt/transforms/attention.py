"""attention='sdpa': every attention in the model through `torch.nn.functional.scaled_dot_product_attention`.

Eager attention keeps the (batch, heads, seq, seq) probabilities for backward: O(N^2) memory per layer. SDPA's fused
kernels (flash, memory-efficient, cuDNN, CPU flash) recompute them in backward from q, k, v and a (batch, heads, seq)
log-sum-exp instead: the FlashAttention idea, same result, O(N) extra memory.

What gets converted, by kind of attention:
- transformers models: switched to transformers' own SDPA implementation (`set_attn_implementation("sdpa")`) when the
  architecture has one; an architecture without one keeps eager attention, with a warning naming its class.
- `nn.MultiheadAttention`: called with `need_weights=False`, which is its SDPA path. Callers that relied on the default
  `need_weights=True` get `None` as the weights (the second element of the returned tuple).
- Classes taught with `memopt.register_attention(cls, fn)`: `fn(module, *args, **kwargs)` becomes their forward.
- Hand-written attention in other modules (a forward that calls softmax): while such a module runs, memopt watches
  its tensor ops; `softmax(q @ k.transpose(-2, -1) * scale [+ mask | .masked_fill(mask, -inf)]) [dropout] @ v`
  is computed as one SDPA call instead, without materialising the scores. Anything else done to the scores (another
  op, returning them) computes them for real, exactly as written, and the reason is recorded. Dropout inside the
  converted attention draws its mask in SDPA, so with dropout > 0 training results differ from eager by the random
  draw (not in distribution).

Which SDPA kernel ran is recorded on the first forwards (`memopt.applied(model)`, technique "attention:backend"); a
fall-back to the math kernel, which does materialise the N x N matrix, is warned about once with the reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from .._log import logger, warn_once
from .._modules import is_inside, hf_layers, outermost, transformers_class
from .._patch import ForwardPatch, find, install, uninstall
from .._record import Applied, Entry, record_of
from .._registry import register_transform
from ..config import AttentionConfig

# ----------------------------------------------------------------------------------------------------------------
# register_attention


_REGISTERED: dict[type, Callable] = {}


def register_attention(module_cls: type, fn: Callable) -> None:
    """Teach memopt an attention module: `fn(module, *args, **kwargs)` replaces its forward under `attention="sdpa"`.

    `fn` receives the module and the forward's arguments and must return what the module's forward returns,
    computing attention with `torch.nn.functional.scaled_dot_product_attention`. Subclasses match too.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"register_attention expects an nn.Module subclass, got {module_cls!r}")
    if not callable(fn):
        raise TypeError(f"register_attention expects fn(module, *args, **kwargs), got {fn!r}")
    _REGISTERED[module_cls] = fn


def _registered_fn(module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    return None


class _Registered(ForwardPatch):
    def __init__(self, module: nn.Module, inner: Callable | None, fn: Callable):
        super().__init__(module, inner)
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention


_NEED_WEIGHTS_INDEX = 4  # forward(query, key, value, key_padding_mask, need_weights, ...)


class _MultiheadSdpa(ForwardPatch):
    """`need_weights=False` is nn.MultiheadAttention's SDPA path; the weights come back as None."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > _NEED_WEIGHTS_INDEX:
            args = (*args[:_NEED_WEIGHTS_INDEX], False, *args[_NEED_WEIGHTS_INDEX + 1 :])
        else:
            kwargs["need_weights"] = False
        return self.call_inner(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Hand-written attention: scores are kept lazy until softmax(...) @ v can be one SDPA call.


@dataclass
class _Recipe:
    q: torch.Tensor  # (..., T, E)
    k: torch.Tensor  # (..., S, E)
    scale: float = 1.0
    attend: torch.Tensor | None = None  # bool, True = attend; from masked_fill(mask, -inf)
    bias: torch.Tensor | None = None  # additive float mask
    probs: bool = False  # softmax applied
    dropout_p: float = 0.0
    concrete: torch.Tensor | None = None  # computed for real (then every later op runs on it, as written)

    def scores_shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(self.q.shape[:-2], self.k.shape[:-2])
        return torch.Size((*batch, self.q.shape[-2], self.k.shape[-2]))  # (..., T, S)

    def materialise(self) -> torch.Tensor:
        """The scores (or probabilities) computed for real, with autograd, as the user's code would have."""
        if self.concrete is None:
            self.concrete = self._compute()
        return self.concrete

    def _compute(self) -> torch.Tensor:
        s = (self.q @ self.k.transpose(-2, -1)) * self.scale  # (..., T, S)
        if self.bias is not None:
            s = s + self.bias
        if self.attend is not None:
            s = s.masked_fill(~self.attend, float("-inf"))
        if self.probs:
            s = F.softmax(s, dim=-1)
            if self.dropout_p:
                s = F.dropout(s, self.dropout_p, training=True)
        return s

    def sdpa(self, v: torch.Tensor) -> torch.Tensor:
        q, k = self.q, self.k
        mask, is_causal = self.bias, False
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        if self.attend is not None:
            if mask is not None:
                mask = mask.masked_fill(~self.attend, float("-inf"))
            elif _is_causal(self.attend, q.shape[-2], k.shape[-2]):
                is_causal = True  # no mask tensor at all: lets CUDA use the flash kernel
            else:
                mask = self.attend
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p, is_causal=is_causal, scale=self.scale
        )


def _is_causal(attend: torch.Tensor, t: int, s: int) -> bool:
    if t != s or attend.shape[-2:] != (t, s) or is_fake(attend):  # fake tensors (estimate): no values to compare
        return False
    tril = torch.ones(t, s, dtype=torch.bool, device=attend.device).tril()
    return bool((attend == tril).all())


class _Lazy(torch.Tensor):
    """Attention scores not computed yet: shape, dtype and device of the real thing, plus the recipe."""

    recipe: _Recipe

    @staticmethod
    def __new__(cls, recipe: _Recipe) -> "_Lazy":
        q = recipe.q
        t = torch.Tensor._make_wrapper_subclass(cls, recipe.scores_shape(), dtype=q.dtype, device=q.device)
        t.recipe = recipe
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Reached only by an op outside the watching mode (scores kept past the module's forward): compute them.
        args, kwargs = tree_map_only(_Lazy, lambda t: t.recipe.materialise().detach(), (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self) -> str:  # the default repr would try to read the (absent) data
        return f"_Lazy(shape={tuple(self.shape)}, probs={self.recipe.probs})"


def _materialise(x: Any) -> Any:
    return tree_map_only(_Lazy, lambda t: t.recipe.materialise(), x)


_T = torch.Tensor
_MATMUL = {torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm}
_TRANSPOSE = {torch.transpose, _T.transpose}
_MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}
_DIV = {torch.div, _T.div, _T.__truediv__}
_ADD = {torch.add, _T.add, _T.__add__, _T.__radd__}
_MASKED_FILL = {torch.masked_fill, _T.masked_fill}
_MASKED_FILL_ = {_T.masked_fill_}
_SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
_DROPOUT = {F.dropout}
_TO = {_T.to, _T.type_as}
_META = {_T.size, _T.dim, _T.numel, _T.__len__}


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _scalar(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.requires_grad and not isinstance(x, _Lazy):
        return float(x.item())
    return None


class _Watch(TorchFunctionMode):
    """Watches one call of a hand-written attention module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.transposed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(kT) -> (kT, k)
        self.converted = 0
        self.reason: str | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not any(isinstance(a, _Lazy) for a in args) and not any(isinstance(v, _Lazy) for v in kwargs.values()):
            if func in _MATMUL and not kwargs and len(args) == 2:
                lazy = self._scores(args[0], args[1])
                if lazy is not None:
                    return lazy  # q @ k^T: not computed
            out = func(*args, **kwargs)
            if func in _TRANSPOSE and _swaps_last_two(args, kwargs):
                self.transposed[id(out)] = (out, args[0])
            return out
        if func in _META or getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)  # size/shape/dtype/device: the wrapper has them
        lazies = [a for a in args if isinstance(a, _Lazy)]
        if all(x.recipe.concrete is None for x in lazies):
            result = self._step(func, args, kwargs)
            if result is not NotImplemented:
                return result
            if self.reason is None:
                self.reason = f"{_name(func)} was applied to the attention scores"
        out = func(*_materialise(args), **_materialise(kwargs))
        if _name(func).endswith("_") or _name(func).split(".")[-1].startswith("__i"):
            return lazies[0]  # in place: the concrete tensor changed under the caller's name
        return out

    def _scores(self, q: Any, kt: Any) -> _Lazy | None:
        entry = self.transposed.get(id(kt))
        if entry is None or entry[0] is not kt or not isinstance(q, torch.Tensor) or q.dim() < 3:
            return None
        k = entry[1]
        if q.dim() != k.dim() or q.shape[-1] != k.shape[-1]:
            return None
        # Re-run the matmul lazily: `out` above is dropped, and only q and k stay referenced.
        return _Lazy(_Recipe(q=q, k=k))

    def _step(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else None
        if not isinstance(x, _Lazy):
            if func in (_MUL | _ADD) and len(args) == 2 and isinstance(args[1], _Lazy):
                x, args = args[1], (args[1], args[0])  # scalar * scores, mask + scores
            else:
                return NotImplemented
        r = x.recipe
        other = args[1] if len(args) > 1 else None
        if not r.probs:
            if func in _MUL | _DIV and len(args) == 2 and not kwargs and r.bias is None:
                s = _scalar(other)
                if s is None or s <= 0:
                    return NotImplemented
                return _Lazy(dataclasses.replace(r, scale=r.scale * (s if func in _MUL else 1.0 / s)))
            if func in _ADD and len(args) == 2 and not kwargs and isinstance(other, torch.Tensor):
                if isinstance(other, _Lazy) or other.requires_grad or not other.is_floating_point():
                    return NotImplemented
                return _Lazy(dataclasses.replace(r, bias=other if r.bias is None else r.bias + other))
            if func in _MASKED_FILL | _MASKED_FILL_:
                mask = args[1] if len(args) > 1 else kwargs.get("mask")
                value = args[2] if len(args) > 2 else kwargs.get("value")
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or _scalar(value) != -math.inf:
                    return NotImplemented
                attend = ~mask if r.attend is None else r.attend & ~mask
                if func in _MASKED_FILL_:
                    r.attend = attend
                    return x
                return _Lazy(dataclasses.replace(r, attend=attend))
            if func in _SOFTMAX:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                at = 3 if func is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype); x.softmax(dim, dtype)
                dtype = kwargs.get("dtype", args[at] if len(args) > at else None)
                if dim not in (-1, x.dim() - 1) or (dtype is not None and dtype != x.dtype):
                    return NotImplemented
                return _Lazy(dataclasses.replace(r, probs=True))
            return NotImplemented
        if func in _DROPOUT:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if r.dropout_p:
                return NotImplemented  # a second dropout: not SDPA's
            return _Lazy(dataclasses.replace(r, dropout_p=p if training else 0.0))
        if func in _TO and len(args) == 2 and not kwargs:
            target = other.dtype if isinstance(other, torch.Tensor) else other
            return x if target == x.dtype else NotImplemented
        if func in _MATMUL and len(args) == 2 and not kwargs and isinstance(other, torch.Tensor):
            if isinstance(other, _Lazy) or other.shape[-2] != r.k.shape[-2] or other.dim() != r.q.dim():
                return NotImplemented
            self.converted += 1
            return r.sdpa(other)
        return NotImplemented


def _swaps_last_two(args: tuple, kwargs: dict) -> bool:
    if len(args) < 3 or not isinstance(args[0], torch.Tensor):
        return False
    n = args[0].dim()
    return {args[1] % n, args[2] % n} == {n - 2, n - 1}


class _Handwritten(ForwardPatch):
    """Runs a hand-written attention module's forward under `_Watch`, and records what happened."""

    def __init__(self, module: nn.Module, inner: Callable | None, fqn: str, record: Applied):
        super().__init__(module, inner)
        self.fqn = fqn
        self.record = record
        self.converted = 0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        watch = _Watch()
        with watch:
            out = self.call_inner(*args, **kwargs)
        if any(isinstance(x, _Lazy) for x in tree_leaves(out)):
            watch.reason = watch.reason or "forward returns the attention scores/probabilities"
            out = _materialise(out)  # computed for real, as the caller asked for them
        self.calls += 1
        self.converted += watch.converted
        if watch.reason is not None:
            self.record.set("attention", self.fqn, "skipped", f"hand-written attention kept as written: {watch.reason}")
        elif self.calls == 1:
            if watch.converted:
                self.record.set("attention", self.fqn, "applied",
                                f"hand-written softmax(QK^T)V -> SDPA ({watch.converted} per call)")
            else:
                self.record.set("attention", self.fqn, "skipped",
                                "calls softmax, but no softmax(q @ k.transpose(-2, -1)) @ v pattern ran")
        return out


def _handwritten_candidate(module: nn.Module) -> bool:
    cls = type(module)
    if cls.__module__.startswith(("torch.", "transformers.")) or _registered_fn(module) is not None:
        return False
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "softmax" in source


# ----------------------------------------------------------------------------------------------------------------
# Which SDPA kernel ran


_BACKEND_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "_scaled_dot_product_fused_attention_overrideable": "fused",
}


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


class _MathWatch(TorchFunctionMode):
    """Around direct calls of F.scaled_dot_product_attention: when one ran the math kernel, says why, once."""

    def __init__(self, probe: "_Probe") -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        before = self.probe.counts.get("math", 0)
        out = func(*args, **kwargs)
        if self.probe.counts.get("math", 0) > before:
            _warn_math(self.probe.root_name, args, kwargs)
        return out


@dataclass
class _Probe:
    """Counts SDPA kernels over the model's first forwards, then gets out of the way."""

    record: Applied
    root_name: str
    forwards_left: int = 2
    counts: dict[str, int] = field(default_factory=dict)
    modes: list = field(default_factory=list)


def _probe_enter(probe: _Probe, module: nn.Module, args: tuple) -> None:
    if probe.forwards_left <= 0 or probe.modes:
        return
    probe.modes = [_KernelSpy(probe.counts), _MathWatch(probe)]
    for mode in probe.modes:
        mode.__enter__()


def _probe_exit(probe: _Probe, module: nn.Module, args: tuple, output: Any) -> None:
    if not probe.modes:
        return
    for mode in reversed(probe.modes):
        mode.__exit__(None, None, None)
    probe.modes = []
    probe.forwards_left -= 1
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(probe.counts.items())) or "none ran"
    if probe.counts.get("math"):
        detail += " (math materialises the N x N matrix)"
    probe.record.set("attention:backend", "", "applied", f"SDPA kernels seen in the first forwards: {detail}")


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
        stacklevel=2,
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


def _is_probe_hook(hook: Any) -> bool:
    return isinstance(hook, functools.partial) and hook.func in (_probe_enter, _probe_exit)


# ----------------------------------------------------------------------------------------------------------------
# One float mask per forward for transformers layers


class _SharedMask:
    """SDPA turns a bool attn_mask into an additive float mask inside every call, and the fused kernels keep that
    copy for backward: one (batch, 1, seq, seq) tensor per layer. Converting each of the model's bool masks once
    per forward, before the layers see it, leaves one copy per distinct mask that all layers share (the same values
    SDPA would have made). Models that alternate masks (sliding-window and full layers) keep one per kind."""

    def __init__(self) -> None:
        self.slots: list[tuple[weakref.ref, weakref.ref]] = []  # (bool mask, its float version)

    def __getstate__(self) -> dict:
        return {}  # weak references do not pickle, and a restored model starts with no mask anyway

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def float_of(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self.slots = [(m, f) for m, f in self.slots if m() is not None and f() is not None]
        for m, f in self.slots:
            if m() is mask and f().dtype == dtype:
                return f()
        # (batch, 1, T, S): 0 where attended, -inf where masked, as aten's convert_boolean_attn_mask makes it
        float_mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        self.slots.append((weakref.ref(mask), weakref.ref(float_mask)))
        return float_mask


def _share_float_mask(shared: _SharedMask, index: int | None, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    positional = index is not None and len(args) > index
    mask = args[index] if positional else kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return None
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        return None
    float_mask = shared.float_of(mask, hidden.dtype)
    if positional:
        args = (*args[:index], float_mask, *args[index + 1 :])
    else:
        kwargs["attention_mask"] = float_mask
    return args, kwargs


def _is_mask_hook(hook: Any) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _share_float_mask


# ----------------------------------------------------------------------------------------------------------------
# The transform


_EAGER = "eager"
_WAS = "_memopt_attn_was"  # on a transformers model: the implementation memopt switched it from


@dataclass(frozen=True)
class _Plan:
    hf: list[tuple[str, nn.Module]]
    multihead: list[tuple[str, nn.Module]]
    registered: list[tuple[str, nn.Module, Callable]]
    handwritten: list[tuple[str, nn.Module]]


def _outermost_hf(model: nn.Module) -> list[tuple[str, nn.Module]]:
    PreTrainedModel = transformers_class("PreTrainedModel")
    if PreTrainedModel is None:
        return []
    return outermost((n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel))


def _plan(model: nn.Module, config: AttentionConfig) -> _Plan:
    hf = _outermost_hf(model) if config.transformers else []
    named = list(model.named_modules())
    registered = [(n, m, fn) for n, m in named if (fn := _registered_fn(m)) is not None]
    taken = {n for n, _, _ in registered}
    multihead = [(n, m) for n, m in named if isinstance(m, nn.MultiheadAttention) and n not in taken] if config.multihead else []
    candidates = [
        (n, m) for n, m in named
        if config.handwritten and n not in taken and not any(is_inside(n, h) for h, _ in hf)
        and _handwritten_candidate(m)
    ]
    # Innermost only: one watched forward never runs inside another (a model whose own forward calls softmax, for
    # sampling say, is not watched when its attention layers are).
    handwritten = [(n, m) for n, m in candidates if not any(c != n and is_inside(c, n) for c, _ in candidates)]
    return _Plan(hf, multihead, registered, handwritten)


def remove_attention(model: nn.Module) -> None:
    for module in model.modules():
        for cls in (_Registered, _MultiheadSdpa, _Handwritten):
            uninstall(module, cls)
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if _is_probe_hook(h) or _is_mask_hook(h)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        was = module.__dict__.pop(_WAS, None)
        if was is not None:
            module.set_attn_implementation(was)


@register_transform(AttentionConfig, technique="attention", order=30, plan=_plan, remove=remove_attention)
def _apply(model: nn.Module, config: AttentionConfig, plan: _Plan) -> list[Entry]:
    remove_attention(model)
    record = record_of(model, create=True)
    entries: list[Entry] = []
    for fqn, module in plan.hf:
        entry = _switch_transformers(fqn, module)
        entries.append(entry)
        if entry.status == "applied" and module.config._attn_implementation == "sdpa":
            shared = _SharedMask()
            for _, layer in hf_layers(module):
                params = list(inspect.signature(type(layer).forward).parameters)[1:]  # without self
                index = params.index("attention_mask") if "attention_mask" in params else None
                hook = functools.partial(_share_float_mask, shared, index)
                layer.register_forward_pre_hook(hook, with_kwargs=True)
    for fqn, module in plan.multihead:
        install(module, _MultiheadSdpa)
        entries.append(Entry("attention", fqn, "applied", "nn.MultiheadAttention: need_weights=False (SDPA path); "
                                                            "returned weights are None"))
    for fqn, module, fn in plan.registered:
        install(module, _Registered, fn=fn)
        entries.append(Entry("attention", fqn, "applied", f"registered: {getattr(fn, '__name__', repr(fn))}"))
    for fqn, module in plan.handwritten:
        install(module, _Handwritten, fqn=fqn, record=record)
        entries.append(Entry("attention", fqn, "applied", "hand-written attention: watched; converted to SDPA "
                                                            "when softmax(QK^T)V runs (see after a forward)"))
    if not entries:
        warn_once(
            f"no-attention-{type(model).__name__}",
            f"attention='sdpa' found no attention in {type(model).__name__} (no transformers model, "
            "nn.MultiheadAttention, registered class, or module whose forward calls softmax); pass attention=None "
            "if the model has none, or teach memopt your module with memopt.register_attention(cls, fn)",
            stacklevel=3,
        )
    elif config.report_backend:
        probe = _Probe(record, type(model).__name__)
        model.register_forward_pre_hook(functools.partial(_probe_enter, probe))
        model.register_forward_hook(functools.partial(_probe_exit, probe), always_call=True)
    done = sum(e.status == "applied" for e in entries)
    logger.info("memopt: attention -> SDPA on %d module(s), %d left as is", done, len(entries) - done)
    return entries


_MASK_NOTE = "; a padding mask is made float once per forward and shared by all layers"


def _switch_transformers(fqn: str, model: nn.Module) -> Entry:
    impl = model.config._attn_implementation
    name = type(model).__name__
    if impl == "sdpa":
        return Entry("attention", fqn, "applied", f"{name}: transformers attn_implementation='sdpa' (already){_MASK_NOTE}")
    if impl != _EAGER:
        return Entry("attention", fqn, "applied", f"{name}: keeps attn_implementation={impl!r} (no N x N matrix kept)")
    if getattr(model, "_supports_sdpa", False) and model._can_set_attn_implementation():
        model.set_attn_implementation("sdpa")
        model.__dict__[_WAS] = impl
        return Entry("attention", fqn, "applied", f"{name}: transformers attn_implementation 'eager' -> 'sdpa'{_MASK_NOTE}")
    warn_once(
        f"no-sdpa-{name}",
        f"{name} has no SDPA attention in transformers: its attention stays eager and keeps the (batch, heads, seq, "
        "seq) probabilities for backward; use checkpoint=True to drop them between forward and backward",
        stacklevel=4,
    )
    return Entry("attention", fqn, "skipped", f"{name} has no SDPA implementation in transformers; stays eager")


def sdpa_converted(module: nn.Module) -> bool:
    """Whether memopt reroutes this module's attention."""
    return any(find(module, cls) is not None for cls in (_Registered, _MultiheadSdpa, _Handwritten))
