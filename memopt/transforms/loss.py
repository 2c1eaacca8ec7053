"""loss='chunked': the output head and cross-entropy chunk by chunk over tokens, so the logits never exist in full.

A plain language-model step keeps batch x seq x vocab logits in float32 for the loss, plus their softmax and their
gradient: with a large vocabulary they are the largest tensors of the step, and checkpointing does not touch them.
`chunked_cross_entropy` computes, for one chunk of tokens at a time, the head's logits, the loss and, already in the
forward, the gradients of the hidden states, the head weight and bias (Liger-Kernel's fused linear cross-entropy, in
plain PyTorch): only one chunk's logits are live at any time, nothing vocab-sized is kept for backward, and backward
only scales the kept gradients by the incoming gradient instead of running the head a second time.

`memopt.apply(model, loss="chunked")` routes a model's loss through it:
- transformers causal LMs (`...ForCausalLM`, `GPT2LMHeadModel`, ...; loss `ForCausalLMLoss`): a training forward
  (`model.train()`, grad enabled) that is given `labels` runs the model with `labels=None` while the head returns a
  2-wide stand-in instead of the logits, then computes the loss from the head's input with the semantics of the
  model's own loss (shift by one, `ignore_index=-100`, `num_items_in_batch` sum, `shift_labels`, `logits_to_keep`,
  Gemma 2's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`, the MoE auxiliary loss).
  The output's **`logits` are None** in that case. Without labels, in `eval()` or under `no_grad` the forward is
  untouched (generation, evaluation with metrics).
- other models: the same, given the head and the labels argument (`LossConfig(head=..., labels=...)` or
  `memopt.register_loss(cls, ...)`), for a forward that returns the logits alone, a `(logits, loss)` tuple or a dict
  with a ``"logits"`` key when called without labels; it then returns the loss alone, ``(None, loss, ...)`` or the
  dict with ``loss`` set and ``logits`` None. Or call `memopt.chunked_cross_entropy` in the forward yourself.

The head must be a plain `nn.Linear` (tied to the input embedding or not; frozen or trainable). A head with LoRA
adapters or a quantized head is refused at `apply` (its weight is not one matrix). The stand-in's values are checked
on the first chunked forward: a model that changes its logits after the head in a way memopt does not know raises
instead of training on a different loss.

Known limitations: the loss is computed after the model's forward has returned, from the head's weight as it is
then; a head that FSDP2 reshards on its own after its forward (its own `fully_shard` group with
`reshard_after_forward=True`) would be seen sharded: keep it in the root's group. One head call per forward.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from .._log import logger, warn_once
from .._observe import counted_as
from .._modules import get_submodule, head_names, transformers_class
from .._patch import ForwardPatch, install, uninstall
from .._record import Entry
from .._registry import register_transform
from ..config import LoraSettings, LossConfig, QuantConfig

REDUCTIONS = ("mean", "sum", "none")

# ----------------------------------------------------------------------------------------------------------------
# The function


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk when none is given: one chunk's float32 logits about the size of the hidden states
    (Liger-Kernel's rule: tokens / ceil(vocab / hidden), rounded up to a power of two), and at least 256 tokens so that
    the matmuls stay large enough to run at full speed."""
    per = max(1, math.ceil(tokens / max(1, math.ceil(vocab / hidden))))
    return max(256, 1 << (per - 1).bit_length())


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    chunk_size: int
    reduction: str


