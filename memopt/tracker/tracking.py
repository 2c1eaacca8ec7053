"""`memopt.track`: where a training step's memory goes, per layer, on CPU, CUDA and fake tensors.

How it counts. Every tensor storage on the tracked device is counted once, from the op that created it until it is
freed (a weak reference per storage, as PyTorch's MemTracker does), so the live total is exact on CPU and under
FakeTensorMode; on CUDA each storage is rounded up to the caching allocator's 512-byte block and `peak_bytes`
comes from `torch.cuda.max_memory_allocated` itself. A storage is filed under one category, which can change as the
step goes on:

    params       the model's parameters and buffers (quantized weights with their quantization state)
    grads        a tensor while it is some parameter's ``.grad``
    optimizer    optimizer state, and what the optimizer's step allocates
    activations  what autograd saved for backward (a saved-tensors hook sees it being packed), and whatever
                 the forward left alive when backward starts (outputs, checkpointing's kept inputs, the outputs
                 selective checkpointing caches)
    autocast     copies of parameters cast down to a narrower float (``aten._to_copy`` of a parameter's storage):
                 under `torch.autocast`, the bf16/fp16 weight copies it caches for the forward and matmuls keep
                 for backward; they stay in this category while they live (saved for backward or not)
    kv_cache     the tensors of the KV cache objects (transformers' `Cache` classes, continuous batching's
                 `PagedAttentionCache`) that attention modules receive as ``cache=`` during generation: each
                 layer's keys and values (and a quantized cache's scales, a static cache's counters), filed under
                 the attention module with that ``layer_idx`` (a paged cache is one flat tensor: each layer gets its
                 share); `memopt.tracker.kv_cache` reads the objects
    other        temporaries and inputs

Which layer. Module hooks (forward pre/post hooks; multi-grad hooks on each module's outputs and inputs for
backward, as `torch.distributed._tools.mod_tracker.ModTracker` does) keep the set of modules running; the innermost
one owns what happens. A storage saved for backward belongs to the module whose op saved it (so a Linear's
activation is its input), counted once, for the first module that saved it; what only survives to backward belongs
to the module that allocated it. Work outside every module (a loss computed by the training loop) is filed under
``"(outside model)"``.

Cost: a Python call per ATen op and a few hooks per module call: 4-5% of a CPU step of the 6-layer bench transformer
(``benchmarks/tracker.py``), more on tiny models; nothing is left behind after `Tracker.remove`.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.autograd.graph import register_multi_grad_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten

from .. import _observe
from .._log import warn_once
from .._modules import compiled_parts
from ..optim.in_backward import owner_of
from . import kv_cache as _kv
from ..transforms.quant import stored_tensors
from .report import CATEGORIES, OUTSIDE, LayerMemory, MemoryReport, Timeline

_CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to this
_TIMELINE_MAX = 20_000  # points kept for the plot; when full, pairs merge into their higher point (report.Timeline)


class _Storage:
    """What the tracker knows about one live storage."""

    __slots__ = ("nbytes", "category", "owner", "phase", "ref")

    def __init__(self, nbytes: int, category: str, owner: str, phase: str) -> None:
        self.nbytes = nbytes
        self.category = category
        self.owner = owner  # the module that allocated it (or saved it, once it is an activation)
        self.phase = phase  # the phase it was allocated in


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: "Tracker") -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tracker._after_op(out, args, kwargs, func)
        return out


_TO_COPY = torch.ops.aten._to_copy.default  # what autocast (and Tensor.to) runs to cast a weight


def _compiles_its_step(opt: Any) -> bool:
    """torchao's low-bit optimizers run their update through torch.compile(fullgraph=True)."""
    return type(opt).__module__.startswith("torchao.")


