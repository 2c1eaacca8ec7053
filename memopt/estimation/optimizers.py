"""The optimizers `memopt.estimate` and `memopt.plan` know: `memopt.optim.OPTIMIZERS` (one registry, one source of
truth for the state's bytes), seen through what the estimator needs to know on top of it.

The state of every optimizer comes from the registry's exact layouts (``state_layout`` per parameter,
``shared_layout`` per optimizer instance: bitsandbytes' quantization maps, once per parameter with
``in_backward=True``, where each parameter has its own optimizer). What is the estimator's own is how the step runs
on fake tensors: a torch optimizer (AdamW, Adafactor, SGD) runs for real on the fake step's tensors, so its step's
working memory (foreach AdamW's parameter-sized temporaries on CUDA, one parameter's with the CPU loop) is counted as
it allocates; an optimizer that cannot run on fake tensors (bitsandbytes' kernels, torchao's compiled step) steps in
place and its state comes from the layout alone. And what the planner needs: the step time over AdamW's and where
that figure comes from, and whether it searches the optimizer at all.

`OPTIMIZERS` here is a live view: an entry added to `memopt.optim.OPTIMIZERS` is an optimizer `estimate` and `plan`
know (stepping in place, searched by the planner); an `OptimizerSpec` set here directly (tests, an optimizer memopt
cannot build) works as well.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.utils._python_dispatch

from ..optim import registry as _registry

Layout = list[tuple[tuple[int, ...], torch.dtype]]  # (shape, dtype) of each state tensor


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer, as the estimator and the planner see it.

    Attributes:
        name: what ``optimizer=`` takes (and `memopt.optimizer` for the ones it builds).
        summary: its state in words, for printed estimates.
        state: the state tensors of the trainable parameters ``params`` (all of them: tensors shared by an optimizer
            instance count once), as (shape, dtype) pairs, each its own storage. ``params`` are tensors or anything
            with ``shape``, ``dtype`` and ``numel()`` (the planner sizes state without making tensors).
        shared: the tensors of `state` that each optimizer instance keeps once (bitsandbytes' quantization maps):
            counted once more per parameter after the first with ``in_backward=True``.
        torch_optimizer: ``fn(params, device) -> torch.optim.Optimizer`` run on the fake tensors (``device`` is
            ``"cuda"`` or ``"cpu"``: the implementation that device runs by default); None: the step works in place
            (no working memory) and the state is added from `state`.
        init_state: ``fn(optimizer, params)`` creating the torch optimizer's state as its first step would (faster
            than a step on fake tensors); None: one step with zero gradients.
        on_device: False for state kept off the device (CUDA unified memory paged to the host): not counted.
        cuda_only: refused with ``device="cpu"``.
        slowdown, source: the step time over torch AdamW's, and where that figure comes from (for `memopt.plan`).
        plan: whether `memopt.plan` searches it.
        adam: whether its update is AdamW's (exact or from quantized moments): `memopt.plan` searches the others
            (Adafactor: a different update rule) only after every AdamW plan of the same weights and precision.
    """

    name: str
    summary: str
    state: Callable[[list[Any]], Layout]
    torch_optimizer: Callable[[list[nn.Parameter], str], torch.optim.Optimizer] | None = None
    init_state: Callable[[torch.optim.Optimizer, list[nn.Parameter]], None] | None = None
    on_device: bool = True
    cuda_only: bool = False
    slowdown: float = 1.0
    source: str = ""
    plan: bool = True
    shared: Layout = field(default_factory=list)
    adam: bool = True


def _from_registry(spec: "_registry.OptimizerSpec") -> Callable[[list[Any]], Layout]:
    """`state` for a `memopt.optim` registry entry: its shared tensors once, then each parameter's layout."""
    shared = list(spec.shared_layout.values())

    def state(params: list[Any]) -> Layout:
        out: Layout = list(shared)
        for p in params:
            out += list(spec.state_layout(tuple(p.shape), p.dtype).values())
        return out

    return state


def _torch_adamw(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, foreach=device == "cuda")  # torch's default: foreach on CUDA, a loop on CPU


def _adamw_init(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """What `torch.optim.AdamW`'s first step creates (``_init_group``, neither capturable nor fused): a 0-dim float32
    step counter and two zero states shaped like the parameter."""
    for p in params:  # in place: an in-backward optimizer's `state` holds these dicts
        opt.state[p].update({"step": torch.tensor(1.0, dtype=torch.float32),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)})


class _ScalarAnswers(torch.utils._python_dispatch.TorchDispatchMode):
    """Answers ``.item()`` with 1.0: torch's Adafactor reads each parameter's norm (``param.norm().item()``, for its
    relative step size), which fake tensors have no value for; the number changes no tensor's size."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0
        return func(*args, **(kwargs or {}))


class _FakeAdafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor on fake tensors (see `_ScalarAnswers`)."""

    def step(self, closure: Any = None) -> Any:
        with _ScalarAnswers():
            return super().step(closure)