def _chunk(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, opts: _Options,
    row_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss per token of one chunk, and (if `row_scale` is given) d(sum of row_scale * loss)/d(logits).

    h (C, H) and weight (V, H) in one compute dtype; y (C,) int64; row_scale (C,) float32.
    Returns (loss (C,) float32, grad_logits (C, V) float32 or None). The softmax and the gradient are written over
    the logits: one (C, V) float32 buffer (two with soft-capping)."""
    logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (C, V) compute dtype
    z = logits.float()  # (C, V) float32; the same storage when the compute dtype is float32
    del logits
    capped = None
    if opts.softcap is not None:
        capped = z.div_(opts.softcap).tanh_()  # (C, V), kept for d tanh = 1 - tanh^2
        z = capped * opts.softcap
    valid = y != opts.ignore_index
    target = torch.where(valid, y, 0).unsqueeze(1)  # (C, 1)
    eps, vocab = opts.label_smoothing, z.shape[1]
    z_target = z.gather(1, target)  # (C, 1)
    z_mean = z.mean(dim=-1, keepdim=True) if eps else None
    z_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
    exp_sum = z.sub_(z_max).exp_().sum(dim=-1, keepdim=True)  # z now holds exp(z - max): (C, V)
    lse = z_max + exp_sum.log()  # (C, 1)
    loss = lse - z_target
    if eps:
        loss = (1 - eps) * loss + eps * (lse - z_mean)
    loss = torch.where(valid, loss.squeeze(1), 0.0)  # (C,)
    if row_scale is None:
        return loss, None
    # d loss / d z = softmax - (1 - eps) * onehot - eps / V, times the row's scale (0 for ignored tokens).
    scale = torch.where(valid, row_scale, 0.0).unsqueeze(1)  # (C, 1)
    grad = z.mul_(scale / exp_sum)
    if eps:
        grad.sub_(scale * (eps / vocab))
    grad.scatter_add_(1, target, scale * -(1 - eps))
    if capped is not None:
        grad.mul_(capped.square_().neg_().add_(1))  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
    return loss, grad


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (as F.linear would run), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _loss_only(hidden, weight, bias, labels, scale, opts) -> torch.Tensor:
    """Forward without gradients: (N,) losses for reduction='none', else the reduced scalar."""
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        losses = [
            _chunk(hidden[i : i + opts.chunk_size].to(dtype), w, b, labels[i : i + opts.chunk_size], opts, None)[0]
            for i in range(0, hidden.shape[0], opts.chunk_size)
        ]
    loss = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
    return loss if opts.reduction == "none" else loss.sum() * scale


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,), scale: 0-dim float32 (1 / denominator).

    reduction 'mean'/'sum': the gradients are computed chunk by chunk in forward and kept (N x H, V x H, V), backward
    multiplies them by the incoming gradient. reduction 'none': the incoming gradient differs per token, so backward
    recomputes each chunk's logits (one more head forward) from the kept hidden states and weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, opts: _Options):
        ctx.opts = opts
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if opts.reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.dtype = _compute_dtype(hidden, weight)  # backward runs outside autocast: recompute as the forward ran
            return _loss_only(hidden, weight, bias, labels, scale, opts)
        ctx.used = False
        loss, grads = _forward_with_grads(hidden, weight, bias, labels, scale, opts, need_h, need_w, need_b)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        opts = ctx.opts
        if opts.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            needs = ctx.needs_input_grad
            grads = _grads_per_token(hidden, weight, bias, labels, grad_out, opts, ctx.dtype, needs[0], needs[1],
                                     bias is not None and needs[2])
            return (*grads, None, None, None)
        if ctx.used:
            raise RuntimeError(
                "backward through memopt.chunked_cross_entropy ran twice (retain_graph=True): its gradients are "
                "computed in the forward and scaled in place by the first backward; recompute the loss for each backward"
            )
        ctx.used = True
        grads = ctx.saved_tensors
        for g in grads:
            if g is not None:
                g.mul_(grad_out.to(g.dtype))  # in place: these buffers are this backward's results
        return (*grads, None, None, None)


def _forward_with_grads(hidden, weight, bias, labels, scale, opts, need_h, need_w, need_b):
    """Loss and the gradients of (hidden, weight, bias) for a unit incoming gradient, chunk by chunk; None for those
    not needed."""
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)  # a (V, H) copy only under autocast or for a hidden/weight dtype mismatch
    b = None if bias is None else bias.to(dtype)
    grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
    # The weight's gradient sums over every chunk: accumulated in float32 even for a half-precision weight.
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    row_scale = scale.to(torch.float32).expand(min(opts.chunk_size, hidden.shape[0]))
    with torch.autocast(hidden.device.type, enabled=False):
        for i in range(0, hidden.shape[0], opts.chunk_size):
            h = hidden[i : i + opts.chunk_size].to(dtype)  # (C, H)
            loss, g = _chunk(h, w, b, labels[i : i + opts.chunk_size], opts, row_scale[: h.shape[0]])
            total += loss.sum()
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)  # (C, V): the head's backward runs in its forward dtype, as F.linear's would
            if need_h:
                grad_h[i : i + h.shape[0]] = g @ w  # (C, H)
            if need_w:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)  # (V, H) += (V, C) @ (C, H)
                else:
                    grad_w += g.t() @ h
            del g
    grad_w = grad_w.to(weight.dtype) if need_w else None
    grad_b = grad_b.to(bias.dtype) if need_b else None
    return total * scale, (grad_h, grad_w, grad_b)


def _grads_per_token(hidden, weight, bias, labels, grad_out, opts, dtype, need_h, need_w, need_b):
    """reduction='none' backward: each chunk's logits again, weighted by its tokens' incoming gradients."""
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for i in range(0, hidden.shape[0], opts.chunk_size):
        h = hidden[i : i + opts.chunk_size].to(dtype)
        _, g = _chunk(h, w, b, labels[i : i + opts.chunk_size], opts, grad_out[i : i + h.shape[0]].float())
        if need_b:
            grad_b += g.sum(0)
        g = g.to(dtype)
        if need_h:
            grad_h[i : i + h.shape[0]] = g @ w
        if need_w:
            grad_w += (g.t() @ h).float()
    return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias), labels)`` without the (tokens x vocab) logits.

    The tokens are processed `chunk_size` at a time: each chunk's logits (float32), its loss and, in a training
    forward, its share of the gradients of `hidden`, `weight` and `bias`, which are kept until backward. Gradients
    are only computed for the inputs that require them (a frozen head weight costs no (vocab x hidden) buffer).

    Memory: one chunk's logits (a few x chunk_size x vocab x 4 bytes) instead of tokens x vocab x 4 bytes several
    times over; kept for backward: hidden's gradient (tokens x hidden, hidden's dtype) and, for a trainable weight,
    its gradient (vocab x hidden x 4 bytes: accumulated in float32, even for a half-precision weight). Time: the head's
    three matmuls, all in the forward; backward only scales the kept gradients. A forward that is never backpropagated
    still pays the two gradient matmuls; under `torch.no_grad()` or with nothing requiring grad only the loss is
    computed. ``reduction="none"`` keeps `hidden` and `weight` instead and recomputes each chunk's logits in backward.

    Args:
        hidden: (..., hidden) the head's input.
        weight: (vocab, hidden) the head's weight (tied to the input embedding or not).
        labels: (...) int64 class indices, shaped as `hidden` without its last dimension; already aligned with the
            positions (shift them yourself for next-token prediction).
        bias: (vocab,) the head's bias, if it has one.
        ignore_index: labels with this value add no loss and no gradient.
        reduction: ``"mean"`` (over the labels that are not `ignore_index`), ``"sum"`` or ``"none"`` (per token).
        num_items_in_batch: transformers' gradient-accumulation denominator: the loss is the sum divided by it
            (overrides `reduction`'s mean).
        label_smoothing: as in `F.cross_entropy`.
        softcap: ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2's final_logit_softcapping).
        chunk_size: tokens per chunk; None: `default_chunk_size`.

    Returns:
        The loss in float32: a scalar, or (...) per token for ``reduction="none"``.

    Raises:
        ValueError / TypeError: shapes or options that do not fit, naming them.
    """
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("chunked_cross_entropy expects tensors hidden (..., hidden), weight (vocab, hidden) and "
                        f"labels (...); got {type(hidden).__name__}, {type(weight).__name__}, {type(labels).__name__}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not "
                         "fit; weight must be (vocab, hidden) with hidden = hidden.shape[-1], as nn.Linear's weight")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_cross_entropy: labels {tuple(labels.shape)} must have hidden's shape without its "
                         f"last dimension, {tuple(hidden.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"chunked_cross_entropy: labels must be integer class indices, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"chunked_cross_entropy: bias {tuple(bias.shape)} must be (vocab,) = ({weight.shape[0]},)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"chunked_cross_entropy(reduction={reduction!r}) is not supported; use one of {REDUCTIONS}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunked_cross_entropy(chunk_size={chunk_size!r}) must be a positive int or None")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"chunked_cross_entropy(label_smoothing={label_smoothing!r}) must be in [0, 1]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"chunked_cross_entropy(softcap={softcap!r}) must be positive or None")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("chunked_cross_entropy: num_items_in_batch divides the summed loss; it cannot be combined "
                         "with reduction='none' (divide the per-token losses yourself)")

    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = labels.reshape(-1).to(h.device, torch.long)  # (N,)
    tokens = h.shape[0]
    opts = _Options(ignore_index, float(label_smoothing), None if softcap is None else float(softcap),
                    chunk_size or default_chunk_size(tokens, weight.shape[1], weight.shape[0]), reduction)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=h.device).float()
    elif reduction == "mean":
        denominator = (y != ignore_index).sum().float()
    else:
        denominator = torch.ones((), device=h.device)
    scale = denominator.reciprocal()
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        loss = _ChunkedCrossEntropy.apply(h, weight, bias, y, scale, opts)
    else:
        loss = _loss_only(h, weight, bias, y, scale, opts)
    return loss.reshape(lead) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------------------------
