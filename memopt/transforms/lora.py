"""lora=: LoRA adapters with PEFT, injected in place (no PeftModel wrapper), so a quantized model still trains.

PEFT's `inject_adapter_in_model` swaps each target Linear (quantized or not) for a LoRA layer that keeps the
original as `base_layer` and freezes everything but the adapters. memopt adds what a demanding user expects:
- `state_dict` keys of the base weights stay as they were (`...q_proj.weight`, not `...q_proj.base_layer.weight`),
  through a state_dict hook and a load_state_dict pre-hook on each LoRA layer; adapters add their own keys.
- adapters of a bf16/fp16 model are kept in float32 (training precision), and so is the output head when it is
  not tied to the input embedding: the loss needs float32 logits anyway (transformers upcasts them), and a half
  head would keep its half logits alive beside that float32 copy until backward (batch x seq x vocab x 2 bytes).
  Nothing else is upcast, unlike `peft.prepare_model_for_kbit_training`, which upcasts every non-quantized
  parameter (embeddings, norms, head) to float32.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._log import logger
from .._modules import head_names, mha_projections, shared_weights, task_head_names
from .._record import Entry
from .._registry import register_transform
from ..config import LoraSettings

_BASE = "base_layer."


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise ImportError("lora= needs peft, which is not installed: pip install peft")


_ADAPTABLE = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")  # the Linear-like classes LoRA can wrap


def default_targets(model: nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    """"all-linear", decided by memopt for any model: every Linear-like layer (quantized ones included) except the
    output head, weights tied to another parameter, and nn.MultiheadAttention's projections (it reads their weights
    directly, so an adapter there would never run). Returns (target FQNs, [(skipped FQN, reason)])."""
    heads, shared, inside_mha = head_names(model), shared_weights(model), mha_projections(model)
    targets, skipped = [], []
    for fqn, module in model.named_modules():
        adaptable = isinstance(module, nn.Linear) or type(module).__name__ in _ADAPTABLE
        if not adaptable or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if ".lora_" in f".{fqn}" or fqn.endswith("base_layer"):
            continue  # already part of a LoRA layer
        if fqn in heads:
            skipped.append((fqn, "output head"))
        elif id(module.weight) in shared:
            skipped.append((fqn, "weight tied to another parameter"))
        elif fqn in inside_mha:
            skipped.append((fqn, "inside nn.MultiheadAttention, which reads the weight directly"))
        else:
            targets.append(fqn)
    return targets, skipped


def peft_config(settings: LoraSettings, targets: list[str]) -> Any:
    """The `peft.LoraConfig` that `settings` stands for; "all-linear" becomes memopt's explicit target list."""
    import copy

    import peft

    if settings.peft_config is not None:
        config = copy.copy(settings.peft_config)
        if config.target_modules == "all-linear":
            config.target_modules = targets
        return config
    alpha = 2 * settings.r if settings.alpha is None else settings.alpha
    target_modules = targets if settings.target_modules == "all-linear" else settings.target_modules
    return peft.LoraConfig(r=settings.r, lora_alpha=alpha, lora_dropout=settings.dropout,
                           target_modules=target_modules, bias="none")


@dataclass(frozen=True)
class _Plan:
    config: Any
    skipped: list[tuple[str, str]]


def _plan(model: nn.Module, settings: LoraSettings) -> _Plan:
    """Resolves the targets against the model before anything changes: a target that matches nothing raises here,
    not halfway through `apply` (after quantization has already swapped layers)."""
    require_peft()
    from peft.tuners.tuners_utils import check_target_module_exists

    targets, skipped = default_targets(model)
    config = peft_config(settings, targets)
    if not config.target_modules:
        raise ValueError(f"lora= found no Linear layer to adapt in {type(model).__name__} (besides the head); name "
                         "them with peft.LoraConfig(target_modules=[...])")
    names = [n for n, _ in model.named_modules()]
    if isinstance(config.target_modules, str):
        matched = any(check_target_module_exists(config, n) for n in names)
        unmatched = [] if matched else [config.target_modules]
    else:
        unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"lora target_modules {unmatched} matched no module; the model's Linear layers are e.g. "
                         f"{targets[:4]}")
    return _Plan(config, skipped if settings.target_modules == "all-linear" or settings.peft_config is None else [])


def _keep_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: `prefix.base_layer.weight` -> `prefix.weight` (the key the layer had before LoRA)."""
    for key in [k for k in state_dict if k.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix + _BASE):]] = state_dict.pop(key)


def _load_base_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook, the reverse of `_keep_base_keys`: every key of this layer that is not an adapter's
    (`lora_*`) belongs to the base layer (`weight`, `bias`, a quantized weight's `weight.absmax`, ...)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if not rest.startswith(("lora_", _BASE)):
            state_dict[prefix + _BASE + rest] = state_dict.pop(key)


def _float_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _head_in_float32(model: nn.Module) -> list[Entry]:
    """Upcast a half-precision, untied, plain-Linear output head (see the module docstring)."""
    entries = []
    shared = shared_weights(model)
    for fqn in sorted(head_names(model)):
        head = model.get_submodule(fqn)
        if type(head) is not nn.Linear or head.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        if id(head.weight) in shared:
            entries.append(Entry("lora:head", fqn, "skipped", "tied to the input embedding: stays in its dtype"))
            continue
        for p in head.parameters():  # in place, not head.float(): keeps the Parameter objects (and fake tensors)
            p.data = p.data.float()
        head.register_forward_pre_hook(_float_input)
        entries.append(Entry("lora:head", fqn, "applied", "output head computes in float32 (the loss needs float32 "
                                                          "logits; no half copy kept beside them)"))
    return entries


def _task_heads_train(model: nn.Module) -> list[Entry]:
    """A task head (a classifier new to the fine-tune) trains in full, in float32, as PEFT's `modules_to_save` does
    for SEQ_CLS: an adapter on a random layer has nothing to adapt."""
    entries = []
    for fqn in sorted(task_head_names(model)):
        head = model.get_submodule(fqn)
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in head.parameters()):
            head.register_forward_pre_hook(_float_input)
        for p in head.parameters():
            if p.is_floating_point():
                p.data = p.data.float()
                p.requires_grad_(True)
        entries.append(Entry("lora:head", fqn, "applied", "task head trains in full, in float32 (as PEFT's "
                                                          "modules_to_save)"))
    return entries


@register_transform(LoraSettings, technique="lora", order=20, plan=_plan)
def _apply(model: nn.Module, settings: LoraSettings, plan: _Plan) -> list[Entry]:
    import peft
    from peft.tuners.lora import LoraLayer

    peft.inject_adapter_in_model(plan.config, model)
    entries = [Entry("lora", fqn, "skipped", reason) for fqn, reason in plan.skipped]
    for fqn, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for p in module.parameters():
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()  # adapters train in float32; the frozen base keeps its dtype
        module.register_state_dict_post_hook(_keep_base_keys)
        module.register_load_state_dict_pre_hook(_load_base_keys)
        base = type(module.get_base_layer()).__name__
        entries.append(Entry("lora", fqn, "applied", f"r={plan.config.r}, alpha={plan.config.lora_alpha} on {base}"))
    entries += _head_in_float32(model)
    entries += _task_heads_train(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("memopt: LoRA on %d layers; %d of %d parameters train", len(entries), trainable, total)
    return entries
