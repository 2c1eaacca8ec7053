"""Activation checkpointing of a model's repeated blocks, through `torch.utils.checkpoint` (non-reentrant).

How a block is checkpointed: an instance-level forward patch (`memopt._patch`) runs the original forward under
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`. No wrapper module is inserted, so FQNs and
`state_dict` keys do not change; the block's own hooks (FSDP2's, for instance) run once, outside the checkpoint, as
in transformers' `GradientCheckpointingLayer`. Non-reentrant checkpointing needs no input that requires grad, so
frozen embeddings and LoRA-only training work without `enable_input_require_grads`.

Memory and time: see `memopt.CheckpointConfig`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .._log import logger, warn_once
from .._modules import find_blocks, no_blocks_message, select_modules, transformers_class
from .._patch import ForwardPatch, find, install, uninstall
from .._record import Entry
from .._registry import register_transform
from ..config import CheckpointConfig

# Outputs kept by policy="selective": matmuls, convolutions and attention kernels. Everything else (norms,
# activations, dropout, residual adds, rotary embeddings) is recomputed.
DEFAULT_SAVE_OPS = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)


def _save_packets(names: tuple[str, ...]) -> frozenset:
    unknown = [n for n in names if not hasattr(torch.ops.aten, n)]
    if unknown:
        raise ValueError(
            f"CheckpointConfig(save_ops=...) names ATen ops that do not exist: {unknown}; "
            "give names of torch.ops.aten ops such as 'mm' or 'addmm'"
        )
    return frozenset(getattr(torch.ops.aten, n) for n in names)


def _selective_policy(save: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in save else CheckpointPolicy.PREFER_RECOMPUTE


class _SelectiveContexts:
    """`context_fn` for selective checkpointing that remembers the cache of the last forward, so that outputs the
    block mutated in place afterwards (ConvBERT's, Funnel's `x += bias` on a matmul output) can be dropped from the
    cache and recomputed instead: PyTorch would otherwise raise "Tensor cached during selective activation checkpoint
    has been mutated" in backward."""

    def __init__(self, policy: Callable):
        self.policy = policy
        self.storage: dict | None = None

    def __call__(self) -> tuple:
        caching, cached = create_selective_checkpoint_contexts(self.policy)
        self.storage = getattr(caching, "storage", None)
        return caching, cached

    def drop_mutated(self) -> int:
        """Mark cached outputs whose tensors changed since they were cached for recompute; returns how many."""
        from torch.utils import checkpoint as ckpt

        recompute, wrapper = getattr(ckpt, "_RECOMPUTE", None), getattr(ckpt, "_VersionWrapper", None)
        if self.storage is None or recompute is None or wrapper is None:
            return 0
        dropped = 0
        for entries in self.storage.values():
            for idx, entry in list(entries.items()):
                leaves = tree_leaves(entry) if entry is not recompute else []
                if any(isinstance(w, wrapper) and w.version is not None and w.val._version != w.version for w in leaves):
                    entries[idx] = recompute
                    dropped += 1
        self.storage = None
        return dropped


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class _Checkpointed(ForwardPatch):
    """A checkpointed block's forward."""

    rank = 100  # outermost: the recompute must replay the other patches (attention) as the forward ran them

    def __init__(self, module: nn.Module, inner: Callable | None, config: CheckpointConfig, context_fn: Callable | None):
        super().__init__(module, inner)
        self.config = config
        self.context_fn = context_fn  # selective checkpointing's context factory; None for full

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.inner_forward()
        # eval() and no_grad: nothing will be recomputed, so run as is (no RNG stash, no bookkeeping).
        if not (self.module.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        extra = {} if self.context_fn is None else {"context_fn": self.context_fn}
        run = functools.partial(
            checkpoint,
            inner,
            use_reentrant=False,
            preserve_rng_state=self.config.preserve_rng_state,
            determinism_check=self.config.determinism_check,
            **extra,
        )
        out = self._run(run, args, kwargs)
        if isinstance(self.context_fn, _SelectiveContexts) and self.context_fn.drop_mutated():
            logger.info("memopt: %s mutates matmul outputs in place; those are recomputed, not kept",
                        type(self.module).__name__)
        return out

    def _run(self, run: Callable, args: tuple, kwargs: dict) -> Any:
        if self.config.offload:
            device = _first_tensor_device(args, kwargs)
            if device is not None and device.type != "cpu":
                # What checkpoint keeps (the block inputs) waits in pinned host memory until backward needs it.
                with torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=device.type):
                    return run(*args, **kwargs)
            warn_once(
                "offload-cpu",
                "checkpoint='offload' on a model running on the CPU behaves as checkpoint='full': the kept block "
                "inputs already live in host memory",
                stacklevel=5,
            )
        return run(*args, **kwargs)