class _ThreadMode(_Mode):
    """The tracker's mode in another thread (continuous batching's generation loop); inert once it is removed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.tracker._mode is not None:
            self.tracker._after_op(out, args, kwargs)
        return out


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    if hasattr(t, "__tensor_flatten__"):  # wrapper subclasses (DTensor's local shards, ...)
        names, _ = t.__tensor_flatten__()
        return [s for n in names if isinstance(getattr(t, n), torch.Tensor) for s in _storages(getattr(t, n))]
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers: no plain storage
        return []


def _state_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors inside an optimizer state entry or a bitsandbytes quantization state."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _state_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _state_tensors(v)]
    return []


def _logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a packed 4-bit weight holds two per byte; its quantization state knows the
    original shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


class Tracker:
    """A running `memopt.track`: counts every storage on the device and which layer made it.

    Use as a context manager, or call `remove` when done; `report` may be called at any time.
    """

    def __init__(self, model: nn.Module, optimizer: Any = None, device: Any = None, round_to: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"memopt.track expects an nn.Module, got {type(model).__name__}")
        optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        # accelerate's AcceleratedOptimizer (what Trainer hands out) wraps the torch optimizer whose hooks fire
        optimizers = [getattr(o, "optimizer", o) if isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer)
                      else o for o in optimizers]
        for opt in optimizers:
            if not hasattr(opt, "state") or not hasattr(opt, "param_groups"):
                raise TypeError(
                    f"memopt.track(optimizer=...) expects a torch.optim.Optimizer (or a list of them), got "
                    f"{type(opt).__name__}"
                )
        self.model = model
        self.device = self._device(model, device)
        self._compiled = compiled_parts(model)
        if self._compiled:
            warn_once(
                f"track-compiled-{type(model).__name__}",
                f"memopt.track measures the eager execution of {type(model).__name__}, compiled with torch.compile "
                f"({', '.join(n or '<root>' for n in self._compiled[:3])}): torch.compile runs the eager code while a "
                "dispatch mode (the tracker's) is active, and a compiled step's memory can differ; for the compiled "
                "step's peak use memopt.tracker.profiled_peak(step)",
            )
        self._fake = False
        self._cuda = self.device.type == "cuda"
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to={round_to!r} must be a positive int number of bytes (512 counts as CUDA does)")
        self._round = round_to or (_CUDA_BLOCK if self._cuda else 1)
        self._optimizers: list[Any] = optimizers
        # an in-backward optimizer steps one optimizer per parameter: those are known through it
        self._known_optimizers = weakref.WeakSet(
            o for opt in optimizers for o in (opt, *getattr(opt, "optimizers", {}).values()))
        self._names: dict[nn.Module, str] = {}
        self._types: dict[str, str] = {}
        self._depths: dict[str, int] = {}
        for name, module in model.named_modules():
            self._names[module] = name
            self._types[name] = type(module).__name__
            self._depths[name] = name.count(".") + 1 if name else 0
        self._types[OUTSIDE] = ""

        self._live: dict[int, _Storage] = {}  # StorageImpl address -> record; removed when the storage dies
        self._totals = dict.fromkeys(CATEGORIES, 0)
        self._live_bytes = 0
        self._peak = 0
        self._peak_breakdown = dict(self._totals)
        self._peak_at = {"module": "", "phase": "forward"}
        self._layer_peak: dict[str, int] = {}
        self._act_step: dict[str, int] = {}  # bytes saved in the current step, per layer
        self._act_max: dict[str, int] = {}
        self._cast_step: dict[str, int] = {}  # bytes of parameter casts (autocast's copies) in the current step
        self._cast_max: dict[str, int] = {}
        self._grad_max: dict[str, int] = {}  # per layer, at the moment the gradients' total was largest
        self._grad_peak = 0
        self._fwd_s: dict[str, float] = {}
        self._bwd_s: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._order: dict[str, None] = {}  # layers in order of first forward
        self._active: dict[str, int] = {}  # running modules -> nesting count
        self._started: dict[tuple[str, bool], list[float]] = {}
        self._current = OUTSIDE
        self._phase = "forward"
        self._in_optimizer = 0
        self._suspended: list = []  # optimizers stepping outside the dispatch mode (compiled steps)
        self._steps = 0
        self._ops = 0
        self._timeline = Timeline(_TIMELINE_MAX)
        # the KV cache of generation (see memopt.tracker.kv_cache): caches seen, the attention modules running with
        # one (cache, layer_idx, module name), the largest bytes of each module's cache layer, the cache over time
        self._caches: dict[int, weakref.ref] = {}
        self._cache_frames: list[tuple[Any, int, str]] = []
        self._kv_layer: dict[str, int] = {}
        self._kv_timeline = Timeline(_TIMELINE_MAX)
        self._cb_patch: tuple[Any, Any] | None = None
        self._post_bw_pending: list = []
        self._engine_callback = False
        self._handles: list = []
        self._mode: _Mode | None = None
        self._saved_hooks = None
        self._orig_resize = None
        self._start()

    # -- setup / teardown ---------------------------------------------------------------------------------------
    @staticmethod
    def _device(model: nn.Module, device: Any) -> torch.device:
        if device is None:
            device = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:  # compare against tensors' devices, which carry the index
            current = torch.cuda.current_device() if device.type == "cuda" and torch.cuda.is_available() else 0
            device = torch.device(device.type, current)
        return device

    def _start(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        self._param_storages: dict[str, list[torch.Tensor]] = {}
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            own = []
            for p in module.parameters(recurse=False):
                self._fake = self._fake or isinstance(p, FakeTensor)
                own += stored_tensors(p)
            own += list(module.buffers(recurse=False))
            state = getattr(module, "state", None)  # bitsandbytes' Linear8bitLt moves the row scales here
            own += [t for t in (getattr(state, "CB", None), getattr(state, "SCB", None)) if isinstance(t, torch.Tensor)]
            self._param_storages[name] = own
            for t in own:
                for st in self._on_device(t):
                    if id(st) not in seen:
                        seen.add(id(st))
                        self._add(st, "params", name, "forward")
        for p in self.model.parameters():
            if p.grad is not None:
                self._mark(p.grad, "grads")
            if p.requires_grad and p.is_leaf:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        for opt in self._optimizers:
            self._mark_optimizer(opt)
        self._peak = self._live_bytes
        self._peak_breakdown = dict(self._totals)
        if self._cuda and not self._fake:
            torch.cuda.reset_peak_memory_stats(self.device)
        for module in self._names:
            self._handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._handles.append(module.register_forward_hook(self._post_forward, always_call=True))
        self._watch_caches()
        self._handles.append(register_optimizer_step_pre_hook(self._pre_step))
        self._handles.append(register_optimizer_step_post_hook(self._post_step))
        self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int) -> None:  # FSDP frees and refills storages in place
            tracker._orig_resize(st, size)
            tracker._resized(st)

        torch.UntypedStorage.resize_ = resize_
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._saved_hooks.__enter__()
        self._mode = _Mode(self)
        self._mode.__enter__()
        _observe.listen(self)

    def remove(self) -> None:
        """Stop tracking: every hook and mode it installed is removed. Idempotent."""
        if self._mode is None:
            return
        if _get_current_dispatch_mode() is not self._mode:
            raise RuntimeError(
                "memopt.track: another TorchDispatchMode was entered after the tracker and is still active; "
                "exit it before removing the tracker (modes are a stack)"
            )
        self._finish()
        _observe.unlisten(self)
        self._mode.__exit__(None, None, None)
        self._mode = None
        self._saved_hooks.__exit__(None, None, None)
        torch.UntypedStorage.resize_ = self._orig_resize
        if self._cb_patch is not None:
            cls, orig = self._cb_patch
            cls._run_generation_loop = orig
            self._cb_patch = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- accounting --------------------------------------------------------------------------------------------
    def _on_device(self, t: torch.Tensor) -> list[torch.UntypedStorage]:
        if t.device != self.device:
            return []
        return _storages(t)

    def _size(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        return n if self._round == 1 else -(-n // self._round) * self._round

    def _add(self, st: torch.UntypedStorage, category: str, owner: str, phase: str) -> _Storage:
        info = _Storage(self._size(st), category, owner, phase)
        key = st._cdata
        info.ref = weakref.ref(st, lambda _, key=key: self._free(key))
        self._live[key] = info
        self._totals[category] += info.nbytes
        self._live_bytes += info.nbytes
        return info

    def _free(self, key: int) -> None:
        info = self._live.pop(key, None)
        if info is None:
            return
        self._totals[info.category] -= info.nbytes
        self._live_bytes -= info.nbytes

    def _resized(self, st: torch.UntypedStorage) -> None:
        info = self._live.get(st._cdata)
        if info is None:
            return
        n = self._size(st)
        self._totals[info.category] += n - info.nbytes
        self._live_bytes += n - info.nbytes
        info.nbytes = n
        self._record()

    def _move(self, info: _Storage, category: str) -> None:
        self._totals[info.category] -= info.nbytes
        self._totals[category] += info.nbytes
        info.category = category

    def _mark(self, t: torch.Tensor, category: str) -> None:
        """File `t`'s storages under `category` (counting them if they were not yet)."""
        for st in self._on_device(t):
            info = self._live.get(st._cdata)
            if info is None:
                self._add(st, category, self._current, self._phase)
            elif info.category != category and info.category != "params":
                self._move(info, category)

    def _mark_optimizer(self, opt: Any) -> None:
        for state in opt.state.values():
            for t in _state_tensors(state):
                self._mark(t, "optimizer")

    def _cast_of_param(self, func: Any, args: tuple, out: Any) -> bool:
        """`out` is a copy of a parameter cast down to a narrower float (autocast's bf16/fp16 weight casts, or any
        ``.to(torch.bfloat16)`` of a float32 weight)."""
        if func is not _TO_COPY or not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return False
        src = args[0].dtype
        if not (src.is_floating_point and out.dtype.is_floating_point and out.itemsize < src.itemsize):
            return False  # autocast casts weights down to bf16/fp16; an int8 weight dequantized is no cast copy
        return any(info is not None and info.category == "params"
                   for info in (self._live.get(st._cdata) for st in self._on_device(args[0])))

    def _after_op(self, out: Any, args: tuple = (), kwargs: dict | None = None, func: Any = None) -> None:
        self._ops += 1
        phase = "optimizer" if self._in_optimizer else "backward" if _in_backward() else "forward"
        if phase != self._phase:
            if phase == "backward" and self._phase == "forward":
                self._forward_left_alive()
            self._phase = phase
        if isinstance(out, torch.Tensor):
            outs: Any = (out,)
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) or o is None for o in out):
            outs = out
        else:
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        added = False
        inputs: set[int] | None = None
        for t in outs:
            if t is not None and t.device == self.device:
                for st in _storages(t):
                    if st._cdata in self._live:
                        continue
                    if inputs is None:
                        inputs = {s._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
                                  for s in _storages(a)}
                    if st._cdata in inputs:  # a view of (or write into) a tensor made before tracking: not new
                        continue
                    if self._in_optimizer:
                        category = "optimizer"
                    elif self._cast_of_param(func, args, out):
                        category = "autocast"
                        if phase == "forward":  # the recompute of checkpointing casts again: counted once per step
                            self._cast_step[self._current] = self._cast_step.get(self._current, 0) + self._size(st)
                    else:
                        category = "other"
                    self._add(st, category, self._current, phase)
                    added = True
        if added:
            if self._cache_frames:
                self._cache_layer(*self._cache_frames[-1])
            self._record()

    def _record(self) -> None:
        live = self._live_bytes
        for name in self._active:
            if live > self._layer_peak.get(name, 0):
                self._layer_peak[name] = live
        if live > self._peak:
            self._peak = live
            self._peak_breakdown = dict(self._totals)
            self._peak_at = {"module": self._current, "phase": self._phase}
        self._timeline.add(self._ops, live, self._phase)
        if self._caches:
            self._kv_timeline.add(self._ops, self._totals["kv_cache"], self._phase)

    # -- the KV cache of generation ------------------------------------------------------------------------------
    def _watch_caches(self) -> None:
        """Hooks on the modules that update a cache (transformers' attention modules carry their ``layer_idx``) and
        on the root (a cache passed in); continuous batching's generation thread runs under the tracker too."""
        for module, name in self._names.items():
            if name == "" or isinstance(getattr(module, "layer_idx", None), int):
                self._handles.append(module.register_forward_pre_hook(self._cache_pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._cache_post, always_call=True))
        import sys

        api = sys.modules.get("transformers.generation.continuous_batching.continuous_api")
        manager = getattr(api, "ContinuousBatchingManager", None)
        orig = getattr(manager, "_run_generation_loop", None)
        if orig is None or getattr(orig, "_memopt_tracker", None) is not None:
            return
        tracker = self

        def run(manager_self: Any, *args: Any, **kwargs: Any) -> Any:  # dispatch modes are per thread
            with _ThreadMode(tracker):
                return orig(manager_self, *args, **kwargs)

        run._memopt_tracker = self
        manager._run_generation_loop = run
        self._cb_patch = (manager, orig)

    def _cache_pre(self, module: nn.Module, args: Any, kwargs: dict) -> None:
        cache = _kv.find_cache(kwargs)
        if cache is None:
            return
        if _kv.offloading_without_cuda(cache):
            raise RuntimeError(_kv.OFFLOAD_ERROR)
        name = self._names[module]
        if id(cache) not in self._caches:  # first sight (a cache made before tracking too): all of it
            self._caches[id(cache)] = weakref.ref(cache)
            for i in range(_kv.num_layers(cache)):
                self._cache_layer(cache, i, self._cache_owner(i, name))
            self._record()
        idx = getattr(module, "layer_idx", None)
        if name and isinstance(idx, int):
            self._cache_frames.append((cache, idx, name))
            self._cache_layer(cache, idx, name)

    def _cache_post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names.get(module)
        if self._cache_frames and self._cache_frames[-1][2] == name:
            self._cache_layer(*self._cache_frames.pop())
            self._record()

    def _cache_owner(self, idx: int, default: str) -> str:
        """The attention module that updates layer `idx` (the first module with that ``layer_idx``)."""
        if not hasattr(self, "_layer_owner"):
            self._layer_owner = {}
            for module, name in self._names.items():
                i = getattr(module, "layer_idx", None)
                if name and isinstance(i, int):
                    self._layer_owner.setdefault(i, name)
        return self._layer_owner.get(idx, default)

    def _cache_layer(self, cache: Any, idx: int, owner: str) -> None:
        """File layer `idx` of `cache` under kv_cache, owned by `owner`; keep that layer's largest bytes."""
        total, seen = 0, set()
        for t in _kv.layer_tensors(cache, idx):
            for st in self._on_device(t):
                if st._cdata in seen:
                    continue
                seen.add(st._cdata)
                info = self._live.get(st._cdata)
                if info is None:
                    info = self._add(st, "kv_cache", owner, self._phase)
                elif info.category != "kv_cache" and info.category != "params":
                    self._move(info, "kv_cache")
                    info.owner = owner
                total += info.nbytes
        if _kv.is_shared(cache):  # one flat tensor for every layer: this layer's share
            total //= max(1, _kv.num_layers(cache))
        if total > self._kv_layer.get(owner, 0):
            self._kv_layer[owner] = total

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        """Saved-tensors hook: autograd is keeping `t` for backward; it belongs to the innermost running module."""
        if self._in_optimizer or _in_backward():
            return t
        for st in self._on_device(t):
            info = self._live.get(st._cdata)
            if info is None:  # created outside the tracker (an input): from now on it is kept for backward
                info = self._add(st, "other", self._current, "forward")
            if info.category == "other":
                self._move(info, "activations")
                info.owner = self._current
                self._act_step[self._current] = self._act_step.get(self._current, 0) + info.nbytes
        return t

    def _forward_left_alive(self) -> None:
        """Backward starts: what the forward allocated and is still alive waits for backward (outputs, inputs
        kept by checkpointing, outputs cached by selective checkpointing): activations of the module that made
        it."""
        for info in list(self._live.values()):
            if info.category == "other" and info.phase == "forward" and info.owner != OUTSIDE:
                self._move(info, "activations")
                self._act_step[info.owner] = self._act_step.get(info.owner, 0) + info.nbytes
        self._record()

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._mark(p.grad, "grads")

    def _grads_now(self) -> None:
        """Gradients as they are now. A layer's gradient bytes are those of the moment when the model's gradients
        together were largest: all of them just before a plain optimizer step; with the step in backward
        (`memopt.optimizer(..., in_backward=True)`, each parameter's gradient freed once applied), the few alive at
        once."""
        counted: set[int] = set()  # a tied weight's gradient belongs to the first module that owns it
        storages: set[int] = set()  # gradients sharing one storage (FSDP2's reduce-scatter output) count once
        now: dict[str, int] = {}
        for name, tensors in self._param_storages.items():
            total = 0
            for t in tensors:
                g = t.grad if isinstance(t, nn.Parameter) and id(t) not in counted else None
                counted.add(id(t))
                if g is not None:
                    self._mark(g, "grads")
                    for st in self._on_device(g):
                        if st._cdata not in storages:
                            storages.add(st._cdata)
                            total += self._size(st)
            if total:
                now[name] = total
        total = sum(now.values())
        if total and total >= self._grad_peak:
            self._grad_peak = total
            self._grad_max = now

    def _pre_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        if opt not in self._known_optimizers:
            self._known_optimizers.add(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            owner = owner_of(params[0]) if params else None  # one of an in-backward optimizer's: count that one
            if owner is not None:
                fresh = owner not in self._known_optimizers
                self._known_optimizers.update((owner, *owner.optimizers.values()))
                params, opt = (params if fresh else []), owner
            mine = {id(p) for p in self.model.parameters()}
            if any(id(p) in mine for p in params):
                self._optimizers.append(opt)  # found at its first step: its earlier state was not counted
                self._mark_optimizer(opt)
        self._grads_now()
        self._in_optimizer += 1
        self._phase = "optimizer"
        if _compiles_its_step(opt) and self._mode is not None and _get_current_dispatch_mode() is self._mode:
            # torch.compile(fullgraph=True) refuses to run under a Python dispatch mode: step outside ours. Its
            # state is counted after the step; the fused kernel's own temporaries are not seen.
            self._mode.__exit__(None, None, None)
            self._suspended.append(opt)

    def _post_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        if self._suspended and self._suspended[-1] is opt:
            self._suspended.pop()
            self._mode.__enter__()
        self._in_optimizer -= 1
        self._mark_optimizer(opt)
        self._record()
        if not self._in_optimizer:  # a step in backward (optimizer step fused into backward) returns to backward
            self._phase = "backward" if _in_backward() else "forward"

    # -- where we are ------------------------------------------------------------------------------------------
    def _enter(self, name: str, timer: str | None) -> None:
        self._active[name] = self._active.get(name, 0) + 1
        if timer is not None:
            self._started.setdefault((name, timer), []).append(time.perf_counter())
        self._current = max(self._active, key=self._depths.__getitem__)
        if self._live_bytes > self._layer_peak.get(name, 0):
            self._layer_peak[name] = self._live_bytes

    def _exit(self, name: str, timer: str | None) -> None:
        count = self._active.get(name, 0)
        if count == 0:  # already closed by the end of backward
            return
        if count == 1:
            del self._active[name]
        else:
            self._active[name] = count - 1
        stack = self._started.get((name, timer)) if timer is not None else None
        if stack:
            times = self._bwd_s if timer == "backward" else self._fwd_s
            times[name] = times.get(name, 0.0) + time.perf_counter() - stack.pop()
        self._current = max(self._active, key=self._depths.__getitem__) if self._active else OUTSIDE

    def enter_scope(self, module: nn.Module) -> None:
        """`memopt._observe.counted_as`: what runs now is `module`'s own work (if `module` is in the model)."""
        name = self._names.get(module)
        if name is None:
            return
        bw = _in_backward()
        if not bw:
            self._order.setdefault(name, None)
            self._calls[name] = self._calls.get(name, 0) + 1
        self._enter(name, None if bw else "forward")

    def exit_scope(self, module: nn.Module) -> None:
        name = self._names.get(module)
        if name is not None:
            self._exit(name, None if _in_backward() else "forward")

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(module)
        if name is None:
            return
        if _in_backward():  # checkpointing's recompute: counted inside the backward of the block
            self._enter(name, None)
            return
        if name == "":
            self._new_step()
        self._phase = "forward"
        self._order.setdefault(name, None)
        self._calls[name] = self._calls.get(name, 0) + 1
        self._enter(name, "forward")
        if torch.is_grad_enabled():
            tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor) and a.requires_grad]
            done = self._post_backward_fn(name)
            if tensors:
                register_multi_grad_hook(tensors, done)
            else:  # no input needs a gradient: its backward ends with the whole backward
                self._post_bw_pending.append(done)

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names.get(module)
        if name is None:
            return
        if _in_backward():
            self._exit(name, None)
            return
        self._exit(name, "forward")
        if torch.is_grad_enabled():
            tensors = [a for a in tree_flatten(output)[0] if isinstance(a, torch.Tensor) and a.requires_grad]
            if tensors:
                register_multi_grad_hook(tensors, self._pre_backward_fn(name), mode="any")

    def _pre_backward_fn(self, name: str):
        def fn(*_: Any) -> None:
            self._queue_engine_callback()
            self._enter(name, "backward")

        return fn

    def _post_backward_fn(self, name: str):
        def fn(*_: Any) -> None:
            self._exit(name, "backward")

        return fn

    def _queue_engine_callback(self) -> None:
        if self._engine_callback:
            return
        for fn in reversed(self._post_bw_pending):
            torch.autograd.Variable._execution_engine.queue_callback(fn)
        self._post_bw_pending.clear()

        def done() -> None:
            self._active.clear()
            self._started = {k: v for k, v in self._started.items() if k[1] != "backward"}
            self._current = OUTSIDE
            self._engine_callback = False

        torch.autograd.Variable._execution_engine.queue_callback(done)
        self._engine_callback = True

    def _new_step(self) -> None:
        """The model's forward starts (outside backward): a new step for the per-step quantities."""
        self._steps += 1
        for step, most in ((self._act_step, self._act_max), (self._cast_step, self._cast_max)):
            for name, n in step.items():
                if n > most.get(name, 0):
                    most[name] = n
            step.clear()
        self._post_bw_pending.clear()  # left by a forward that had no backward

    def _finish(self) -> None:
        """Gradients and optimizer state as they are now (before `remove` and every `report` while tracking)."""
        self._grads_now()
        for opt in self._optimizers:
            self._mark_optimizer(opt)

    # -- results -----------------------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new peak (and breakdown) from the current live bytes; per-layer numbers keep covering the whole
        region. `memopt.integrations.MemoryCallback` does this at each log, so each logged peak is its interval's."""
        self._peak = self._live_bytes
        self._peak_breakdown = dict(self._totals)
        self._peak_at = {"module": self._current, "phase": self._phase}
        if self._cuda and not self._fake:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def live_bytes(self) -> int:
        """Bytes live on the device now, as the tracker counts them."""
        return self._live_bytes

    def report(self) -> MemoryReport:
        """The `MemoryReport` of everything tracked so far (also after `remove`)."""
        if self._mode is not None:
            self._finish()
        act, cast = dict(self._act_max), dict(self._cast_max)
        for name, n in self._act_step.items():
            act[name] = max(act.get(name, 0), n)
        for name, n in self._cast_step.items():
            cast[name] = max(cast.get(name, 0), n)
        opt_state: dict[int, torch.Tensor] = {}
        for opt in self._optimizers:
            for p, state in opt.state.items():
                opt_state[id(p)] = state
        layers = []
        counted: set[int] = set()
        names = list(self._order) + [n for n in self._param_storages if n not in self._order]
        if OUTSIDE in act or OUTSIDE in cast:
            names.append(OUTSIDE)
        for name in names:
            layer = LayerMemory(name, self._types.get(name, ""))
            for t in self._param_storages.get(name, []):
                is_param = isinstance(t, nn.Parameter)
                for st in self._on_device(t):
                    if id(st) in counted:  # tied weights: counted for the first module that owns them
                        continue
                    counted.add(id(st))
                    layer.params += _logical_numel(t) if is_param else 0
                    layer.param_bytes += self._size(st)
                    if is_param and t.requires_grad:
                        layer.trainable_bytes += self._size(st)
                if is_param and id(t) in opt_state:
                    for s in _state_tensors(opt_state[id(t)]):
                        for st in self._on_device(s):
                            if id(st) not in counted:
                                counted.add(id(st))
                                layer.optimizer_bytes += self._size(st)
            layer.grad_bytes = self._grad_max.get(name, 0)
            layer.activation_bytes = act.get(name, 0)
            layer.autocast_bytes = cast.get(name, 0)
            layer.kv_cache_bytes = self._kv_layer.get(name, 0)
            layer.peak_bytes = self._layer_peak.get(name, 0)
            layer.calls = self._calls.get(name, 0)
            if not self._cuda and not self._fake:
                layer.forward_s = self._fwd_s.get(name)
                layer.backward_s = self._bwd_s.get(name)
            if layer.param_bytes or layer.activation_bytes or layer.grad_bytes or layer.optimizer_bytes or \
                    layer.autocast_bytes or layer.kv_cache_bytes:
                layers.append(layer)
        peak = self._peak
        notes = []
        if self._compiled:
            notes.append("eager execution measured: torch.compile does not run compiled code under the tracker's "
                         "dispatch mode (memopt.tracker.profiled_peak measures a compiled step)")
        if self._cuda and not self._fake:
            peak = torch.cuda.max_memory_allocated(self.device)
            notes.append(f"peak from torch.cuda.max_memory_allocated; tracked storages peaked at {self._peak} bytes")
        return MemoryReport(
            peak_bytes=int(peak),
            peak_breakdown=dict(self._peak_breakdown),
            peak_at=dict(self._peak_at),
            layers=layers,
            device=str(self.device),
            steps=self._steps,
            totals=dict(self._totals),
            timeline=self._timeline.points(),
            kv_cache_timeline=self._kv_timeline.points(),
            notes=notes,
        )


