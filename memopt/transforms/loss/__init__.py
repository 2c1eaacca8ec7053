"""loss='chunked': the output head and cross-entropy chunk by chunk over tokens, so the logits never exist in full.

The function is `chunked_cross_entropy` (`function.py`). `memopt.apply(model, loss="chunked")` installs two forward
patches: `_Head` on the output head (an `nn.Linear`) and `_ChunkedLoss` on the module whose forward takes the labels.
In a training forward (`model.train()`, grad enabled) the head returns a stand-in for its logits (`logits.py`): a
tensor of their shape that holds no memory, keeps the head's input, and follows what the model's code does with it.

- Hand-written models (nanoGPT, anything that is not a transformers causal LM): the forward runs as written, with its
  labels. The model's own ``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)`` (through views,
  indexing of the leading dimensions, ``.float()``, scaling by a number, soft-capping; `nn.CrossEntropyLoss` too)
  becomes `chunked_cross_entropy` on the head's input with exactly those arguments, so the model's ignore_index,
  reduction and label_smoothing are used and nothing needs naming but, where no module is named ``lm_head``, the
  head. A loss computed outside the model from the logits it returns works the same way. The logits the forward
  returns are the stand-in: any other use computes them in full (correct, at the full logits' memory; warned once
  and said in `memopt.applied`). The head may be called on a slice (``lm_head(x[:, [-1], :])``) or several times.
  `LossConfig(labels=...)` (or `register_loss`) limits the stand-in to training forwards given that argument.
- transformers causal LMs (`...ForCausalLM`, `GPT2LMHeadModel`, ...; loss `ForCausalLMLoss`): a training forward that
  is given `labels` runs the model with `labels=None`; the stand-in the model returns as its logits tells memopt
  the head's input and what the model did to the logits (Gemma 2's soft-cap, Cohere's `logit_scale`, Granite's
  `logits_scaling`), checked against the config; memopt computes the loss with the semantics of the model's own
  (shift by one, `ignore_index=-100`, `num_items_in_batch` sum, `shift_labels`, `logits_to_keep`, the MoE auxiliary
  loss). The output's **`logits` are None** then. Without labels, in `eval()` or under `no_grad` the forward is
  untouched (generation, evaluation with metrics).

The head must be a plain `nn.Linear` (tied to the input embedding or not; frozen or trainable). A head with LoRA
adapters or a quantized head is refused at `apply` (its weight is not one matrix).

torch.compile: both patches are permanent (installed at `apply`; a flag on the head patch says when its calls are a
chunked forward's), the stand-in is a tensor subclass whose `__torch_function__` Dynamo inlines, and the checks
that need values or Python outside the trace (the label range, in-place changes, warnings, `applied()` notes) are
in-graph assertions or eager-only: a compiled training step is one graph where the plain model's is, with the same
loss and gradients and no (tokens x vocab) tensor in its forward or backward.

Known limitations: the logits are computed from the head's weight when they are used (a transformers model's loss:
after its forward has returned); a head that FSDP2 reshards on its own after its forward (its own `fully_shard`
group with `reshard_after_forward=True`) would be seen sharded: keep it in the root's group. A transformers causal
LM calls its head once per forward.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._log import logger, warn_once
from ..._modules import get_submodule, head_names, transformers_class
from ..._patch import ForwardPatch, install, uninstall
from ..._record import Applied, Entry, record_of
from ..._registry import register_transform
from ...config import LoraSettings, LossConfig, QuantConfig
from .function import REDUCTIONS, _chunked, chunked_cross_entropy, default_chunk_size
from .logits import _Logits, _counted, caller_level, head_output, warn_full

# ----------------------------------------------------------------------------------------------------------------
# register_loss


_REGISTERED: dict[type, LossConfig] = {}


def register_loss(model_cls: type, *, head: str, labels: str | None = None) -> None:
    """Teach memopt where a model class keeps its output head, so ``loss="chunked"`` works on it without naming it.

    The model's forward keeps computing its own loss (or returns the logits for a loss computed outside): memopt
    follows its ``F.cross_entropy`` call on the head's logits, with the call's own ignore_index, reduction and
    label_smoothing. Subclasses match too. A `LossConfig` passed to `apply` overrides the registered fields it sets.

    Args:
        model_cls: the model's class (the module given to `memopt.apply`).
        head: FQN of the head `nn.Linear` inside the model (``"lm_head"``).
        labels: name of the forward argument that carries the labels (nanoGPT: ``"targets"``), to limit the chunked
            loss to training forwards given it; None: every training forward.
    """
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"register_loss expects an nn.Module subclass, got {model_cls!r}")
    _REGISTERED[model_cls] = LossConfig(head=head, labels=labels)


def _registered(model: nn.Module) -> LossConfig | None:
    return next((_REGISTERED[c] for c in type(model).__mro__ if c in _REGISTERED), None)


# ----------------------------------------------------------------------------------------------------------------
# Finding the head and the labels


@dataclass(frozen=True)
class _Settings:
    """What the forward patches need; plain values, so a patched model deep-copies and pickles."""

    head: str  # FQN of the head, relative to the patched module
    labels: str | None  # forward argument carrying the labels; None: every training forward (hand-written models)
    labels_index: int | None  # its position among the forward's positional parameters (self excluded)
    shift: bool
    softcap: float | None
    scale: float | None  # logits multiplier after the head (Cohere's logit_scale, 1 / Granite's logits_scaling)
    hf: bool  # a transformers causal LM: memopt computes its loss; ModelOutput / to_tuple outputs, shift_labels, MoE
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
        f"loss='chunked': {why} in {name}. Name the output head (the nn.Linear whose logits the model's "
        f"F.cross_entropy takes): memopt.apply(model, loss=memopt.LossConfig(head='lm_head')) or "
        f"memopt.register_loss({name}, head='lm_head'); or compute the loss in your forward with "
        "memopt.chunked_cross_entropy(hidden, head.weight, labels)"
    )


def _named_head(model: nn.Module, fqn: str) -> str:
    if fqn not in dict(model.named_modules()):
        raise ValueError(_not_found_message(model, f"LossConfig(head={fqn!r}) matched no module"))
    return fqn


def _plan(model: nn.Module, config: LossConfig) -> _Plan:
    registered = _registered(model)
    if registered is not None:
        config = dataclasses.replace(
            config, **{k: getattr(registered, k) for k in ("head", "labels") if getattr(config, k) is None}
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
    if not hf:
        _refuse_loss_semantics(module, config)
    labels = (config.labels or "labels") if hf else config.labels
    params = _forward_params(module)
    names = [p.name for p in params]
    if labels is not None and labels not in names:
        raise ValueError(
            f"loss='chunked': {type(module).__name__}.forward has no argument {labels!r} (it takes {names}); name the "
            "one carrying the labels with LossConfig(labels=...)" + ("" if hf else ", or leave labels= out (every "
            "training forward of a hand-written model then gets the stand-in logits)")
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
        shift=bool(config.shift) if config.shift is not None else hf,
        softcap=None if softcap is None else float(softcap),
        scale=scale,
        hf=hf,
        config=config,
    )
    return _Plan(target, head, settings)


_SEMANTICS = {"shift": None, "softcap": None, "ignore_index": -100, "label_smoothing": 0.0}


def _refuse_loss_semantics(module: nn.Module, config: LossConfig) -> None:
    """A hand-written model computes its own loss: what the LossConfig says about a transformers causal LM's loss
    (which memopt computes itself) would do nothing there, so it is refused rather than ignored."""
    for name, default in _SEMANTICS.items():
        value = getattr(config, name)
        if value != default:
            raise ValueError(
                f"loss='chunked': LossConfig({name}={value!r}) describes the loss memopt computes for a transformers "
                f"causal LM; {type(module).__name__} computes its own, and memopt follows its F.cross_entropy call on "
                "the head's logits with that call's ignore_index, reduction and label_smoothing (slicing, scaling "
                f"and soft-capping of the logits included): drop {name}="
            )


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


# ----------------------------------------------------------------------------------------------------------------
# The forward patches


class _Head(ForwardPatch):
    """The output head's forward: while `armed` (set by `_ChunkedLoss` around a chunked forward) and grad is on,
    returns the stand-in for its logits (`logits._Logits`) instead of computing them. Installed once at `apply`, so
    a compiled forward only reads a flag. Keeps what happened to the logits, for `memopt.applied` (eager)."""

    rank = 90  # outside any other patch on the head: none of them runs

    def __init__(self, module: nn.Module, inner: Any, fqn: str, chunk_size: int | None, hf: bool,
                 record: Applied | None, entry: tuple[str, str] | None):
        super().__init__(module, inner)
        self.fqn = fqn
        self.chunk_size = chunk_size
        self.hf = hf  # a transformers causal LM: memopt computes the loss, and refuses logits computed in full
        self.record = record
        self.entry = entry  # (FQN, model class name) of the `applied` entry the notes update
        self.armed = False
        self.calls = 0  # head calls in the current forward of a transformers model
        self.chunked: list[str] = []  # the cross-entropy calls computed chunked, each once
        self.full: list[str] = []  # the ops that computed the logits in full, each once

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None
        if not self.armed or not isinstance(x, torch.Tensor) or not torch.is_grad_enabled():
            return self.call_inner(*args, **kwargs)
        weight, bias = self.module.weight, self.module.bias
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocast else weight.dtype
        if not autocast and x.dtype != weight.dtype:
            return self.call_inner(*args, **kwargs)  # F.linear refuses it: as written
        if self.hf:
            # counted per forward for a transformers model (the root resets it first, inside the forward: a value
            # torch.compile would otherwise guard on, recompiling every step)
            self.calls += 1
        return head_output(self, x, weight, bias, compute, (device, autocast, torch.get_autocast_dtype(device)))

    def note_chunked(self, call: str) -> None:
        if call not in self.chunked:
            self.chunked.append(call)
            self._note()

    def note_full(self, op: str, shape: tuple, dtype: torch.dtype) -> None:
        if op in self.full:
            return
        self.full.append(op)
        if not self.hf:  # a transformers model's forward raises instead
            warn_full(self.fqn, op, shape, dtype)
            self._note()

    def _note(self) -> None:
        if self.record is None or self.entry is None or self.hf:
            return
        fqn, name = self.entry
        chunk = f"chunk_size={self.chunk_size or 'auto'}"
        if self.chunked:
            detail = f"{name}: {', '.join(self.chunked)} on the head's logits computed chunked ({chunk})"
            if self.full:
                detail += f"; the logits computed in full where {', '.join(self.full)} used them"
            self.record.set("loss", fqn, "applied", detail)
        else:
            self.record.set("loss", fqn, "skipped", (
                f"{name}: the head's logits were computed in full ({', '.join(self.full)} on them); only "
                "F.cross_entropy(logits.view(-1, vocab), targets.view(-1), ...) on them is computed chunked"))


class _ChunkedLoss(ForwardPatch):
    """The forward of the module that takes the labels: see the module docstring."""

    rank = 50  # checkpointing (100) stays outside, should this module also be a checkpointed block

    def __init__(self, module: nn.Module, inner: Any, settings: _Settings, head: _Head):
        super().__init__(module, inner)
        self.settings = settings
        self.head = head

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        s = self.settings
        positional = s.labels_index is not None and len(args) > s.labels_index
        labels = args[s.labels_index] if positional else kwargs.get(s.labels) if s.labels is not None else None
        training = self.module.training and torch.is_grad_enabled()
        if not training or (s.labels is not None and labels is None):
            if training and not torch.compiler.is_compiling():
                warn_once(
                    f"loss-no-labels-{type(self.module).__name__}",
                    f"loss='chunked': a training forward of {type(self.module).__name__} without {s.labels}= "
                    "computes the full logits (the chunked loss only runs when the model is given its labels); "
                    f"pass {s.labels}= to the model instead of computing the loss from its logits (transformers' "
                    "Trainer with label_smoothing_factor removes the labels: use LossConfig(label_smoothing=...))",
                    stacklevel=caller_level(),
                )
            return self.call_inner(*args, **kwargs)
        head = get_submodule(self.module, s.head)
        problem = _head_problem(head)
        if problem is not None or self.head.module is not head:
            problem = problem or "was replaced by another module"
            raise RuntimeError(f"loss='chunked': the output head {s.head!r} {problem} (it changed after memopt.apply)")
        if not s.hf:
            return self._armed(args, kwargs)
        if positional:
            args = (*args[: s.labels_index], None, *args[s.labels_index + 1 :])
        else:
            kwargs = {**kwargs, s.labels: None}
        self.head.calls = 0
        out = self._armed(args, kwargs)
        if self.head.calls != 1:
            raise RuntimeError(
                f"loss='chunked': {type(self.module).__name__}.forward called its head {s.head!r} {self.head.calls} "
                "times in one step; the chunked loss of a transformers model handles one head call per forward "
                "(pass loss=None)"
            )
        found = _logits_of(out)
        self._check(found)
        loss = self._loss(found, labels, kwargs)
        return self._output(out, loss, kwargs)

    def _armed(self, args: tuple, kwargs: dict) -> Any:
        """The forward with the head returning stand-ins."""
        before = self.head.armed
        self.head.armed = True
        try:
            return self.call_inner(*args, **kwargs)
        finally:
            self.head.armed = before

    def _check(self, found: Any) -> None:
        """The logits a transformers forward returned must be the head's stand-in, scaled and soft-capped as the
        config says (no values needed: the stand-in records what was done to it)."""
        s = self.settings
        fold = found.fold() if isinstance(found, _Logits) and found.concrete is None else None
        expected = (s.scale or 1.0, s.softcap)
        if fold is not None and _close(fold[0], expected[0]) and (
            fold[1] is None if expected[1] is None else fold[1] is not None and _close(fold[1], expected[1])
        ):
            return
        if isinstance(found, _Logits) and found.concrete is None:
            what = "soft-capped at a negative value" if fold is None else " ".join(filter(None, (
                "the head's output", "as is" if fold == (1.0, None) else "",
                f"scaled by {fold[0]:g}" if fold[0] != 1.0 else "",
                f"soft-capped at {fold[1]:g}" if fold[1] is not None else "")))
        elif isinstance(found, _Logits):
            what = f"computed in full by {', '.join(self.head.full)}"
        else:
            what = f"a {tuple(found.shape)} tensor" if isinstance(found, torch.Tensor) else type(found).__name__
        raise RuntimeError(
            f"loss='chunked': {type(self.module).__name__}.forward does something to the head's output that memopt "
            f"does not model (the logits it returned are {what}, not the head's output"
            f"{f' soft-capped at {s.softcap:g}' if s.softcap else ''}{f' scaled by {s.scale:g}' if s.scale else ''});"
            " its own loss would differ from the chunked one, so nothing is computed. Pass loss=None, or give the "
            "soft-cap with LossConfig(softcap=...)"
        )

    def _loss(self, found: _Logits, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        s, cfg = self.settings, self.settings.config
        hidden, weight, bias = found.hidden, found.weight, found.bias
        if s.scale is not None:
            hidden = hidden * s.scale  # (..., hidden): (x * s) @ W.T = s * (x @ W.T)
            bias = None if bias is None else bias * s.scale
        shift_labels = kwargs.get("shift_labels")
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
        found._check_inputs()
        with _counted(self.head.module):  # memopt.track files the chunked head + loss under the head's row
            return _chunked(hidden, weight, targets, bias, cfg.ignore_index, "mean", kwargs.get("num_items_in_batch"),
                            cfg.label_smoothing, s.softcap, cfg.chunk_size, found.compute)

    def _output(self, out: Any, loss: torch.Tensor, kwargs: dict) -> Any:
        if _is_model_output(out):
            fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            aux = fields.get("aux_loss")
            coef = getattr(self.module, "router_aux_loss_coef", None)
            if aux is not None and coef is not None:
                loss = loss + coef * aux.to(loss.device)  # the MoE load-balancing loss, as the model adds it
            fields.update(loss=loss, logits=None)
            return type(out)(**fields)
        if isinstance(out, tuple):
            if getattr(self.module.config, "output_router_logits", False) or kwargs.get("output_router_logits"):
                raise NotImplementedError(
                    "loss='chunked' with return_dict=False and output_router_logits=True: the auxiliary loss cannot "
                    "be found in the tuple; pass return_dict=True"
                )
            return (loss, *out[1:])  # to_tuple() of an output whose logits are None
        raise TypeError(f"loss='chunked': {type(self.module).__name__}.forward returned a {type(out).__name__}, "
                        "not a transformers ModelOutput or tuple")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12)


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
        uninstall(module, _Head)


@register_transform(LossConfig, technique="loss", order=35, plan=_plan, check=_check_others, remove=remove_loss)
def _apply(model: nn.Module, config: LossConfig, plan: _Plan) -> list[Entry]:
    remove_loss(model)  # applying again replaces the old config
    s = plan.settings
    target = get_submodule(model, plan.target)
    head = get_submodule(model, plan.head)
    name = type(target).__name__
    head_patch = install(head, _Head, fqn=plan.head, chunk_size=config.chunk_size, hf=s.hf,
                         record=record_of(model, create=True), entry=(plan.target, name))
    install(target, _ChunkedLoss, settings=s, head=head_patch)
    tied = next((n for n, p in model.named_parameters(remove_duplicate=False)
                 if p is head.weight and not n.startswith(plan.head + ".")), None)
    notes = [f"nn.Linear {head.out_features}x{head.in_features}"]
    if tied is not None:
        notes.append(f"weight tied to {tied} (its gradient flows there)")
    if not head.weight.requires_grad:
        notes.append("frozen: no weight gradient computed")
    chunk = f"chunk_size={config.chunk_size or 'auto'}"
    if s.hf:
        how = [f"shift={s.shift}", f"ignore_index={config.ignore_index}"]
        if s.softcap is not None:
            how.append(f"softcap={s.softcap}")
        if s.scale is not None:
            how.append(f"logit scale={s.scale:g}")
        how.append(chunk)
        detail = (f"{name}: training forwards given {s.labels}= compute the loss chunked ({', '.join(how)}); their "
                  "logits are None")
    else:
        given = f" given {s.labels}=" if s.labels is not None else ""
        detail = (f"{name}: in training forwards{given} the head returns a stand-in for its logits that holds no "
                  "memory; the model's F.cross_entropy on them runs chunked with the call's own ignore_index, "
                  f"reduction and label_smoothing ({chunk}); any other use computes them in full")
    entries = [Entry("loss", plan.target, "applied", detail),
               Entry("loss", plan.head, "applied", "output head: " + "; ".join(notes))]
    logger.info("memopt: chunked loss on %s (head %s)", name, plan.head)
    return entries


__all__ = ["LossConfig", "REDUCTIONS", "chunked_cross_entropy", "default_chunk_size", "register_loss", "remove_loss"]