def _no_cache_in_training(index: int | None, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Forward pre-hook on transformers models: a KV cache in a checkpointed training step would be written twice
    (forward and recompute) and keep every layer's keys and values alive until the step ends."""
    if not (module.training and torch.is_grad_enabled()):
        return None
    if index is not None and len(args) > index:
        if args[index]:
            warn_once("use-cache", _USE_CACHE_MSG, stacklevel=4)
        args = (*args[:index], False, *args[index + 1 :])
    else:
        if kwargs.get("use_cache"):
            warn_once("use-cache", _USE_CACHE_MSG, stacklevel=4)
        kwargs["use_cache"] = False
    return args, kwargs


_USE_CACHE_MSG = (
    "use_cache=True while training a checkpointed model: memopt sets use_cache=False for training steps (a cache "
    "would be written twice by the recompute and keep every layer's keys and values alive); generate() and "
    "eval() keep the cache"
)


def _cache_models(model: nn.Module) -> list[tuple[str, nn.Module, int | None]]:
    """transformers models in the tree whose forward takes `use_cache`, with its positional index (self excluded)."""
    PreTrainedModel = transformers_class("PreTrainedModel")
    if PreTrainedModel is None:
        return []
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel):
            continue
        params = list(inspect.signature(type(module).forward).parameters)
        if "use_cache" in params:
            found.append((name, module, params.index("use_cache") - 1))
    return found


@dataclass(frozen=True)
class _Plan:
    blocks: list[tuple[str, nn.Module]]
    found_by: str
    context_fn: Callable | None


def _plan(model: nn.Module, config: CheckpointConfig) -> _Plan:
    if config.blocks is not None:
        blocks, found_by = select_modules(model, config.blocks, "blocks"), "blocks="
    else:
        blocks, found_by = find_blocks(model)
        if not blocks:
            raise ValueError(no_blocks_message(model))
    context_fn = None
    if config.policy == "selective":
        save = _save_packets(config.save_ops or DEFAULT_SAVE_OPS)
        context_fn = _SelectiveContexts(functools.partial(_selective_policy, save))
    return _Plan(blocks, found_by, context_fn)


def remove_checkpointing(model: nn.Module) -> None:
    """Undo checkpointing on every block of `model` and drop the use_cache hooks."""
    for module in model.modules():
        uninstall(module, _Checkpointed)
        for key in [k for k, h in module._forward_pre_hooks.items() if _is_cache_hook(h)]:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _is_cache_hook(hook: Any) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _no_cache_in_training


@register_transform(CheckpointConfig, technique="checkpoint", order=40, plan=_plan, remove=remove_checkpointing)
def _apply(model: nn.Module, config: CheckpointConfig, plan: _Plan) -> list[Entry]:
    remove_checkpointing(model)  # applying again replaces the old config instead of nesting checkpoints
    device_types = {p.device.type for p in model.parameters()}
    if config.offload and device_types <= {"cpu"} and not torch.cuda.is_available():
        warn_once(
            "offload-cpu",
            "checkpoint='offload' on a CPU-only model behaves as checkpoint='full': the kept block inputs already "
            "live in host memory",
            stacklevel=3,  # warn_once <- _apply <- memopt.apply <- the caller
        )
    entries = []
    for index, (fqn, block) in enumerate(plan.blocks):
        kind = type(block).__name__
        if index % config.every:
            entries.append(Entry("checkpoint", fqn, "skipped", f"every={config.every}: block {index} keeps its activations"))
            continue
        if getattr(block, "gradient_checkpointing", False) is True:
            block.gradient_checkpointing = False  # transformers' own, nested inside ours, would recompute twice
            logger.info("memopt: turned off transformers' own gradient checkpointing on %s (memopt's replaces it)", fqn)
        install(block, _Checkpointed, config=config, context_fn=plan.context_fn)
        entries.append(Entry("checkpoint", fqn, "applied", f"{config.name} ({kind}; found by {plan.found_by})"))
    for fqn, module, index in _cache_models(model):
        module.register_forward_pre_hook(functools.partial(_no_cache_in_training, index), with_kwargs=True)
        entries.append(Entry("checkpoint:use_cache", fqn, "applied", "use_cache=False in training steps; eval/generate unchanged"))
    n = sum(e.status == "applied" and e.technique == "checkpoint" for e in entries)
    logger.info("memopt: checkpointed %d of %d blocks (%s), found by %s", n, len(plan.blocks), config.name, plan.found_by)
    return entries


def checkpointed(module: nn.Module) -> bool:
    """Whether memopt checkpoints this module."""
    return find(module, _Checkpointed) is not None


__all__ = ["DEFAULT_SAVE_OPS", "CheckpointConfig", "checkpointed", "remove_checkpointing"]