# register_loss


_REGISTERED: dict[type, LossConfig] = {}


def register_loss(model_cls: type, *, head: str, labels: str = "labels", shift: bool = False,
                  softcap: float | None = None) -> None:
    """Teach memopt where a model class keeps its output head and labels, so ``loss="chunked"`` works on it.

    For a forward that computes plain cross-entropy over ``head(x)`` when given the labels and, called with the
    labels set to None, returns the logits alone, a ``(logits, loss)`` tuple or a dict with a ``"logits"`` key
    (nanoGPT's ``forward(idx, targets=None)``). Subclasses match too. A `LossConfig` passed to `apply` overrides the
    registered fields it sets.

    Args:
        model_cls: the model's class (the module given to `memopt.apply`).
        head: FQN of the head `nn.Linear` inside the model (``"lm_head"``).
        labels: name of the forward argument that carries the labels (nanoGPT: ``"targets"``).
        shift: True if position t predicts label t + 1 (the forward shifts the labels itself); False if the labels
            are already aligned with the positions.
        softcap: ``cap * tanh(logits / cap)`` applied by the forward after the head, if it does.
    """
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"register_loss expects an nn.Module subclass, got {model_cls!r}")
    _REGISTERED[model_cls] = LossConfig(head=head, labels=labels, shift=shift, softcap=softcap)


