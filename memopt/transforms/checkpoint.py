"""Activation checkpointing of a model's repeated blocks, through `torch.utils.checkpoint` (non-reentrant).

How a block is checkpointed: an instance-level forward patch (`memopt._patch`) runs the original forward under
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`. No wrapper module is inserted, so FQNs and
`state_dict` keys do not change; the block's own hooks (FSDP2's, for instance) run once, outside the checkpoint, as
in transformers' `GradientCheckpointingLayer`. Non-reentrant checkpointing needs no input that requires grad, so
frozen embeddings and LoRA-only training work without `enable_input_require_grads`.

Memory and time: see `memopt.CheckpointConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .._log import logger, warn_once
from .._modules import find_blocks, get_submodule, no_blocks_message, select_modules, transformers_class
from .._patch import ForwardPatch, find, install, replaying_ambient, uninstall
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


class _SelectiveContexts:
    """`context_fn` of selective checkpointing, and its policy.

    Besides choosing what to keep (`save`), it notes which storages the block's forward writes in place and which
    storages the kept outputs live in. Outputs written after they were kept (ConvBERT's and Funnel's `x += bias` on a
    matmul output, Nystromformer's `ctx += conv(v)` on a view of one) are dropped from the cache and recomputed:
    PyTorch's own check only sees writes through the very tensor it cached (its version counter), not through views
    such as the one `torch.matmul` returns for batched inputs, and a stale cache entry means wrong gradients.
    """

    def __init__(self, save_ops: tuple[str, ...]):
        self.save_ops = save_ops  # names, not op objects: those cannot be pickled (torch.save(model))
        self.save = _save_packets(save_ops)
        self.storage: dict | None = None
        self.kept: dict[int, int] = {}  # storage data_ptr -> op index when an output living there was kept
        self.written: dict[int, int] = {}  # storage data_ptr -> op index of the last in-place write
        self.index = 0

    def __getstate__(self) -> dict:
        return {"save_ops": self.save_ops}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["save_ops"])

    def __call__(self) -> tuple:
        caching, cached = create_selective_checkpoint_contexts(self.policy)
        self.storage = getattr(caching, "storage", None)
        self.kept, self.written, self.index = {}, {}, 0
        return caching, cached

    def policy(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        packet = getattr(op, "overloadpacket", op)
        keep = packet in self.save
        if ctx.is_recompute:
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
        self.index += 1
        schema = getattr(op, "_schema", None)
        if schema is not None and schema.is_mutable:
            for arg, value in zip(schema.arguments, (*args, *kwargs.values())):
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                    self.written[_storage_ptr(value)] = self.index
        if keep:
            for out in tree_leaves(ctx.op_output):
                if isinstance(out, torch.Tensor):
                    self.kept[_storage_ptr(out)] = self.index
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def drop_mutated(self) -> int:
        """After the forward: recompute every kept output whose storage was written after it was kept."""
        from torch.utils import checkpoint as ckpt

        recompute, wrapper = getattr(ckpt, "_RECOMPUTE", None), getattr(ckpt, "_VersionWrapper", None)
        stale = {ptr for ptr, kept_at in self.kept.items() if self.written.get(ptr, -1) > kept_at}
        if self.storage is None or recompute is None or wrapper is None or not stale:
            self.storage = None
            return 0
        dropped = 0
        for entries in self.storage.values():
            for idx, entry in list(entries.items()):
                leaves = [w for w in tree_leaves(entry) if isinstance(w, wrapper) and isinstance(w.val, torch.Tensor)]
                if any(_storage_ptr(w.val) in stale for w in leaves):
                    entries[idx] = recompute
                    dropped += 1
        self.storage = None
        return dropped


def _keep_policy(save: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing's policy as a plain function (torch.compile's form): keep the outputs of `save`."""
    return CheckpointPolicy.MUST_SAVE if getattr(op, "overloadpacket", op) in save else CheckpointPolicy.PREFER_RECOMPUTE


def _storage_ptr(t: torch.Tensor) -> int:
    try:  # the StorageImpl's address: one per storage, also for fake tensors (which have no data pointer)
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
        return id(t)


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


_BUFFER_GUARD_BYTES = 4 * 2**20  # blocks with more buffer bytes than this are not guarded (a snapshot per forward)


class _BufferGuard:
    """Buffers a block's forward updates (BatchNorm running statistics, I-BERT's activation ranges) must not be
    updated a second time by the recompute, and the recompute must see them as the forward did. The guard snapshots
    the block's buffers before the forward, keeps the snapshots of those the forward changed (in place, or by
    assigning a new tensor), runs the recompute with those values and puts the post-forward ones back afterwards."""

    def __init__(self, module: nn.Module):
        # (owner, name, tensor before the forward, its version, a copy of its values)
        self.slots = [
            (owner, name, t, t._version, t.detach().clone())
            for owner in module.modules()
            for name, t in owner._buffers.items()
            if t is not None
        ]
        self.calls = 0

    def settle(self) -> None:
        """After the forward: forget the buffers it did not change. Values are compared, not only version counters:
        batch_norm updates its running statistics without bumping theirs."""
        self.slots = [
            slot for slot in self.slots
            if slot[0]._buffers.get(slot[1]) is not slot[2] or slot[2]._version != slot[3]
            or (not is_fake(slot[2]) and not torch.equal(slot[2], slot[4]))  # fake tensors (estimate) have no values
        ]

    def run(self, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1 or not self.slots:
            return inner(*args, **kwargs)
        # Outside selective checkpointing's dispatch modes: these copies are not part of the block's recorded ops.
        with torch.no_grad(), _disable_current_modes():
            after = []
            for owner, name, _, _, before in self.slots:
                current = owner._buffers[name]
                after.append((current, current.detach().clone()))
                owner._buffers[name] = before.clone()
        try:
            return inner(*args, **kwargs)
        finally:
            with torch.no_grad(), _disable_current_modes():
                for (owner, name, *_), (current, values) in zip(self.slots, after):
                    current.copy_(values)
                    owner._buffers[name] = current


def _drop_caches(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A KV cache handed to a checkpointed block would be written again by the recompute (keys twice as long):
    training steps run the block without it, as transformers' GradientCheckpointingLayer does."""
    cache_cls = transformers_class("Cache")
    if cache_cls is None or getattr(module, "_can_checkpoint_with_cache", False):
        return args, kwargs
    if any(isinstance(a, cache_cls) for a in args):
        args = tuple(None if isinstance(a, cache_cls) else a for a in args)
    if any(isinstance(v, cache_cls) for v in kwargs.values()) or kwargs.get("use_cache"):
        kwargs = {k: None if isinstance(v, cache_cls) else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
    return args, kwargs


class _Checkpointed(ForwardPatch):
    """A checkpointed block's forward."""

    rank = 100  # outermost: the recompute must replay the other patches (attention) as the forward ran them

    def __init__(self, module: nn.Module, inner: Callable | None, config: CheckpointConfig, context_fn: Callable | None,
                 replaced_hf: bool = False):
        super().__init__(module, inner)
        self.config = config
        self.context_fn = context_fn  # selective checkpointing's context factory; None for full
        self.replaced_hf = replaced_hf  # transformers' own checkpointing was on here; memopt.remove turns it back on
        # Buffers are snapshotted around each training forward only if the block has some, and few bytes of them;
        # decided once here rather than by walking the block's buffers on every step.
        sizes = [b.numel() * b.element_size() for b in module.buffers()]
        self.guard_buffers = bool(sizes) and sum(sizes) <= _BUFFER_GUARD_BYTES

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.inner_forward()
        # eval() and no_grad: nothing will be recomputed, so run as is (no RNG stash, no bookkeeping).
        if not (self.module.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        args, kwargs = _drop_caches(self.module, args, kwargs)
        if torch.compiler.is_compiling():
            return self._compiled(inner, args, kwargs)
        inner = replaying_ambient(inner)  # the recompute runs outside the forward: re-enter what surrounds it
        guard = None
        if self.guard_buffers:
            guard = _BufferGuard(self.module)
            inner = functools.partial(guard.run, inner)
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
        if guard is not None:
            guard.settle()
        if isinstance(self.context_fn, _SelectiveContexts) and self.context_fn.drop_mutated():
            logger.info("memopt: %s mutates matmul outputs in place; those are recomputed, not kept",
                        type(self.module).__name__)
        return out

    def _compiled(self, inner: Callable, args: tuple, kwargs: dict) -> Any:
        """Under torch.compile: Dynamo makes the call one recompute region (`tag_activation_checkpoint`) and
        AOTAutograd's partitioner recomputes it in backward. The graph is functional, so the eager-only machinery
        is not needed: buffers are not updated twice (no buffer guard) and no kept output can be written in place
        (no stale-cache check). Selective checkpointing passes its op list as a plain policy function, the only kind
        Dynamo accepts. `offload` is not traced (saved-tensor hooks): see `memopt.applied`."""
        extra = {}
        if self.context_fn is not None:
            extra["context_fn"] = functools.partial(
                create_selective_checkpoint_contexts, functools.partial(_keep_policy, self.context_fn.save))
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=self.config.preserve_rng_state,
                          determinism_check=self.config.determinism_check, **extra, **kwargs)

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
            )
        return run(*args, **kwargs)


def _no_cache_in_training(index: int | None, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Forward pre-hook on transformers models: a KV cache in a checkpointed training step would be written twice
    (forward and recompute) and keep every layer's keys and values alive until the step ends."""
    if not (module.training and torch.is_grad_enabled()):
        return None
    if index is not None and len(args) > index:
        if args[index]:
            warn_once("use-cache", _USE_CACHE_MSG)
        args = (*args[:index], False, *args[index + 1 :])
    else:
        if kwargs.get("use_cache"):
            warn_once("use-cache", _USE_CACHE_MSG)
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
        context_fn = _SelectiveContexts(tuple(config.save_ops or DEFAULT_SAVE_OPS))
    return _Plan(blocks, found_by, context_fn)


def remove_checkpointing(model: nn.Module) -> None:
    """Undo checkpointing on every block of `model` and drop the use_cache hooks."""
    for module in model.modules():
        patch = find(module, _Checkpointed)
        if patch is not None and patch.replaced_hf:
            module.gradient_checkpointing = True
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
        )
    entries = []
    stored = dataclasses.replace(config, blocks=None)  # a blocks= lambda would make the model unpicklable
    for index, (fqn, _) in enumerate(plan.blocks):
        block = get_submodule(model, fqn)  # looked up again: quantization or LoRA may have swapped it
        kind = type(block).__name__
        if index % config.every:
            entries.append(Entry("checkpoint", fqn, "skipped", f"every={config.every}: block {index} keeps its activations"))
            continue
        replaced_hf = getattr(block, "gradient_checkpointing", False) is True
        if replaced_hf:
            block.gradient_checkpointing = False  # transformers' own, nested inside ours, would recompute twice
            logger.info("memopt: turned off transformers' own gradient checkpointing on %s (memopt's replaces it)", fqn)
        install(block, _Checkpointed, config=stored, context_fn=plan.context_fn, replaced_hf=replaced_hf)
        entries.append(Entry("checkpoint", fqn, "applied", f"{config.name} ({kind}; found by {plan.found_by})"))
    for fqn, module, index in _cache_models(model):
        module.register_forward_pre_hook(functools.partial(_no_cache_in_training, index), with_kwargs=True)
        entries.append(Entry("checkpoint:use_cache", fqn, "applied", "use_cache=False in training steps; eval/generate unchanged"))
    entries.append(_compile_note(config))
    n = sum(e.status == "applied" and e.technique == "checkpoint" for e in entries)
    logger.info("memopt: checkpointed %d of %d blocks (%s), found by %s", n, len(plan.blocks), config.name, plan.found_by)
    return entries


def _compile_note(config: CheckpointConfig) -> Entry:
    """What checkpointing does under torch.compile (`memopt.applied`'s "checkpoint:compile" row)."""
    how = ("each checkpointed block is one recompute region (torch.utils.checkpoint's tag_activation_checkpoint), "
           "recomputed in backward by AOTAutograd's partitioner" + (", keeping the outputs of the selective policy's "
                                                                    "ops" if config.policy == "selective" else ""))
    if config.offload:
        return Entry("checkpoint:compile", "", "skipped", how + "; offload is not traced (saved-tensor hooks): "
                                                         "compiled blocks keep their inputs on the device")
    return Entry("checkpoint:compile", "", "applied", how)


def checkpointed(module: nn.Module) -> bool:
    """Whether memopt checkpoints this module."""
    return find(module, _Checkpointed) is not None


__all__ = ["DEFAULT_SAVE_OPS", "CheckpointConfig", "checkpointed", "remove_checkpointing"]
