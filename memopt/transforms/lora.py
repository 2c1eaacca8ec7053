"""lora=: LoRA adapters with PEFT, injected in place (no PeftModel wrapper), so a quantized model still trains.

PEFT's `inject_adapter_in_model` swaps each target Linear (quantized or not) for a LoRA layer that keeps the
original as `base_layer` and freezes everything but the adapters. memopt adds what a demanding user expects:
- `state_dict` keys of the base weights stay as they were (`...q_proj.weight`, not `...q_proj.base_layer.weight`),
  through a state_dict hook and a load_state_dict pre-hook on each LoRA layer; adapters add their own keys.
- adapters of a bf16/fp16 model are kept in float32 (training precision), and so is the output head when it is
  not tied to the input embedding: the loss needs float32 logits anyway (transformers upcasts them), and a half
  head would keep its half logits alive beside that float32 copy until backward (batch x seq x vocab x 2 bytes).
  Not where `loss="chunked"` computes the head (in the same `apply` call or an earlier one): no full logits exist
  there, so an upcast head would only cost 2 more bytes per head weight. `LoraSettings(head_in_float32=...)`
  decides it either way. Nothing else is upcast, unlike `peft.prepare_model_for_kbit_training`, which upcasts every
  non-quantized parameter (embeddings, norms, head) to float32.
- everything PEFT would fail on halfway is checked when the plan is made, before quantization in the same call
  has swapped a layer: targets that match nothing, targets PEFT cannot wrap (a LayerNorm), a rank above every
  adapted layer's min(in, out). Applying the same LoRA again keeps the adapters (PEFT would re-initialise them);
  other LoRA settings on a model with adapters are refused.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .._log import logger
from .._modules import head_names, mha_projections, shared_weights, task_head_names
from .._record import Entry, record_of
from .._registry import register_transform
from ..config import LoraSettings, LossConfig
from .quant import _conv1d, bitsandbytes_import

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
    config: Any  # the peft.LoraConfig to inject
    skipped: list[tuple[str, str]]
    full_rank: dict[str, int]  # FQN -> min(in, out) of the layers where the rank is already full
    keep: bool = False  # the model already has exactly these adapters: applying again changes nothing
    # output heads the chunked loss of the same `apply` call computes (filled in by `_check`, before anything changes)
    chunked_heads: set[str] = field(default_factory=set)


def _plan(model: nn.Module, settings: LoraSettings) -> _Plan:
    """Everything PEFT would trip over midway is found here, before anything changes (after quantization has
    swapped layers, a failure would leave the model half-changed): targets that match nothing, targets PEFT cannot
    wrap, a rank no layer can use, adapters already in the model that applying LoRA again would re-initialise."""
    require_peft()
    with bitsandbytes_import():  # peft imports bitsandbytes
        import peft  # noqa: F401  (imported here, inside the block)

    targets, skipped = default_targets(model)
    config = peft_config(settings, targets)
    if not config.target_modules:
        raise ValueError(f"lora= found no Linear layer to adapt in {type(model).__name__} (besides the head); name "
                         "them with peft.LoraConfig(target_modules=[...])")
    resolved = _resolve(model, config, targets)
    unsupported = [(fqn, m) for fqn, m in resolved.items() if not _peft_can_wrap(m, config)]
    if unsupported:
        shown = ", ".join(f"{fqn} ({type(m).__name__})" for fqn, m in unsupported[:4])
        raise ValueError(
            f"PEFT cannot put LoRA on {len(unsupported)} of the modules lora target_modules={config.target_modules!r} "
            f"matches: {shown}{', ...' if len(unsupported) > 4 else ''}. PEFT adapts nn.Linear (quantized ones "
            "included), transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention; name those "
            f"layers instead (the model's Linear layers are e.g. {targets[:4]}), or register a LoRA layer for the "
            "type with peft.LoraConfig._register_custom_module"
        )
    ranks = {fqn: _rank_of(config, fqn) for fqn in resolved}
    bounds = {fqn: b for fqn, b in ((fqn, _rank_bound(m)) for fqn, m in resolved.items()) if b is not None}
    if bounds and all(ranks[fqn] > b for fqn, b in bounds.items()):
        widest = max(bounds, key=bounds.get)
        raise ValueError(
            f"lora r={config.r} is above min(in_features, out_features) of every layer it adapts (at most "
            f"{bounds[widest]} here, {widest}): the update B @ A has rank at most min(r, in, out), so a larger r "
            "only adds parameters (from r = min(in, out) on, an adapter has more parameters than the weight it "
            f"adapts). Use a rank of at most {bounds[widest]} (8 to 64 is usual)"
        )
    full_rank = {fqn: b for fqn, b in bounds.items() if ranks[fqn] >= b}
    keep = _same_as_existing(model, settings, config, resolved)
    own = settings.target_modules == "all-linear" or settings.peft_config is None
    return _Plan(config, skipped if own else [], full_rank, keep)


def _resolve(model: nn.Module, config: Any, targets: list[str]) -> dict[str, nn.Module]:
    """FQN -> module of what `peft.inject_adapter_in_model(config, model)` would adapt, matched as PEFT matches
    (`check_target_module_exists`: suffixes, a regex string, exclude_modules, layers_to_transform), skipping the
    insides of existing adapter layers as PEFT does. A list entry that matches nothing raises."""
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    named = list(model.named_modules())
    names = [n for n, _ in named]
    if isinstance(config.target_modules, str):
        unmatched = [] if any(check_target_module_exists(config, n) for n in names if n) else [config.target_modules]
    else:
        unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"lora target_modules {unmatched} matched no module; the model's Linear layers are e.g. "
                         f"{targets[:4]}")
    inside = tuple(n + "." for n, m in named if isinstance(m, BaseTunerLayer))
    resolved = {n: m for n, m in named if n and not n.startswith(inside) and check_target_module_exists(config, n)}
    if not resolved:
        raise ValueError(f"lora target_modules={config.target_modules!r} selects no module once exclude_modules / "
                         f"layers_to_transform are applied; the model's Linear layers are e.g. {targets[:4]}")
    return resolved


# Layer types PEFT's LoRA dispatchers take (peft.tuners.lora.model.LoraModel._create_new_module): its default layers,
# and those of the quantization libraries it has a dispatcher for (bitsandbytes' layers are nn.Linear subclasses).
_PEFT_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
_PEFT_BACKENDS = ("hqq", "awq", "auto_gptq", "gptqmodel", "eetq", "aqlm", "torchao", "megatron", "transformer_engine",
                  "neural_compressor")


def _base(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) and hasattr(module, "base_layer") else module


def _peft_can_wrap(module: nn.Module, config: Any) -> bool:
    base = _base(module)
    custom = tuple(getattr(config, "_custom_modules", None) or ())
    conv1d = _conv1d()
    return (
        (bool(custom) and isinstance(base, custom))
        or isinstance(base, _PEFT_LAYERS)
        or (conv1d is not None and isinstance(base, conv1d))
        or type(base).__module__.split(".")[0] in _PEFT_BACKENDS
    )


def _rank_bound(module: nn.Module) -> int | None:
    """min(in, out) of the layer: the highest rank an update of its weight can have."""
    base = _base(module)
    if isinstance(base, nn.Embedding):
        return min(base.num_embeddings, base.embedding_dim)
    if isinstance(base, nn.MultiheadAttention):
        return base.embed_dim
    dims = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if all(isinstance(d, int) for d in dims):
        return min(dims)  # Linear, and quantized layers, whose packed weight has another shape
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return min(weight.shape[0], math.prod(weight.shape[1:]))  # Conv (out, in / groups, *kernel), Conv1D (in, out)
    return None


def _pattern(config: Any, key: str, fqn: str, default: Any) -> Any:
    """PEFT's per-layer override (`rank_pattern`, `alpha_pattern`) for `fqn`, as PEFT matches it."""
    from peft.utils.other import get_pattern_key

    patterns = getattr(config, key, None) or {}
    return patterns.get(get_pattern_key(patterns.keys(), fqn), default)


