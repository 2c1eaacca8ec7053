"""The optimizers `memopt.optimizer` knows: one small registry, each entry saying what it builds and what its state
costs, so that the estimator and the planner can read the state size instead of hard-coding it.

`state_layout(shape, dtype)` is exact: the tensors the optimizer allocates for one parameter of that shape, as
(shape, dtype) pairs (tested byte for byte against the real optimizers in tests/test_optim.py). `bytes_per_param`
is the figure for a small fp32 Llama (hidden 256, 2 layers, vocab 512: 2.4M parameters), for docs and tables;
large models approach the large-tensor limits in `layout` (8-bit 2.03, 4-bit 1.06).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class OptimizerSpec:
    """One entry of the registry.

    Attributes:
        name: what `memopt.optimizer(model, name)` takes.
        load: returns the optimizer class (imports its library only when called).
        bytes_per_param: state bytes per trainable fp32 parameter of a small Llama (see the module doc).
        layout: the state's layout in words.
        state_layout: ``(shape, dtype, **kwargs) -> {name: (shape, dtype)}``: the state tensors for one parameter.
            Tensors shared by every parameter of one optimizer instance (bitsandbytes' quantization maps) are in
            ``shared_layout``.
        requires: the pip extra / package that must be installed, or None.
        extra: the memopt extra that installs it (``memopt[optim]``), or None when it is a core dependency.
        cuda_only: the optimizer needs the parameters on a CUDA device.
        defaults: keyword arguments memopt passes unless the caller gives them.
    """

    name: str
    load: Callable[[], type]
    bytes_per_param: float
    layout: str
    state_layout: Callable[..., Layout]
    shared_layout: Layout = field(default_factory=dict)
    requires: str | None = None
    extra: str | None = None
    cuda_only: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def state_bytes(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, **kwargs: Any) -> int:
        """Bytes of the state of one parameter (shared tensors excluded)."""
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                   for s, d in self.state_layout(tuple(shape), dtype, **kwargs).values())

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def require(self) -> None:
        """ImportError naming the package and the extra when the optimizer's library is not installed."""
        if self.available():
            return
        extra = f'pip install "memopt[{self.extra}]" (or pip install {self.requires})' if self.extra else \
            f"pip install {self.requires}"
        raise ImportError(f"optimizer={self.name!r} needs {self.requires}, which is not installed: {extra}")


_SCALAR = ((), torch.float32)  # torch keeps `step` as a float32 scalar tensor (on the CPU unless fused/capturable)


def _adamw_layout(shape: tuple[int, ...], dtype: torch.dtype, **_: Any) -> Layout:
    return {"step": _SCALAR, "exp_avg": (shape, dtype), "exp_avg_sq": (shape, dtype)}


def _sgd_layout(shape: tuple[int, ...], dtype: torch.dtype, momentum: float = 0.0, **_: Any) -> Layout:
    return {"momentum_buffer": (shape, dtype)} if momentum else {}


def _adamw8bit_layout(shape: tuple[int, ...], dtype: torch.dtype, min_8bit_size: int = 4096, **_: Any) -> Layout:
    n = math.prod(shape)
    if n < min_8bit_size:  # bitsandbytes keeps small tensors' state in fp32
        return {"state1": (shape, torch.float32), "state2": (shape, torch.float32)}
    blocks = -(-n // 256)  # one fp32 absmax per 256 values, for each state
    return {"state1": (shape, torch.uint8), "state2": (shape, torch.uint8),
            "absmax1": ((blocks,), torch.float32), "absmax2": ((blocks,), torch.float32)}


def _adamw4bit_layout(shape: tuple[int, ...], dtype: torch.dtype, block_size: int = 128, **_: Any) -> Layout:
    n = math.prod(shape)
    if n < 4096 or n % block_size:  # torchao keeps these in the parameter's dtype
        return {"step": _SCALAR, "exp_avg": (shape, dtype), "exp_avg_sq": (shape, dtype)}
    layout: Layout = {"step": _SCALAR}
    for state in ("exp_avg", "exp_avg_sq"):  # 4-bit codes two per byte, an fp32 scale per block, a 16-entry map
        layout[f"{state}.codes"] = ((n // 2,), torch.uint8)
        layout[f"{state}.scale"] = ((n // block_size,), torch.float32)
        layout[f"{state}.qmap"] = ((16,), torch.float32)
    return layout


def _adafactor_layout(shape: tuple[int, ...], dtype: torch.dtype, **_: Any) -> Layout:
    if len(shape) > 1:  # factored second moment: one value per row and one per column, no first moment
        return {"step": _SCALAR, "row_var": ((*shape[:-1], 1), dtype),
                "col_var": ((*shape[:-2], 1, shape[-1]), dtype)}
    return {"step": _SCALAR, "variance": (shape, dtype)}


def _torch(name: str) -> Callable[[], type]:
    return lambda: getattr(torch.optim, name)


def _bnb(name: str) -> Callable[[], type]:
    def load() -> type:
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)

    return load


def _torchao(name: str) -> Callable[[], type]:
    def load() -> type:
        import torchao.optim

        return getattr(torchao.optim, name)

    return load


_BNB_MAPS: Layout = {"qmap1": ((256,), torch.float32), "qmap2": ((256,), torch.float32)}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw", _torch("AdamW"), 8.0, "two fp32 moments (the parameter's dtype) per parameter",
                      _adamw_layout),
        OptimizerSpec("adamw8bit", _bnb("AdamW8bit"), 2.037,
                      "two uint8 moments + one fp32 absmax per 256 values (bitsandbytes; tensors under "
                      "min_8bit_size=4096 keep fp32 moments)", _adamw8bit_layout, _BNB_MAPS, requires="bitsandbytes"),
        OptimizerSpec("paged_adamw8bit", _bnb("PagedAdamW8bit"), 2.037,
                      "as adamw8bit, in CUDA unified memory that pages to the host under pressure",
                      _adamw8bit_layout, _BNB_MAPS, requires="bitsandbytes", cuda_only=True),
        OptimizerSpec("adamw4bit", _torchao("AdamW4bit"), 1.069,
                      "two 4-bit moments (two codes per byte) + one fp32 scale per 128 values (torchao; tensors under "
                      "4096 values keep moments in the parameter's dtype)", _adamw4bit_layout, requires="torchao",
                      extra="optim"),
        OptimizerSpec("adafactor", _torch("Adafactor"), 0.029,
                      "factored second moment: one value per row + one per column of each matrix, none for the "
                      "first moment (torch.optim.Adafactor; vectors keep a full second moment)", _adafactor_layout),
        OptimizerSpec("sgd", _torch("SGD"), 0.0, "none (a momentum buffer per parameter with momentum > 0)",
                      _sgd_layout),
    )
}


def spec_for(name: Any) -> OptimizerSpec:
    """The registry entry for `name`; ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not supported; use {', '.join(map(repr, OPTIMIZERS))}")
    return OPTIMIZERS[name]