def track(model: nn.Module, optimizer: Any = None, *, device: Any = None, round_to: int | None = None) -> Tracker:
    """Start tracking where `model`'s memory goes; stop with ``with`` or `Tracker.remove`.

        with memopt.track(model, optimizer) as tracker:
            loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        print(tracker.report())

    Args:
        model: any `nn.Module`; its parameters, buffers and gradients are counted from the start, and every tensor
            created on its device while tracking.
        optimizer: an optimizer (or a list of them) whose state is counted from the start. Without one, an optimizer
            stepping the model's parameters is found at its first step (its earlier state is counted from then on).
        device: the device to account (default: the model's). Storages on other devices (e.g. CPU offload) are not
            counted.
        round_to: count each storage rounded up to a multiple of this many bytes; default 512 on CUDA (the caching
            allocator's block), 1 elsewhere. `memopt.estimate` counts CPU fake tensors as CUDA would with 512.

    Cost: one Python call per ATen op and a few hooks per module call (4-5% of a CPU step of the
    6-layer bench transformer, see ``benchmarks/tracker.py``; more on tiny models); memory: a small record per live storage.
    Works under FakeTensorMode (the estimator uses it) and with everything `memopt.apply` does.
    """
    return Tracker(model, optimizer, device, round_to)



def sum_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage shared by two tensors counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        for st in _storages(t):
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())
