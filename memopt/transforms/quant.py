"""quant=: weights in 4 or 8 bits with bitsandbytes (`Linear4bit` NF4/FP4, `Linear8bitLt` LLM.int8), CPU and CUDA.

Which layers: `nn.Linear` (exactly; subclasses have their own forward) and transformers' `Conv1D` (GPT-2 family,
transposed to Linear layout). Left alone, each with its reason in `memopt.applied(model)`: the output head
(`lm_head`, the model's output embedding, or any Linear whose weight is tied to another parameter such as the
input embedding), the projections inside `nn.MultiheadAttention` (it reads their weights directly), layers named
by `skip=`, and layers the format cannot take.

The layers are swapped one at a time, so the extra memory while quantizing is one layer's float weight. The
quantized weights are frozen (they have no gradient); train them through LoRA (`lora=`).

Applying again: layers already quantized in the requested format are kept (and recorded as quantized), layers in
another format are left as they are with that reason; a call that could only meet other formats raises. A model
on the meta device is refused before bitsandbytes runs (it has no weights to quantize, and bitsandbytes would cache
its code table on meta for the rest of the process).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from .._log import logger, warn_once
from .._patch import ForwardPatch, install
from .._modules import get_submodule, head_names, mha_projections, shared_weights, transformers_class
from .._record import Entry, record_of
from .._registry import register_transform
from ..config import QuantConfig


def require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{what} needs bitsandbytes, which is not installed: pip install bitsandbytes")


# bitsandbytes 0.50, imported on a CPU with AVX512-BF16, tries to fetch a fused 4-bit kernel from the Hugging Face Hub
# (`kernels-community/quantization-bitsandbytes`, through the optional `kernels` package) and logs a warning when it
# cannot. That kernel only serves the CPU inference repack (`packing_format_for_cpu`), which memopt turns off on the
# layers it quantizes (see `_quantized`): nothing memopt does is slower without it.
_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNELS_EXPLAINED = (
    "bitsandbytes could not load its optional fused CPU 4-bit inference kernel from the Hugging Face Hub "
    "(kernels-community, needs `pip install kernels` and network access): %s. memopt's quantized layers do not use it "
    "(they keep bitsandbytes' AVX512-BF16 inference repack off, which is the only path that kernel serves)"
)


class _KernelsMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" not in str(record.msg):
            return True
        logger.info(_KERNELS_EXPLAINED, record.args[0] if record.args else record.getMessage())
        return False


@contextlib.contextmanager
def bitsandbytes_import() -> Iterator[None]:
    """Import bitsandbytes (directly, or through peft or transformers) inside this block: its one warning about an
    optional kernel memopt does not use goes to memopt's logger, at INFO, with the reason. A user's own earlier or
    later import of bitsandbytes is left alone."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    log = logging.getLogger(_KERNELS_LOGGER)  # the logger bitsandbytes' module will get when it is imported
    quiet = _KernelsMessage()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


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
    kept: list[tuple[str, str]] = field(default_factory=list)  # (FQN, detail) of layers already quantized so


_BASE = ".base_layer"  # PEFT keeps the layer it adapts under this name (memopt keeps its state_dict keys)


def _plan(model: nn.Module, config: QuantConfig) -> _Plan:
    require_bitsandbytes(f"quant={config.name!r}")
    adapters = tuple(n + "." for n, m in model.named_modules() if hasattr(m, "base_layer")
                     and any(c.startswith("lora_") for c, _ in m.named_children()))
    conv1d = _conv1d()
    heads = head_names(model) if config.skip_head else set()
    shared = shared_weights(model)
    inside_mha = mha_projections(model)
    unmatched = set(config.skip)
    targets, skipped, kept, other_format, under_lora = [], [], [], [], []
    for path, module in model.named_modules():
        if path.startswith(adapters) and not path.endswith(_BASE):
            continue  # LoRA's own layers: never quantized
        fqn = path.removesuffix(_BASE) if path.startswith(adapters) else path  # the name its state_dict keys keep
        is_linear = type(module) is nn.Linear
        is_conv1d = conv1d is not None and type(module) is conv1d
        if not (is_linear or is_conv1d or isinstance(module, nn.Linear)):
            continue
        hits = {p for p in config.skip if fnmatch.fnmatchcase(fqn, p) or fqn == p}
        unmatched -= hits
        found = _format_of(module)
        if found is not None:  # quantized already (an earlier apply, or transformers' loader)
            differs = {k: v for k, v in found.items() if _wanted(config).get(k, v) != v}
            if differs:
                other_format.append((fqn, found, differs))
                skipped.append((fqn, f"already quantized with {_describe(found)}: kept as is (quantizing a quantized "
                                     "weight again would compound the error)"))
            else:
                kept.append((fqn, f"{config.name} ({type(module).__name__} {module.out_features}x"
                                  f"{module.in_features}; already quantized: kept)"))
        elif hits:
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
        elif path != fqn:
            under_lora.append(fqn)
        else:
            targets.append(_Target(fqn, module, is_conv1d))
    if under_lora:
        raise ValueError(
            f"quant={config.name!r} on a model that already has LoRA adapters ({under_lora[0]}, ...) would quantize "
            "the layers under the adapters after the fact; pass quant= and lora= in one call (quantization runs "
            "first), or quantize before adding LoRA"
        )
    if other_format and not targets and not kept:  # the call could do nothing but leave another format behind
        fqn, found, differs = other_format[0]
        raise ValueError(
            f"quant={config.name!r}: {len(other_format)} layers ({fqn}, ...) are already quantized with "
            f"{_describe(found)}, where this asks for {_describe({k: _wanted(config)[k] for k in differs})}; a "
            "quantized weight cannot be quantized again without compounding the error. Pass the quant= that made "
            "them (applying the same again keeps them), or load the model in full precision for another format"
        )
    if unmatched:
        raise ValueError(
            f"QuantConfig(skip=...) patterns {sorted(unmatched)} matched no Linear layer; the model's Linear layers "
            f"are e.g. {[t.fqn for t in targets[:4]]}"
        )
    on_meta = [t.fqn for t in targets if t.module.weight.device.type == "meta"]
    if on_meta:
        # Quantizing meta weights would give meta layers (no values to quantize) and leave bitsandbytes' code
        # table, cached on the device of its first use, on meta: every later 4-bit quantization would then fail.
        raise ValueError(
            f"quant={config.name!r}: {len(on_meta)} of the layers to quantize ({on_meta[0]}, ...) have their weights on "
            "the meta device, so there is nothing to quantize; load the weights first (from_pretrained, or "
            "model.to_empty(device=...) and load_state_dict) and apply quant= then, or use memopt.estimate(model, "
            "quant=...) to size a model without its weights"
        )
    return _Plan(targets, skipped, kept)