def _registered(model: nn.Module) -> LossConfig | None:
    return next((_REGISTERED[c] for c in type(model).__mro__ if c in _REGISTERED), None)


# ----------------------------------------------------------------------------------------------------------------
# Finding the head and the labels


@dataclass(frozen=True)
class _Settings:
    """What the forward patch needs; plain values, so a patched model deep-copies and pickles."""

    head: str  # FQN of the head, relative to the patched module
    labels: str  # forward argument carrying the labels
    labels_index: int | None  # its position among the forward's positional parameters (self excluded)
    shift: bool
    softcap: float | None
    scale: float | None  # logits multiplier after the head (Cohere's logit_scale, 1 / Granite's logits_scaling)
    hf: bool  # a transformers causal LM: ModelOutput / to_tuple outputs, shift_labels, MoE auxiliary loss
    config: LossConfig


@dataclass(frozen=True)
class _Plan:
    target: str  # FQN of the module whose forward takes the labels (the root, or the causal LM inside a wrapper)
    head: str  # FQN of the head, from the root
    settings: _Settings


def _causal_lm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost transformers causal LM in the tree (the model itself, or the one inside a PEFT wrapper)."""
    pretrained = transformers_class("PreTrainedModel")
    if pretrained is None:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for fqn, module in model.named_modules():
        if isinstance(module, pretrained) and any(c.__name__ in names for c in type(module).__mro__):
            return fqn, module
    return None


def _uses_causal_lm_loss(module: nn.Module) -> bool:
    from transformers.loss.loss_utils import LOSS_MAPPING

    return "_loss_function" not in module.__dict__ and module.loss_function is LOSS_MAPPING.get("ForCausalLM")


def _head_problem(head: nn.Module) -> str | None:
    """Why the chunked loss cannot use this head, or None: it needs the logits as `x @ weight.T + bias`."""
    name = type(head).__name__
    if hasattr(head, "base_layer") and any(n.startswith("lora_") for n, _ in head.named_children()):
        return (f"has LoRA adapters ({name}): its logits are not x @ weight.T of one matrix; leave the head out of "
                "the LoRA targets (memopt's lora= does by default) or pass loss=None")
    if name in ("Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4") or type(head).__module__.startswith("bitsandbytes"):
        return (f"is quantized ({name}); keep the head in full precision (QuantConfig(skip_head=True), the default) "
                "or pass loss=None")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"is a {name}, not an nn.Linear (weight (vocab, hidden)); name the head with LossConfig(head=...)"
    return None


def _forward_params(module: nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(type(module).forward).parameters.values())[1:]  # without self


def _not_found_message(model: nn.Module, why: str) -> str:
    name = type(model).__name__
    return (
        f"loss='chunked': {why} in {name}. Name the head and the labels argument: "
        f"memopt.apply(model, loss=memopt.LossConfig(head='lm_head', labels='targets')) or "
        f"memopt.register_loss({name}, head='lm_head', labels='targets'), for a forward that returns the logits when "
        "called without labels; or compute the loss in your forward with memopt.chunked_cross_entropy(hidden, "
        "head.weight, labels)"
    )


def _named_head(model: nn.Module, fqn: str) -> str:
    if fqn not in dict(model.named_modules()):
        raise ValueError(_not_found_message(model, f"LossConfig(head={fqn!r}) matched no module"))
    return fqn


def _plan(model: nn.Module, config: LossConfig) -> _Plan:
    registered = _registered(model)
    if registered is not None:
        config = dataclasses.replace(
            config, **{k: getattr(registered, k) for k in ("head", "labels", "shift", "softcap")
                       if getattr(config, k) is None}
        )
    found = None if registered is not None else _causal_lm(model)
    hf = False
    if found is not None:
        target, module = found
        if not _uses_causal_lm_loss(module):
            raise ValueError(
                f"loss='chunked': {type(module).__name__} does not use transformers' ForCausalLMLoss (loss_type "
                f"{getattr(module, 'loss_type', None)!r}, or a replaced loss_function), so a chunked loss could not "
                "match its own; pass loss=None"
            )
        hf = True
        if config.head is not None:
            head = _named_head(model, config.head)
        else:
            out = module.get_output_embeddings() if callable(getattr(module, "get_output_embeddings", None)) else None
            head = next((n for n, m in model.named_modules() if out is not None and m is out), None)
            if head is None:
                raise ValueError(_not_found_message(model, f"{type(module).__name__} reports no output embedding"))
    else:
        target, module = "", model
        pretrained = transformers_class("PreTrainedModel")
        if config.head is None and registered is None and pretrained is not None and isinstance(model, pretrained):
            raise ValueError(_not_found_message(
                model, "no transformers causal LM (loss='chunked' knows their loss semantics; this one may shift or "
                       "prepare its labels differently)"))
        if config.head is not None:
            head = _named_head(model, config.head)
        else:
            heads = sorted(head_names(model))
            if len(heads) != 1:
                raise ValueError(_not_found_message(
                    model, "found no output head (no module named lm_head)" if not heads else f"found several heads {heads}"))
            head = heads[0]
    problem = _head_problem(get_submodule(model, head))
    if problem is not None:
        raise ValueError(f"loss='chunked': the output head {head!r} {problem}")
    if target and not head.startswith(target + "."):
        raise ValueError(f"loss='chunked': the head {head!r} is not inside {target!r}, whose forward takes the labels")
    labels = config.labels or "labels"
    params = _forward_params(module)
    names = [p.name for p in params]
    if labels not in names:
        raise ValueError(
            f"loss='chunked': {type(module).__name__}.forward has no argument {labels!r} (it takes {names}); name the "
            "one carrying the labels with LossConfig(labels=...) or memopt.register_loss(...)"
        )
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    softcap, scale = config.softcap, None
    if hf:
        if softcap is None:
            softcap = getattr(module.config, "final_logit_softcapping", None)
        if isinstance(getattr(module, "logit_scale", None), (int, float)):
            scale = float(module.logit_scale)  # Cohere: logits * logit_scale
        elif isinstance(getattr(module.config, "logits_scaling", None), (int, float)):
            scale = 1.0 / module.config.logits_scaling  # Granite: logits / logits_scaling
    settings = _Settings(
        head=head[len(target) + 1 :] if target else head,
        labels=labels,
        labels_index=positional.index(labels) if labels in positional else None,
        shift=config.shift if config.shift is not None else hf,
        softcap=None if softcap is None else float(softcap),
        scale=scale,
        hf=hf,
        config=config,
    )
    return _Plan(target, head, settings)


def _check_others(model: nn.Module, config: LossConfig, plan: _Plan, others: list[tuple[Any, Any]]) -> None:
    """Quantization or LoRA in the same `apply` call would change the head after this plan was made."""
    for other, other_plan in others:
        if isinstance(other, QuantConfig) and any(t.fqn == plan.head for t in other_plan.targets):
            raise ValueError(
                f"loss='chunked' and quant={other.name!r} with skip_head=False: the quantized head {plan.head!r} "
                "would have no float weight for the chunked loss; keep QuantConfig(skip_head=True) (the default) or "
                "pass loss=None"
            )
        if isinstance(other, LoraSettings):
            from peft.tuners.tuners_utils import check_target_module_exists

            if check_target_module_exists(other_plan.config, plan.head):
                raise ValueError(
                    f"loss='chunked' and a LoRA config whose target_modules include the output head {plan.head!r}: "
                    "a head with adapters is not one matrix; leave the head out of target_modules (memopt's lora=N "
                    "does) or pass loss=None"
                )


# ----------------------------------------------------------------------------------------------------------------
# The forward patches


_STANDIN = (1.0, 20.0)  # the head's stand-in logits: far enough apart that a scale or a soft-cap shows


class _HeadCapture(ForwardPatch):
    """Installed on the head for one chunked forward: keeps the head's input, returns a (..., 2) stand-in."""

    rank = 90  # outside any other patch on the head: none of them runs

    def __init__(self, module: nn.Module, inner: Callable | None):
        super().__init__(module, inner)
        self.hidden: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        self.hidden = x  # (..., hidden)
        values = torch.arange(2, dtype=x.dtype, device=x.device) * (_STANDIN[1] - _STANDIN[0]) + _STANDIN[0]
        return values.repeat(*x.shape[:-1], 1)  # (..., 2), contiguous: a forward may write into its logits


