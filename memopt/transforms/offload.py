"""offload=: activations saved for backward wait in pinned host memory (torchtune's `OffloadActivations` design).

How: a `torch.autograd.graph.saved_tensors_hooks` pair around each training forward of the model (an instance-level
patch of the root module's forward, outermost, so it sees what the chunked loss saves too). The pack hook copies
each saved tensor to pinned host memory on a side stream and lets the device copy go once the copy is done; the
unpack hook brings it back on another side stream, prefetching the next few in backward order, and makes the compute
stream wait only for the one it needs. Inside checkpointed blocks PyTorch's checkpoint has its own hooks (innermost
wins), so with checkpointing what is offloaded is what checkpointing keeps (each block's inputs, saved by
checkpoint's `_NoopSaveInputs` outside its hooks) plus everything saved outside the blocks: the two compose.

Left on the device: parameters and views of them (they stay resident anyway), tensors under `min_bytes`, tensor
subclasses (quantized weights, DTensors), fake tensors. A tensor saved twice (q, k and v projections reading one
input) is copied once.

On a machine without CUDA, `apply` does nothing and warns once (host memory is where the activations are already).
With CUDA, a forward whose inputs are on the CPU runs as is and warns once.

torch.compile: the hooks run in eager mode around the model's forward. Compile the blocks (``block.compile()`` /
``torch.compile(block)``, what PyTorch recommends for transformers) and the tensors their compiled graphs save go
through the hooks like any other; compiling the whole model puts the patched forward inside Dynamo's frame, which does
not trace saved-tensors hooks, and Dynamo falls back to eager there (a graph break at the hooks).

Memory and time: see `memopt.OffloadConfig`.
"""

from __future__ import annotations

import collections
import weakref
from typing import Any

import torch
import torch.nn as nn

from .._log import logger, warn_once
from .._patch import ForwardPatch, find, install, uninstall
from .._record import Entry
from .._registry import register_transform
from ..config import OffloadConfig

# device types whose saved tensors go to the host (tests add "cpu" to check the hooks on a CPU-only machine)
_DEVICES: tuple[str, ...] = ("cuda",)


def _available() -> bool:
    return "cpu" in _DEVICES or ("cuda" in _DEVICES and torch.cuda.is_available())