def _format_of(module: nn.Module) -> dict[str, Any] | None:
    """How a bitsandbytes layer is quantized, in QuantConfig's terms; None for a layer that is not."""
    name = type(module).__name__
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        w = module.weight
        return {"bits": 4, "quant_type": w.quant_type, "double_quant": bool(w.compress_statistics),
                "blocksize": w.blocksize, "compute_dtype": module.compute_dtype}
    if name == "Linear8bitLt":
        return {"bits": 8, "threshold": float(module.state.threshold)}
    return {"bits": name}  # another bitsandbytes layer: never one memopt made


def _wanted(config: QuantConfig) -> dict[str, Any]:
    if config.bits == 8:
        return {"bits": 8, "threshold": float(config.threshold)}
    wanted = {"bits": 4, "quant_type": config.quant_type, "double_quant": config.double_quant,
              "blocksize": config.blocksize}
    if config.compute_dtype is not None:  # None: the layer's own dtype, whatever it was
        wanted["compute_dtype"] = config.compute_dtype
    return wanted


def _describe(fmt: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, torch.dtype) else f"{k}={v}" for k, v in fmt.items())


def _in_features(module: nn.Module, is_conv1d: bool) -> int:
    return module.weight.shape[0] if is_conv1d else module.weight.shape[1]


def _quantized(target: _Target, config: QuantConfig) -> nn.Module:
    with bitsandbytes_import():
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


def _kept_entries(model: nn.Module, kept: list[tuple[str, str]]) -> list[Entry]:
    """Entries of layers already quantized: what memopt recorded when it quantized them, if it did."""
    recorded = {e.fqn: e for e in record_of(model).entries if e.technique == "quant" and e.status == "applied"}
    return [recorded.get(fqn) or Entry("quant", fqn, "applied", detail) for fqn, detail in kept]


@register_transform(QuantConfig, technique="quant", order=10, plan=_plan)
def _apply(model: nn.Module, config: QuantConfig, plan: _Plan) -> list[Entry]:
    entries = [Entry("quant", fqn, "skipped", reason) for fqn, reason in plan.skipped]
    entries += _kept_entries(model, plan.kept)
    for target in plan.targets:
        parent_name, _, child = target.fqn.rpartition(".")
        parent = get_submodule(model, parent_name)
        new = _quantized(target, config)
        setattr(parent, child, new)
        shape = f"{new.out_features}x{new.in_features}"
        entries.append(Entry("quant", target.fqn, "applied", f"{config.name} ({type(target.module).__name__} {shape})"))
    if not plan.targets and not plan.kept:
        warn_once(
            f"quant-nothing-{type(model).__name__}",
            f"quant={config.name!r} found no layer to quantize in {type(model).__name__} (it quantizes nn.Linear and "
            "transformers' Conv1D; see memopt.applied(model) for what was skipped and why)",
        )
    logger.info("memopt: quantized %d layers to %s, skipped %d", len(plan.targets), config.name, len(plan.skipped))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    entries = sorted(entries, key=lambda e: order.get(e.fqn, 0))
    if plan.targets or plan.kept:
        entries.append(_compile_note(config))
    return entries


def _compile_note(config: QuantConfig) -> Entry:
    """What quantized layers do under torch.compile (`memopt.applied`'s "quant:compile" row)."""
    if config.bits == 4:
        return Entry("quant:compile", "", "applied", "bitsandbytes' 4-bit matmul (MatMul4Bit) is traced into the graph")
    return Entry("quant:compile", "", "skipped",
                 "bitsandbytes' Linear8bitLt updates its own layer state (MatmulLtState) in every forward: Dynamo "
                 "traces that outside checkpointed blocks, but inside one it breaks the graph at each 8-bit layer "
                 "(a side effect in a recompute region); 4-bit layers have no such break")


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