class _ChunkedLoss(ForwardPatch):
    """The forward of the module that takes the labels: see the module docstring."""

    rank = 50  # checkpointing (100) stays outside, should this module also be a checkpointed block

    def __init__(self, module: nn.Module, inner: Callable | None, settings: _Settings):
        super().__init__(module, inner)
        self.settings = settings
        self.checked = False  # the stand-in's values are compared on the first chunked forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        s = self.settings
        positional = s.labels_index is not None and len(args) > s.labels_index
        labels = args[s.labels_index] if positional else kwargs.get(s.labels)
        training = self.module.training and torch.is_grad_enabled()
        if labels is None or not training:
            if training:
                warn_once(
                    f"loss-no-labels-{type(self.module).__name__}",
                    f"loss='chunked': a training forward of {type(self.module).__name__} without {s.labels}= "
                    "computes the full logits (the chunked loss only runs when the model computes its own loss); "
                    f"pass {s.labels}= to the model instead of computing the loss from its logits (transformers' "
                    "Trainer with label_smoothing_factor removes the labels: use LossConfig(label_smoothing=...))",
                    stacklevel=_caller_level(),
                )
            return self.call_inner(*args, **kwargs)
        if positional:
            args = (*args[: s.labels_index], None, *args[s.labels_index + 1 :])
        else:
            kwargs = {**kwargs, s.labels: None}
        head = get_submodule(self.module, s.head)
        problem = _head_problem(head)
        if problem is not None:
            raise RuntimeError(f"loss='chunked': the output head {s.head!r} {problem} (it changed after memopt.apply)")
        capture = install(head, _HeadCapture)
        try:
            out = self.call_inner(*args, **kwargs)
        finally:
            uninstall(head, _HeadCapture)
        if capture.calls != 1:
            raise RuntimeError(
                f"loss='chunked': {type(self.module).__name__}.forward called its head {s.head!r} {capture.calls} "
                "times in one step; the chunked loss handles one head call per forward (pass loss=None)"
            )
        if not self.checked:
            self._check_standin(out, capture.hidden)
            self.checked = True
        loss = self._loss(capture.hidden, head, labels, kwargs)
        return self._output(out, loss, kwargs)

    def _loss(self, hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        s, cfg = self.settings, self.settings.config
        weight, bias = head.weight, head.bias
        if s.scale is not None:
            hidden = hidden * s.scale  # (..., hidden): (x * s) @ W.T = s * (x @ W.T)
            bias = None if bias is None else bias * s.scale
        shift_labels = kwargs.get("shift_labels") if s.hf else None
        if shift_labels is not None:
            targets = shift_labels
        elif s.shift:
            targets = F.pad(labels, (0, 1), value=cfg.ignore_index)[..., 1:]  # position t predicts label t + 1
        else:
            targets = labels
        targets = targets.to(hidden.device)
        if targets.shape != hidden.shape[:-1]:
            if targets.numel() != hidden.shape[:-1].numel():
                raise ValueError(
                    f"loss='chunked': {s.labels} {tuple(labels.shape)} do not fit the head's input "
                    f"{tuple(hidden.shape)} (one label per position the head sees)"
                )
            targets = targets.reshape(hidden.shape[:-1])
        with counted_as(head):  # memopt.track files the chunked head + loss under the head's row
            loss = chunked_cross_entropy(
                hidden, weight, targets, bias=bias, ignore_index=cfg.ignore_index,
                num_items_in_batch=kwargs.get("num_items_in_batch"), label_smoothing=cfg.label_smoothing,
                softcap=s.softcap, chunk_size=cfg.chunk_size,
            )
        return loss

    def _check_standin(self, out: Any, hidden: torch.Tensor) -> None:
        s = self.settings
        found = _logits_of(out)
        if isinstance(found, torch.Tensor) and is_fake(found):  # memopt.estimate: no values to compare
            return
        expected = torch.tensor(_STANDIN, dtype=hidden.dtype).float().repeat(*hidden.shape[:-1], 1)
        if s.scale is not None:
            expected = expected * s.scale
        if s.softcap is not None:
            expected = torch.tanh(expected / s.softcap) * s.softcap
        if (
            not isinstance(found, torch.Tensor) or found.shape != expected.shape
            or not torch.allclose(found.detach().float().cpu(), expected, rtol=2e-2, atol=1e-3)
        ):
            what = f"{tuple(found.shape)} tensor" if isinstance(found, torch.Tensor) else type(found).__name__
            raise RuntimeError(
                f"loss='chunked': {type(self.module).__name__}.forward does something to the head's output that "
                f"memopt does not model (the logits it returned, a {what}, are not the head's output"
                f"{' soft-capped' if s.softcap else ''}{' scaled' if s.scale else ''}); its own loss would differ "
                "from the chunked one, so nothing is computed. Pass loss=None, or give the soft-cap with "
                "LossConfig(softcap=...)"
            )

    def _output(self, out: Any, loss: torch.Tensor, kwargs: dict) -> Any:
        s = self.settings
        if _is_model_output(out):
            fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            aux = fields.get("aux_loss")
            coef = getattr(self.module, "router_aux_loss_coef", None)
            if s.hf and aux is not None and coef is not None:
                loss = loss + coef * aux.to(loss.device)  # the MoE load-balancing loss, as the model adds it
            fields.update(loss=loss, logits=None)
            return type(out)(**fields)
        if s.hf and isinstance(out, tuple):
            if getattr(self.module.config, "output_router_logits", False) or kwargs.get("output_router_logits"):
                raise NotImplementedError(
                    "loss='chunked' with return_dict=False and output_router_logits=True: the auxiliary loss cannot "
                    "be found in the tuple; pass return_dict=True"
                )
            return (loss, *out[1:])  # to_tuple() of an output whose logits are None
        if isinstance(out, torch.Tensor):
            return loss
        if isinstance(out, (tuple, list)):
            return type(out)((None, loss, *out[2:]))
        return {**out, "logits": None, "loss": loss}


def _caller_level() -> int:
    """`warn_once` stacklevel, from `_ChunkedLoss.__call__`, of the frame that called the model: past memopt's and
    nn.Module's call machinery, whose depth depends on the hooks the model has."""
    internal = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(nn.modules.module.__file__))
    frame, level = sys._getframe(2), 2  # the caller of __call__ (level 1 is __call__ itself)
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def _is_model_output(out: Any) -> bool:
    """A transformers ModelOutput: a dataclass that is also a dict."""
    return dataclasses.is_dataclass(out) and isinstance(out, dict)


