"""quant=: weights in 4 or 8 bits with bitsandbytes (`Linear4bit` NF4/FP4, `Linear8bitLt` LLM.int8), CPU and CUDA.

Which layers: `nn.Linear` (exactly; subclasses have their own forward) and transformers' `Conv1D` (GPT-2 family,
transposed to Linear layout). Left alone, each with its reason in `memopt.applied(model)`: the output head
(`lm_head`, the model's output embedding, or any Linear whose weight is tied to another parameter such as the
input embedding), the projections inside `nn.MultiheadAttention` (it reads their weights directly), layers named
by `skip=`, and layers the format cannot take.

The layers are swapped one at a time, so the extra memory while quantizing is one layer's float weight. The
quantized weights are frozen (they have no gradient); train them through LoRA (`lora=`).
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._log import logger, warn_once
from .._patch import ForwardPatch, install
from .._modules import get_submodule, head_names, mha_projections, shared_weights, transformers_class
from .._record import Entry
from .._registry import register_transform
from ..config import QuantConfig


def require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: pip install bitsandbytes")


def _conv1d() -> type | None:
    if transformers_class("PreTrainedModel") is None:
        return None
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@dataclass(frozen=True)
class _Target:
    fqn: str
    module: nn.Module
    transposed: bool  # Conv1D keeps its weight as (in, out)


@dataclass(frozen=True)
class _Plan:
    targets: list[_Target]
    skipped: list[tuple[str, str]]


def _plan(model: nn.Module, config: QuantConfig) -> _Plan:
    require_bitsandbytes(f"quant={config.name!r}")
    lora = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1].startswith("lora_")]
    if lora:
        raise ValueError(
            f"quant={config.name!r} on a model that already has LoRA adapters ({lora[0]}, ...) would quantize the "
            "adapters and leave nothing to train; pass quant= and lora= in one call (quantization runs first), or "
            "quantize before adding LoRA"
        )
    conv1d = _conv1d()
    heads = head_names(model) if config.skip_head else set()
    shared = shared_weights(model)
    inside_mha = mha_projections(model)
    unmatched = set(config.skip)
    targets, skipped = [], []
    for fqn, module in model.named_modules():
        is_linear = type(module) is nn.Linear
        is_conv1d = conv1d is not None and type(module) is conv1d
        if not (is_linear or is_conv1d or isinstance(module, nn.Linear)):
            continue
        hits = {p for p in config.skip if fnmatch.fnmatchcase(fqn, p) or fqn == p}
        unmatched -= hits
        if hits:
            skipped.append((fqn, f"skip={sorted(hits)}"))
        elif fqn in inside_mha:
            skipped.append((fqn, "inside nn.MultiheadAttention, which reads the weight directly"))
        elif not (is_linear or is_conv1d):
            skipped.append((fqn, f"{type(module).__name__} subclasses nn.Linear with its own forward"))
        elif fqn in heads:
            skipped.append((fqn, "output head (skip_head=True): logits stay full precision"))
        elif id(module.weight) in shared:
            skipped.append((fqn, "weight tied to another parameter (e.g. the input embedding)"))
        elif module.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            skipped.append((fqn, f"weight dtype {module.weight.dtype} is not a float format bitsandbytes takes"))
        elif config.bits == 4 and _in_features(module, is_conv1d) % config.blocksize:
            skipped.append((fqn, f"4-bit needs in_features divisible by blocksize={config.blocksize} (bitsandbytes' "
                                 f"CPU kernels quantize whole blocks per row); this layer has {_in_features(module, is_conv1d)}"))
        else:
            targets.append(_Target(fqn, module, is_conv1d))
    if unmatched:
        raise ValueError(
            f"QuantConfig(skip=...) patterns {sorted(unmatched)} matched no Linear layer; the model's Linear layers "
            f"are e.g. {[t.fqn for t in targets[:4]]}"
        )
    return _Plan(targets, skipped)


def _in_features(module: nn.Module, is_conv1d: bool) -> int:
    return module.weight.shape[0] if is_conv1d else module.weight.shape[1]


def _quantized(target: _Target, config: QuantConfig) -> nn.Module:
    import bitsandbytes as bnb

    old = target.module
    weight = old.weight.detach()
    if target.transposed:
        weight = weight.t()  # Conv1D (in, out) -> Linear (out, in)
    out_features, in_features = weight.shape
    device = weight.device
    compute_dtype = config.compute_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    has_bias = old.bias is not None
    if config.bits == 4:
        new = bnb.nn.Linear4bit(
            in_features, out_features, bias=has_bias, compute_dtype=compute_dtype,
            compress_statistics=config.double_quant, quant_type=config.quant_type, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, quant_type=config.quant_type,
            compress_statistics=config.double_quant, blocksize=config.blocksize, module=new,
        )._quantize(device)
    else:
        new = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=config.threshold,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
        new.weight = new.weight.to(device)  # quantizes: int8 rows + per-row scale (SCB), no float copy kept
        keep_no_input(new)
    if has_bias:
        new.bias = nn.Parameter(old.bias.detach().to(device), requires_grad=old.bias.requires_grad)
    if config.bits == 4:
        new.register_load_state_dict_pre_hook(_load_4bit_state)
        # bitsandbytes 0.50 repacks the weight in place the first time the layer runs in eval without grad on an
        # AVX512-BF16 CPU, and from then on its matmul has no backward: after one evaluation, the gradient through
        # the layer (LoRA's input gradient) is silently dropped. Training first: no repack.
        new.support_avx512bf16_for_cpu = False
    new.train(old.training)
    return new


# -- 8-bit layers keep nothing for backward but their frozen weight -------------------------------------------------
class _FrozenInt8Matmul(torch.autograd.Function):
    """``y = x @ W.T + b`` for a frozen LLM.int8 weight, with bitsandbytes' own forward and input gradient.

    bitsandbytes' MatMul8bitLt (CUDA) and MatMul8bitFp (CPU) keep their input ``x`` as a plain ``ctx`` attribute
    for the weight gradient, even when the weight is frozen, where backward never reads it. Being an attribute,
    not a saved tensor, it escapes activation checkpointing: every 8-bit layer's input stayed alive from forward
    to backward (``batch x seq x in_features`` bytes per layer). Here nothing is kept but the layer: the input
    gradient is ``grad @ dequantize(CB, SCB)``, the formula bitsandbytes' backward uses, so results and gradients
    are bitsandbytes' own (tested bit for bit)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, patch: "_Int8NoInput") -> torch.Tensor:
        ctx.state = patch.module.state  # holds the int8 weight (CB) and its row scales (SCB): parameters, not activations
        ctx.dtype_x, ctx.shape_x = x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return patch.call_inner(x)  # bitsandbytes' forward; under Function.forward no graph (and no ctx) is kept

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            state = ctx.state
            w = state.CB.to(ctx.dtype_x, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))  # (out, in)
            grad_x = torch.matmul(grad.to(ctx.dtype_x), w).view(ctx.shape_x)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        return grad_x, grad_bias, None