def _rank_of(config: Any, fqn: str) -> int:
    return _pattern(config, "rank_pattern", fqn, config.r)


def _asked(config: Any, fqn: str) -> tuple:
    """(r, alpha, scaling, dropout, DoRA) that `config` gives the layer `fqn`, as a LoRA layer stores them."""
    r = _rank_of(config, fqn)
    alpha = _pattern(config, "alpha_pattern", fqn, config.lora_alpha)
    scaling = alpha / math.sqrt(r) if getattr(config, "use_rslora", False) else alpha / r
    return r, alpha, scaling, float(config.lora_dropout), bool(getattr(config, "use_dora", False))


def _stored(layer: nn.Module, name: str = "default") -> tuple:
    dropout = layer.lora_dropout[name]
    return (layer.r[name], layer.lora_alpha[name], layer.scaling[name],
            float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0, bool(layer.use_dora.get(name, False)))


def _existing(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _same_as_existing(model: nn.Module, settings: LoraSettings, config: Any, resolved: dict[str, nn.Module]) -> bool:
    """True if the model already has the adapters `config` asks for (then applying again keeps them); False if it
    has none. Raises if it has others: PEFT would re-initialise the ones it targets again (their training lost,
    and an optimizer holding parameters no longer in the model) and leave the rest."""
    existing = _existing(model)
    if not existing:
        return False
    have = {fqn: _stored(m) if set(m.r) == {"default"} else None for fqn, m in existing.items()}
    want = {fqn: _asked(config, fqn) for fqn in resolved}
    if have == want:
        return True
    names = sorted({a for m in existing.values() for a in m.r} - {"default"})
    valid = {fqn: v for fqn, v in have.items() if v is not None}

    def values(d: dict, i: int) -> set:
        return {v[i] for v in d.values()}

    differs = [what for what, i in (("rank", 0), ("alpha", 1), ("dropout", 3), ("DoRA", 4))
               if values(valid, i) != values(want, i)]
    if not differs and values(valid, 2) != values(want, 2):
        differs.append("scaling (use_rslora)")
    if set(have) != set(want):
        differs.append("layers")
    if names:
        differs.append(f"adapter names: {names} besides PEFT's 'default'")
    asked = f"lora={settings.r}" if settings == LoraSettings(r=settings.r) else (
        "lora=peft.LoraConfig(...)" if settings.peft_config is not None else f"lora={settings!r}")
    raise ValueError(
        f"the model already has LoRA adapters ({_describe(valid, have) if valid else f'on {len(have)} layers'}); "
        f"{asked} asks for {_describe(want, want)} (they differ in {', '.join(differs)}). Applying LoRA again "
        "would re-initialise them (their training lost; an optimizer would hold parameters no longer in the "
        "model). Pass the lora= value that made them to keep them (applying the same LoRA again changes nothing), "
        "or start from the model without adapters for other ones"
    )


def _describe(values: dict[str, tuple], layers: dict) -> str:
    """'r=8, alpha=16 on 14 layers (model.layers.0.self_attn.q_proj, ...)', or the sets of values where they vary."""
    parts = []
    for key, i in (("r", 0), ("alpha", 1), ("dropout", 3)):
        seen = sorted({v[i] for v in values.values()})
        if key == "dropout" and seen == [0.0]:
            continue
        parts.append(f"{key}={seen[0]:g}" if len(seen) == 1 else f"{key} in {{{', '.join(f'{x:g}' for x in seen)}}}")
    if any(v[4] for v in values.values()):
        parts.append("DoRA")
    first = sorted(layers)[:2]
    return f"{', '.join(parts)} on {len(layers)} layers ({', '.join(first)}{', ...' if len(layers) > 2 else ''})"


def _check(model: nn.Module, settings: LoraSettings, plan: _Plan, others: list[tuple[Any, Any]]) -> None:
    """Notes the heads a chunked loss of the same call will compute: their logits never exist in full, so they
    need no float32 upcast (the plans of one `apply` are all made before any transform runs)."""
    for other, other_plan in others:
        if isinstance(other, LossConfig) and isinstance(getattr(other_plan, "head", None), str):
            plan.chunked_heads.add(other_plan.head)


def _chunked_heads(model: nn.Module) -> set[str]:
    """FQNs of the output heads an earlier `apply(loss="chunked")` computes."""
    from .._patch import find
    from .loss import _ChunkedLoss

    heads = set()
    for fqn, module in model.named_modules():
        patch = find(module, _ChunkedLoss)
        if patch is not None:
            heads.add(f"{fqn}.{patch.settings.head}" if fqn else patch.settings.head)
    return heads


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


def _head_in_float32(model: nn.Module, upcast: bool | None, chunked: set[str]) -> list[Entry]:
    """Upcast a half-precision, untied, plain-Linear output head (see the module docstring), unless `upcast` is False,
    or None and the chunked loss computes the head (FQNs in `chunked`)."""
    entries = []
    shared = shared_weights(model)
    for fqn in sorted(head_names(model)):
        head = model.get_submodule(fqn)
        if type(head) is not nn.Linear or head.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        dtype = str(head.weight.dtype).replace("torch.", "")
        if id(head.weight) in shared:
            entries.append(Entry("lora:head", fqn, "skipped", "tied to the input embedding: stays in its dtype"))
            continue
        if upcast is False:
            entries.append(Entry("lora:head", fqn, "skipped", f"stays {dtype} (LoraSettings(head_in_float32=False))"))
            continue
        if upcast is None and fqn in chunked:
            entries.append(Entry("lora:head", fqn, "skipped", f"stays {dtype}: loss='chunked' computes it chunk by "
                                                              "chunk, with no full logits to keep in float32"))
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


def _kept(model: nn.Module) -> list[Entry]:
    """The entries of adapters already in the model: those memopt recorded when it added them, or, for adapters
    added by PEFT directly, one per layer."""
    recorded = [e for e in record_of(model).entries if e.technique.split(":")[0] == "lora"]
    if recorded:
        return recorded
    return [Entry("lora", fqn, "applied", f"r={m.r['default']}, alpha={m.lora_alpha['default']} on "
                                          f"{type(m.get_base_layer()).__name__} (already in the model: kept)")
            for fqn, m in _existing(model).items()]


@register_transform(LoraSettings, technique="lora", order=20, plan=_plan, check=_check)
def _apply(model: nn.Module, settings: LoraSettings, plan: _Plan) -> list[Entry]:
    if plan.keep:
        return _kept(model)
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
        r = module.r["default"]
        detail = f"r={r}, alpha={module.lora_alpha['default']:g} on {base}"
        if fqn in plan.full_rank:
            detail += f"; r={r} is full rank here: min(in, out) = {plan.full_rank[fqn]}"
        entries.append(Entry("lora", fqn, "applied", detail))
    entries += _head_in_float32(model, settings.head_in_float32, plan.chunked_heads | _chunked_heads(model))
    entries += _task_heads_train(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("memopt: LoRA on %d layers; %d of %d parameters train", len(entries), trainable, total)
    return entries