def _logits_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out.get("logits")
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return None


def remove_loss(model: nn.Module) -> None:
    for module in model.modules():
        uninstall(module, _ChunkedLoss)
        uninstall(module, _HeadCapture)


@register_transform(LossConfig, technique="loss", order=35, plan=_plan, check=_check_others, remove=remove_loss)
def _apply(model: nn.Module, config: LossConfig, plan: _Plan) -> list[Entry]:
    remove_loss(model)  # applying again replaces the old config
    s = plan.settings
    target = get_submodule(model, plan.target)
    head = get_submodule(model, plan.head)
    install(target, _ChunkedLoss, settings=s)
    tied = next((n for n, p in model.named_parameters(remove_duplicate=False)
                 if p is head.weight and not n.startswith(plan.head + ".")), None)
    notes = [f"nn.Linear {head.out_features}x{head.in_features}"]
    if tied is not None:
        notes.append(f"weight tied to {tied} (its gradient flows there)")
    if not head.weight.requires_grad:
        notes.append("frozen: no weight gradient computed")
    how = [f"shift={s.shift}", f"ignore_index={config.ignore_index}"]
    if s.softcap is not None:
        how.append(f"softcap={s.softcap}")
    if s.scale is not None:
        how.append(f"logit scale={s.scale:g}")
    how.append(f"chunk_size={config.chunk_size or 'auto'}")
    entries = [
        Entry("loss", plan.target, "applied",
              f"{type(target).__name__}: training forwards given {s.labels}= compute the loss chunked "
              f"({', '.join(how)}); their logits are None"),
        Entry("loss", plan.head, "applied", "output head: " + "; ".join(notes)),
    ]
    logger.info("memopt: chunked loss on %s (head %s)", type(target).__name__, plan.head)
    return entries


__all__ = ["LossConfig", "chunked_cross_entropy", "default_chunk_size", "register_loss", "remove_loss"]