class _Offloaded:
    """What autograd keeps instead of a saved tensor: its host copy, and the device copy while it is back."""

    __slots__ = ("host", "device", "copied", "loaded", "ready", "index", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, index: int) -> None:
        self.host = host
        self.device = device
        self.copied: Any = None  # event: the device-to-host copy finished
        self.loaded: torch.Tensor | None = None  # the device copy, brought back (possibly early, by a prefetch)
        self.ready: Any = None  # event: `loaded` is complete
        self.index = index


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors to host memory and back; a context manager for any forward (memopt.apply(offload=...) puts one
    around each training forward of the model).

        with OffloadActivations(keep=model.parameters()):
            loss = model(**batch).loss
        loss.backward()

    Args:
        config: `memopt.OffloadConfig` (sizes, pinning, streams, stash and prefetch depth).
        keep: tensors whose storages stay on the device (the model's parameters).
    """

    def __init__(self, config: OffloadConfig | None = None, keep: Any = ()) -> None:
        self.config = config or OffloadConfig()
        self._keep = {_storage_key(t) for t in keep}
        self._seen: dict[int, tuple] = {}  # id(saved tensor) -> (weak ref to it, weak ref to its handle)
        self._order: list[weakref.ref] = []  # handles in pack order; backward needs them roughly in reverse
        self._stash: collections.deque = collections.deque()  # (event, device tensor) while its copy runs
        self._d2h = self._h2d = None
        self._backward_started = False
        self.offloaded_bytes = 0  # bytes copied to the host in this forward
        self.offloaded = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "OffloadActivations":
        super().__enter__()
        return self

    # -- forward -------------------------------------------------------------------------------------------------
    def _wanted(self, t: torch.Tensor) -> bool:
        if type(t) not in (torch.Tensor, nn.Parameter) or isinstance(t, nn.Parameter):
            return False
        if t.device.type not in _DEVICES or t.untyped_storage().nbytes() < self.config.min_bytes:
            return False
        return _storage_key(t) not in self._keep

    def _pack(self, t: torch.Tensor) -> Any:
        if torch._C._current_graph_task_id() != -1 or not self._wanted(t):  # in backward: the recompute's
            return t
        # The same tensor saved again (q, k and v projections read one input): one copy. Keyed by the tensor
        # object (alive, checked by a weak reference): a storage address is reused once the storage is freed.
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and seen[1]() is not None:
            return seen[1]()
        cuda = t.device.type == "cuda"
        pin = self.config.pin_memory and torch.cuda.is_available()
        host = torch.empty_like(t, device="cpu", pin_memory=pin)
        handle = _Offloaded(host, t.device, len(self._order))
        if cuda and self.config.use_streams:
            if self._d2h is None:
                self._d2h, self._h2d = torch.cuda.Stream(t.device), torch.cuda.Stream(t.device)
            self._d2h.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before it is copied
            with torch.cuda.stream(self._d2h):
                host.copy_(t, non_blocking=pin)
                handle.copied = self._d2h.record_event()
            self._stash.append((handle.copied, t))  # t must live until its copy is done
            while self._stash and self._stash[0][0].query():
                self._stash.popleft()
            while len(self._stash) > self.config.max_fwd_stash:
                self._stash.popleft()[0].synchronize()
        else:
            host.copy_(t)
        self._seen[id(t)] = (weakref.ref(t), weakref.ref(handle))
        self._order.append(weakref.ref(handle))
        self.offloaded += 1
        self.offloaded_bytes += host.untyped_storage().nbytes()
        return handle

    # -- backward ------------------------------------------------------------------------------------------------
    def _load(self, handle: _Offloaded) -> None:
        if handle.loaded is not None:
            return
        if handle.device.type == "cuda" and self.config.use_streams and self._h2d is not None:
            if handle.copied is not None:
                self._h2d.wait_event(handle.copied)
            with torch.cuda.stream(self._h2d):
                handle.loaded = handle.host.to(handle.device, non_blocking=handle.host.is_pinned())
                handle.ready = self._h2d.record_event()
        else:
            handle.loaded = handle.host.to(handle.device, copy=True)

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Offloaded):
            return saved
        if not self._backward_started:  # the forward's copies are done and their device tensors can go
            self._backward_started = True
            while self._stash:
                self._stash.popleft()[0].synchronize()
        self._load(saved)
        for ref in self._order[max(saved.index - self.config.prefetch, 0):saved.index][::-1]:
            ahead = ref()
            if ahead is not None:
                self._load(ahead)
        out, saved.loaded = saved.loaded, None  # a second unpack (retain_graph) brings it back again
        if saved.ready is not None:
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(saved.ready)
            out.record_stream(stream)  # allocated on the copy stream, used (and freed) on the compute stream
            saved.ready = None
        return out


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return id(t)


class _Offloading(ForwardPatch):
    """The model's forward, with its saved activations offloaded in training steps."""

    rank = 200  # outside every other patch on the root (the chunked loss's, checkpointing's)

    def __init__(self, module: nn.Module, inner: Any, config: OffloadConfig) -> None:
        super().__init__(module, inner)
        self.config = config
        self.last: OffloadActivations | None = None  # the last training forward's hooks (bytes offloaded, ...)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.module.training and torch.is_grad_enabled()):
            return self.call_inner(*args, **kwargs)
        device = next((t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        if device is None:
            device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        if device.type not in _DEVICES:
            warn_once(
                f"offload-{device.type}",
                f"offload=True: this forward runs on {device.type}, where saved activations already live in host "
                "memory; nothing is offloaded",
            )
            return self.call_inner(*args, **kwargs)
        hooks = OffloadActivations(self.config, keep=[*self.module.parameters(), *self.module.buffers()])
        self.last = hooks
        with hooks:
            return self.call_inner(*args, **kwargs)


def _plan(model: nn.Module, config: OffloadConfig) -> None:
    return None


def remove_offload(model: nn.Module) -> None:
    uninstall(model, _Offloading)


@register_transform(OffloadConfig, technique="offload", order=50, plan=_plan, remove=remove_offload)
def _apply(model: nn.Module, config: OffloadConfig, plan: None) -> list[Entry]:
    remove_offload(model)  # applying again replaces the old config
    if not _available():
        warn_once(
            "offload-no-cuda",
            "offload=True does nothing on a machine without CUDA: saved activations already live in host memory",
        )
        return [Entry("offload", "", "skipped", "no CUDA device: activations already live in host memory")]
    install(model, _Offloading, config=config)
    logger.info("memopt: saved activations of training forwards offloaded to host memory (%s)", config.name)
    return [Entry("offload", "", "applied",
                  f"{config.name}: tensors saved for backward outside checkpointed blocks (min_bytes="
                  f"{config.min_bytes}) go to {'pinned ' if config.pin_memory else ''}host memory in CUDA training "
                  "forwards")]


def offloading(model: nn.Module) -> OffloadActivations | None:
    """The hooks of the model's last offloaded training forward (how many tensors and bytes went to the host)."""
    patch = find(model, _Offloading)
    return None if patch is None else patch.last


__all__ = ["OffloadActivations", "offloading", "remove_offload"]
