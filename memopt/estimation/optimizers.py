"""The optimizers `memopt.estimate` and `memopt.plan` know: one table, one entry per optimizer.

An entry says what state the optimizer keeps for its parameters (tensor shapes and dtypes, on the device or not) and
how its step runs: a torch optimizer runs for real on the fake step's tensors (so its step's working memory, e.g.
foreach AdamW's parameter-sized temporaries, is counted as it allocates); an optimizer that cannot run on fake tensors
(bitsandbytes' kernels) steps in place and its state comes from the layout alone. Adding an optimizer is adding one
`OptimizerSpec` to `OPTIMIZERS`: `estimate(optimizer=name)` takes it, and `memopt.plan` searches it (``plan=True``)
with its ``slowdown``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

Layout = list[tuple[tuple[int, ...], torch.dtype]]  # (shape, dtype) of each state tensor

_MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size: smaller tensors keep float32 state
_8BIT_BLOCK = 256  # bitsandbytes' blockwise 8-bit state: one float32 absmax per 256 values


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer, as the estimator and the planner see it.

    Attributes:
        name: what ``optimizer=`` takes (and `memopt.optimizer` for the ones it builds).
        summary: its state in words, for printed estimates.
        state: the state tensors of the trainable parameters ``params`` (all of them: shared tables count once),
            as (shape, dtype) pairs, each its own storage. ``params`` are tensors or anything with ``shape``,
            ``dtype`` and ``numel()`` (the planner sizes state without making tensors).
        torch_optimizer: ``fn(params, device) -> torch.optim.Optimizer`` run on the fake tensors (``device`` is
            ``"cuda"`` or ``"cpu"``: the implementation that device runs by default); None: the step works in place
            (no working memory) and the state is added from `state`.
        init_state: ``fn(optimizer, params)`` creating the torch optimizer's state as its first step would (faster
            than a step on fake tensors); None: one step with zero gradients.
        on_device: False for state kept off the device (CUDA unified memory paged to the host): not counted.
        cuda_only: refused with ``device="cpu"``.
        slowdown, source: the step time over torch AdamW's, and where that figure comes from (for `memopt.plan`).
        plan: whether `memopt.plan` searches it.
    """

    name: str
    summary: str
    state: Callable[[list[torch.Tensor]], Layout]
    torch_optimizer: Callable[[list[nn.Parameter], str], torch.optim.Optimizer] | None = None
    init_state: Callable[[torch.optim.Optimizer, list[nn.Parameter]], None] | None = None
    on_device: bool = True
    cuda_only: bool = False
    slowdown: float = 1.0
    source: str = ""
    plan: bool = True


def _adamw_state(params: list[torch.Tensor]) -> Layout:
    # exp_avg, exp_avg_sq in the parameter's dtype, and a 0-dim float32 step counter (a host tensor on CUDA, which
    # the fake step, living on the CPU, counts: at most 512 bytes per parameter tensor)
    return [s for p in params for s in ((tuple(p.shape), p.dtype), (tuple(p.shape), p.dtype), ((), torch.float32))]


def _blockwise_8bit_state(params: list[torch.Tensor]) -> Layout:
    """bitsandbytes' 8-bit Adam state: per parameter of at least 4096 values two uint8 states of its shape, each with
    one float32 absmax per 256 values; below that, two float32 states; and the two 256-entry quantization maps, shared
    by every parameter."""
    out: Layout = [((256,), torch.float32), ((256,), torch.float32)]
    for p in params:
        n = p.numel()  # tensors or ParamShape
        if n >= _MIN_8BIT_SIZE:
            blocks = -(-n // _8BIT_BLOCK)
            out += [(tuple(p.shape), torch.uint8), ((blocks,), torch.float32)] * 2
        else:
            out += [(tuple(p.shape), torch.float32)] * 2
    return out


def _torch_adamw(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, foreach=device == "cuda")  # torch's default: foreach on CUDA, a loop on CPU


def _adamw_init(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """What `torch.optim.AdamW`'s first step creates (``_init_group``, neither capturable nor fused): a 0-dim float32
    step counter and two zero states shaped like the parameter."""
    for p in params:
        opt.state[p] = {"step": torch.tensor(1.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _torch_sgd(params: list[nn.Parameter], device: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, foreach=device == "cuda")


OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("adamw", "torch AdamW: two states in the parameters' dtype (8 bytes per float32 parameter)",
                  _adamw_state, _torch_adamw, _adamw_init, source="baseline"),
    OptimizerSpec("adamw8bit", "bitsandbytes AdamW8bit: two 8-bit states with block statistics (~2 bytes per "
                  "parameter)", _blockwise_8bit_state, source="bitsandbytes: 8-bit blockwise kernels run at AdamW's "
                  "speed"),
    OptimizerSpec("paged_adamw8bit", "bitsandbytes PagedAdamW8bit: AdamW8bit's state in CUDA unified memory, paged to "
                  "the host under pressure", _blockwise_8bit_state, on_device=False, cuda_only=True, plan=False,
                  source="paging to the host under memory pressure stalls the step: not planned"),
    OptimizerSpec("sgd", "torch SGD without momentum: no state", lambda params: [], _torch_sgd, plan=False,
                  source="a different optimizer than AdamW: not planned"),
)}


def optimizer_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
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


def state_bytes(spec: OptimizerSpec, params: list[Any], round_to: int = 1) -> int:
    """Bytes of `spec`'s state for `params` (tensors, or `ParamShape`/(shape, dtype) pairs), each tensor's storage
    rounded up to `round_to` (512 on CUDA); 0 when the state is not on the device."""
    if not spec.on_device:
        return 0
    shapes = [p if hasattr(p, "numel") else ParamShape(*p) for p in params]
    key = (spec.name, round_to, tuple((p.shape, p.dtype) for p in shapes))
    if key not in _STATE_CACHE:
        total = 0
        for shape, dtype in spec.state(shapes):
            nbytes = ParamShape(shape, dtype).numel() * dtype.itemsize
            total += -(-nbytes // round_to) * round_to
        _STATE_CACHE[key] = total
    return _STATE_CACHE[key]


def adamw8bit_state_bytes(params: list[torch.Tensor]) -> int:
    """bitsandbytes AdamW8bit's state for `params`, in bytes (see `OPTIMIZERS["adamw8bit"]`)."""
    return state_bytes(OPTIMIZERS["adamw8bit"], params)
