"""attention='sdpa': every attention in the model through `torch.nn.functional.scaled_dot_product_attention`.

Eager attention keeps the (batch, heads, seq, seq) probabilities for backward: O(N^2) memory per layer. SDPA's fused
kernels (flash, memory-efficient, cuDNN, CPU flash) recompute them in backward from q, k, v and a (batch, heads, seq)
log-sum-exp instead: the FlashAttention idea, same result, O(N) extra memory.

What gets converted, by kind of attention:
- transformers models: switched to transformers' own SDPA implementation (`set_attn_implementation("sdpa")`) when the
  architecture has one (`masks.py`: a padding mask made float once and shared by the layers, where exact). An
  architecture without one (Bloom, GPT-Neo, MPT, ...) has its attention modules watched as hand-written ones.
- `nn.MultiheadAttention`: called with `need_weights=False`, which is its SDPA path. Callers that relied on the default
  `need_weights=True` get `None` as the weights (the second element of the returned tuple).
- Classes taught with `memopt.register_attention(cls, fn)`: `fn(module, *args, **kwargs)` becomes their forward.
- Hand-written attention in other modules (a class whose code calls softmax): recognised at runtime and computed as
  one SDPA call (`handwritten.py`); anything else done to the scores computes them for real, exactly as written,
  and the reason is recorded.

Which SDPA kernel ran is recorded on the first forwards (`probe.py`; `memopt.applied(model)`, technique
"attention:backend"); a fall-back to the math kernel, which does materialise the N x N matrix, is warned about once
with the reasons. Under torch.compile every part traces into the graph (no graph break); see `memopt.applied`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..._log import logger, warn_once
from ..._modules import hf_layers, is_inside, outermost, transformers_class
from ..._patch import ForwardPatch, find, install, uninstall
from ..._record import Entry, record_of
from ..._registry import register_transform
from ...config import AttentionConfig
from .handwritten import _Handwritten, handwritten_candidate
from .masks import MaskShare, SharedMask
from .probe import FirstForwards

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


def _has_sdpa(model: nn.Module) -> bool:
    """Whether transformers itself can run this model's attention without an N x N matrix."""
    impl = model.config._attn_implementation
    return impl != _EAGER or (getattr(model, "_supports_sdpa", False) and model._can_set_attn_implementation())


def _plan(model: nn.Module, config: AttentionConfig) -> _Plan:
    hf = _outermost_hf(model) if config.transformers else []
    named = list(model.named_modules())
    registered = [(n, m, fn) for n, m in named if (fn := _registered_fn(m)) is not None]
    taken = {n for n, _, _ in registered}
    multihead = [(n, m) for n, m in named if isinstance(m, nn.MultiheadAttention) and n not in taken] if config.multihead else []
    # Inside a transformers model with SDPA transformers' switch does it; inside one without, its attention modules
    # are watched like hand-written ones (the transformers model classes themselves are not: their generation code
    # calls softmax for sampling).
    with_sdpa = [h for h, m in hf if _has_sdpa(m)]
    roots = {h for h, _ in hf}
    candidates = [
        (n, m) for n, m in named
        if config.handwritten and n not in taken and n not in roots and not any(is_inside(n, h) for h in with_sdpa)
        and handwritten_candidate(m, _registered_fn)
    ]
    # Innermost only: one watched forward never runs inside another (a model whose own forward calls softmax, for
    # sampling say, is not watched when its attention layers are).
    handwritten = [(n, m) for n, m in candidates if not any(c != n and is_inside(c, n) for c, _ in candidates)]
    return _Plan(hf, multihead, registered, handwritten)


def remove_attention(model: nn.Module) -> None:
    for module in model.modules():
        for cls in (_Registered, _MultiheadSdpa, _Handwritten, MaskShare, FirstForwards):
            uninstall(module, cls)
        was = module.__dict__.pop(_WAS, None)
        if was is not None:
            module.set_attn_implementation(was)


@register_transform(AttentionConfig, technique="attention", order=30, plan=_plan, remove=remove_attention)
def _apply(model: nn.Module, config: AttentionConfig, plan: _Plan) -> list[Entry]:
    remove_attention(model)
    record = record_of(model, create=True)
    entries: list[Entry] = []
    masks: list[SharedMask] = []
    watched = [n for n, _ in plan.handwritten]
    for fqn, module in plan.hf:
        entry = _switch_transformers(fqn, module, any(is_inside(n, fqn) for n in watched))
        entries.append(entry)
        if entry.status == "applied" and module.config._attn_implementation == "sdpa":
            shared = SharedMask()
            masks.append(shared)
            for _, layer in hf_layers(module):
                params = list(inspect.signature(type(layer).forward).parameters)[1:]  # without self
                index = params.index("attention_mask") if "attention_mask" in params else None
                install(layer, MaskShare, shared=shared, index=index)
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
        )
    if entries and (config.report_backend or masks):
        install(model, FirstForwards, record=record if config.report_backend else None, masks=masks)
    if entries:
        entries.append(_compile_note(plan, masks, config))
    done = sum(e.status == "applied" for e in entries)
    logger.info("memopt: attention -> SDPA on %d module(s), %d left as is", done, len(entries) - done)
    return entries


_MASK_NOTE = ("; a bool padding mask is made float once per forward and shared by all layers, where the first padded "
              "forward shows it reaches SDPA unchanged")


def _switch_transformers(fqn: str, model: nn.Module, watched: bool) -> Entry:
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
    if watched:
        return Entry("attention", fqn, "skipped", f"{name} has no SDPA implementation in transformers: its attention "
                                                  "modules are watched as hand-written attention (see their rows)")
    warn_once(
        f"no-sdpa-{name}",
        f"{name} has no SDPA attention in transformers: its attention stays eager and keeps the (batch, heads, seq, "
        "seq) probabilities for backward; use checkpoint=True to drop them between forward and backward",
    )
    return Entry("attention", fqn, "skipped", f"{name} has no SDPA implementation in transformers; stays eager")


def _compile_note(plan: _Plan, masks: list, config: AttentionConfig) -> Entry:
    """What attention='sdpa' does under torch.compile (`memopt.applied`'s "attention:compile" row)."""
    parts = ["traced as it runs in eager: SDPA calls in the graph"]
    if plan.handwritten:
        parts.append("hand-written attention recognised while tracing (a causal mask is passed as a mask, not "
                     "is_causal; a mask value held in a 0-d tensor, as GPT-Neo's, keeps that attention as written)")
    if masks:
        parts.append("the shared float mask is eager-only (the graph converts the bool mask)")
    if config.report_backend:
        parts.append("kernels are Inductor's choice, not probed")
    return Entry("attention:compile", "", "applied", "; ".join(parts))


def sdpa_converted(module: nn.Module) -> bool:
    """Whether memopt reroutes this module's attention."""
    return any(find(module, cls) is not None for cls in (_Registered, _MultiheadSdpa, _Handwritten))