def _torch_adafactor(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer:
    return _FakeAdafactor(params, foreach=device == "cuda")


def _torch_sgd(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, foreach=device == "cuda")


# What the estimator and the planner add to each registry entry. Step-time factors: bitsandbytes' and torchao's
# published figures, as marked; benchmarks/fullft.py measures them on CPU.
_ESTIMATION: dict[str, dict[str, Any]] = {
    "adamw": dict(summary="torch AdamW: two states in the parameters' dtype (8 bytes per float32 parameter)",
                  torch_optimizer=_torch_adamw, init_state=_adamw_init, source="baseline"),
    "adamw8bit": dict(summary="bitsandbytes AdamW8bit: two 8-bit states with block statistics (~2 bytes per "
                      "parameter)", source="bitsandbytes: 8-bit blockwise kernels run at AdamW's speed"),
    "paged_adamw8bit": dict(summary="bitsandbytes PagedAdamW8bit: AdamW8bit's state in CUDA unified memory, paged to "
                            "the host under pressure", on_device=False, plan=False,
                            source="paging to the host under memory pressure stalls the step: not planned"),
    "adamw4bit": dict(summary="torchao AdamW4bit: two 4-bit states with an fp32 scale per 128 values (~1.06 bytes "
                      "per parameter); its compiled step updates in place", slowdown=1.02,
                      source="assumed: torchao's fused 4-bit step (dequantize, update, requantize) is within a few "
                      "percent of AdamW's"),
    "adafactor": dict(summary="torch Adafactor: a factored second moment (a value per row and per column), no first "
                      "moment (~0.03 bytes per parameter); a different update rule than AdamW's",
                      torch_optimizer=_torch_adafactor, source="torch.optim.Adafactor, counted as AdamW's time",
                      adam=False),
    "sgd": dict(summary="torch SGD without momentum: no state", torch_optimizer=_torch_sgd, plan=False,
                source="a different optimizer than AdamW: not planned"),
}


def _spec(entry: "_registry.OptimizerSpec") -> OptimizerSpec:
    extra = dict(_ESTIMATION.get(entry.name, {}))
    extra.setdefault("summary", f"{entry.name}: {entry.layout}")
    extra.setdefault("source", "assumed: AdamW's step time")
    return OptimizerSpec(entry.name, state=_from_registry(entry), cuda_only=entry.cuda_only,
                         shared=list(entry.shared_layout.values()), **extra)


class _Table(MutableMapping):
    """name -> `OptimizerSpec`: every `memopt.optim.OPTIMIZERS` entry, then the ones set here."""

    def __init__(self) -> None:
        self._own: dict[str, OptimizerSpec] = {}
        self._built: dict[str, tuple[Any, OptimizerSpec]] = {}

    def __getitem__(self, name: str) -> OptimizerSpec:
        if name in self._own:
            return self._own[name]
        entry = _registry.OPTIMIZERS[name]  # KeyError for an unknown name
        cached = self._built.get(name)
        if cached is None or cached[0] is not entry:
            cached = (entry, _spec(entry))
            self._built[name] = cached
        return cached[1]

    def __setitem__(self, name: str, spec: OptimizerSpec) -> None:
        self._own[name] = spec

    def __delitem__(self, name: str) -> None:
        del self._own[name]

    def __iter__(self) -> Iterator[str]:
        yield from _registry.OPTIMIZERS
        yield from (n for n in self._own if n not in _registry.OPTIMIZERS)

    def __len__(self) -> int:
        return len(set(_registry.OPTIMIZERS) | set(self._own))

    def __repr__(self) -> str:
        return f"OPTIMIZERS({list(self)})"


OPTIMIZERS: MutableMapping[str, OptimizerSpec] = _Table()


def optimizer_spec(name: str) -> OptimizerSpec:
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not supported; use one of {tuple(OPTIMIZERS)}")
    return OPTIMIZERS[name]


class ParamShape:
    """A parameter's shape and dtype, for sizing state without a tensor."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = tuple(shape), dtype

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


_STATE_CACHE: dict[tuple, int] = {}


def _rounded(layout: Layout, round_to: int) -> int:
    total = 0
    for shape, dtype in layout:
        nbytes = ParamShape(shape, dtype).numel() * dtype.itemsize
        total += -(-nbytes // round_to) * round_to
    return total


def state_bytes(spec: OptimizerSpec, params: list[Any], round_to: int = 1, in_backward: bool = False) -> int:
    """Bytes of `spec`'s state for `params` (tensors, or `ParamShape`/(shape, dtype) pairs), each tensor's storage
    rounded up to `round_to` (512 on CUDA); 0 when the state is not on the device. ``in_backward``: one optimizer
    per parameter, each with its own shared tensors."""
    if not spec.on_device:
        return 0
    shapes = [p if hasattr(p, "numel") else ParamShape(*p) for p in params]
    key = (spec.name, id(spec), round_to, in_backward, tuple((p.shape, p.dtype) for p in shapes))
    if key not in _STATE_CACHE:
        total = _rounded(spec.state(shapes), round_to)
        if in_backward and len(shapes) > 1:
            total += (len(shapes) - 1) * _rounded(spec.shared, round_to)
        _STATE_CACHE[key] = total
    return _STATE_CACHE[key]


def adamw8bit_state_bytes(params: list[torch.Tensor]) -> int:
    """bitsandbytes AdamW8bit's state for `params`, in bytes (see `memopt.optim.OPTIMIZERS["adamw8bit"]`)."""
    return state_bytes(OPTIMIZERS["adamw8bit"], params)


CPU_OFFLOAD_MIN_SIZE = 4096  # torchao's CPUOffloadOptimizer keeps parameters under this many values on the device


def device_state_bytes(spec: OptimizerSpec, params: list[Any], round_to: int = 1, in_backward: bool = False,
                       cpu_offload: bool = False) -> int:
    """`state_bytes` on the device: with ``cpu_offload`` (torchao's CPUOffloadOptimizer) only the state of the
    parameters it keeps on the device (under 4096 values) is."""
    if cpu_offload:
        shapes = [p if hasattr(p, "numel") else ParamShape(*p) for p in params]
        params = [p for p in shapes if p.numel() < CPU_OFFLOAD_MIN_SIZE]
        if not params:
            return 0
    return state_bytes(spec, params, round_to, in_backward)