class _Int8NoInput(ForwardPatch):
    """The forward of a frozen `bnb.nn.Linear8bitLt` that memopt quantized: through `_FrozenInt8Matmul` when
    autograd records it, bitsandbytes' own forward otherwise (eval, no_grad, a weight that trains)."""

    rank = 5  # innermost: attention and checkpointing patches live on other modules, but stay outside anyway

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        bias = module.bias
        frozen = not module.weight.requires_grad and not getattr(module.state, "has_fp16_weights", False)
        wants_grad = x.requires_grad or (bias is not None and bias.requires_grad)
        if args or kwargs or not (frozen and torch.is_grad_enabled() and wants_grad):
            return self.call_inner(x, *args, **kwargs)
        return _FrozenInt8Matmul.apply(x, bias, self)


def keep_no_input(module: nn.Module) -> None:
    """Make a frozen 8-bit layer keep nothing for backward but its weight (see `_FrozenInt8Matmul`)."""
    install(module, _Int8NoInput)


def _load_4bit_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """`load_state_dict` into a Linear4bit: its state_dict carries the quantization state next to the packed weight
    (`weight.absmax`, `weight.quant_map`, ...), which bitsandbytes only reads back through transformers' loader."""
    key = prefix + "weight"
    extra = {k[len(key) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
    if extra:
        from bitsandbytes.functional import QuantState

        module.weight.quant_state = QuantState.from_dict(extra, device=module.weight.device)


@register_transform(QuantConfig, technique="quant", order=10, plan=_plan)
def _apply(model: nn.Module, config: QuantConfig, plan: _Plan) -> list[Entry]:
    entries = [Entry("quant", fqn, "skipped", reason) for fqn, reason in plan.skipped]
    for target in plan.targets:
        parent_name, _, child = target.fqn.rpartition(".")
        parent = get_submodule(model, parent_name)
        new = _quantized(target, config)
        setattr(parent, child, new)
        shape = f"{new.out_features}x{new.in_features}"
        entries.append(Entry("quant", target.fqn, "applied", f"{config.name} ({type(target.module).__name__} {shape})"))
    if not plan.targets:
        warn_once(
            f"quant-nothing-{type(model).__name__}",
            f"quant={config.name!r} found no layer to quantize in {type(model).__name__} (it quantizes nn.Linear and "
            "transformers' Conv1D; see memopt.applied(model) for what was skipped and why)",
            stacklevel=3,
        )
    logger.info("memopt: quantized %d layers to %s, skipped %d", len(plan.targets), config.name, len(plan.skipped))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(entries, key=lambda e: order.get(e.fqn, 0))


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of a layer's weight as stored: the packed weight plus its quantization state (absmax, nested
    statistics, code tables, int8 row scales)."""
    weight = getattr(module, "weight", None)
    return 0 if weight is None else sum(t.numel() * t.element_size() for t in stored_tensors(weight))


def stored_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """A parameter and what makes it up: a bitsandbytes weight's quantization state (absmax, code, nested
    statistics, offset) and int8 row scales (SCB)."""
    found = [p]
    state = getattr(p, "quant_state", None)
    if state is not None:
        found += _state_tensors(state)
    scb = getattr(p, "SCB", None)
    if isinstance(scb, torch.Tensor):
        found.append(scb)
    return found


def _state_tensors(state: Any) -> list[torch.Tensor]:
    found = [getattr(state, k, None) for k in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [getattr(nested, k, None) for k in ("absmax", "code")]
    return [t for t in found if isinstance(t, torch.Tensor)]
