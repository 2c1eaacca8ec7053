"""Training precision as users name it (PyTorch Lightning's names): what is stored in which dtype, and what computes
in which.

    name          parameters, gradients,        compute                          memory per trainable parameter
                  optimizer state (AdamW)                                         (weights + grads + AdamW state)
    "32-true"     float32                       float32                          4 + 4 + 8 = 16 bytes
    "bf16-mixed"  float32                       bfloat16 under torch.autocast    16 bytes, plus autocast's bf16 copies of
                                                                                 the weights (2 bytes, kept for backward)
    "16-mixed"    float32                       float16 under torch.autocast,    as "bf16-mixed", plus the GradScaler's
                                                loss scaled by a GradScaler      few scalars
    "bf16-true"   bfloat16                      bfloat16                         2 + 2 + 4 = 8 bytes
    "16-true"     float16                       float16                          8 bytes

`dtype=` and `precision=` (in `memopt.estimate`, `memopt.plan`, the CLI and the examples): ``dtype`` is the
parameters' dtype. Given alone it names the "-true" precision of that dtype (``dtype="bfloat16"`` is "bf16-true", as
before precisions existed); given with ``precision`` it must be the precision's parameter dtype (``dtype="float32",
precision="bf16-mixed"`` is fine, ``dtype="bfloat16", precision="bf16-mixed"`` raises, naming both); neither: the
model's own dtype (a config's ``torch_dtype``), as "-true".

Mixed precision here is `torch.autocast` around the forward and the loss (backward runs the ops autocast chose), with
its default weight-cast cache: each trainable weight is cast once per forward and the copy is kept until the forward
ends, or until backward when an op saved it (a matmul saves its bf16 weight for the input's gradient). On CPU,
autocast supports both bfloat16 and float16; "16-mixed" on CPU runs float16 matmuls (slow on CPUs without native
fp16 arithmetic) with `torch.amp.GradScaler("cpu")`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def dtype_from_name(name: Any) -> torch.dtype:
    """A torch float dtype, or ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, ``"float32"``/``"fp32"``
    (with or without ``"torch."``) -> the torch dtype."""
    if isinstance(name, torch.dtype) and name in (torch.float32, torch.bfloat16, torch.float16):
        return name
    key = str(name).replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"dtype={name!r} is not supported; use 'float32', 'bfloat16' or 'float16'")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Precision:
    """One training precision. ``param_dtype``: parameters, their gradients and a torch optimizer's state;
    ``compute_dtype``: what `torch.autocast` computes in (None: no autocast, everything in ``param_dtype``);
    ``grad_scaler``: the loss is scaled by a `torch.amp.GradScaler` (float16's narrow range)."""

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype | None = None
    grad_scaler: bool = False
    summary: str = ""

    @property
    def mixed(self) -> bool:
        return self.compute_dtype is not None

    def autocast(self, device_type: str = "cpu", enabled: bool = True) -> contextlib.AbstractContextManager:
        """`torch.autocast(device_type, dtype=compute_dtype)` for the forward and the loss; a null context for the
        "-true" precisions."""
        if not self.mixed or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def scaler(self, device_type: str = "cpu") -> "torch.amp.GradScaler | None":
        """A `torch.amp.GradScaler` for "16-mixed" (on CPU too: ``torch.amp.GradScaler("cpu")``), else None."""
        return torch.amp.GradScaler(device_type) if self.grad_scaler else None

    def __str__(self) -> str:
        return f"{self.name!r} ({self.summary})"


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("32-true", torch.float32, summary="float32 weights, gradients, optimizer state and compute"),
    Precision("bf16-mixed", torch.float32, torch.bfloat16,
              summary="float32 weights, gradients and optimizer state; bfloat16 compute under torch.autocast, which "
                      "keeps bf16 copies of the weights for backward"),
    Precision("16-mixed", torch.float32, torch.float16, grad_scaler=True,
              summary="float32 weights, gradients and optimizer state; float16 compute under torch.autocast, loss "
                      "scaled by a GradScaler"),
    Precision("bf16-true", torch.bfloat16, summary="bfloat16 weights, gradients, optimizer state and compute"),
    Precision("16-true", torch.float16, summary="float16 weights, gradients, optimizer state and compute"),
)}
_TRUE_OF = {torch.float32: "32-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}
_AMBIGUOUS = {
    "bf16": "'bf16-mixed' (float32 weights, bf16 autocast: what Lightning's 'bf16' and transformers' bf16=True mean) "
            "or 'bf16-true' (bf16 weights)",
    "16": "'16-mixed' (float32 weights, fp16 autocast + GradScaler: transformers' fp16=True) or '16-true'",
    "fp16": "'16-mixed' (float32 weights, fp16 autocast + GradScaler: transformers' fp16=True) or '16-true'",
    "32": "'32-true'", "fp32": "'32-true'", "float32": "'32-true'", "bfloat16": "'bf16-mixed' or 'bf16-true'",
    "float16": "'16-mixed' or '16-true'",
}


def precision_config(value: Any) -> Precision:
    """A `Precision` from its name (or as is). Raises ValueError naming the allowed names."""
    if isinstance(value, Precision):
        return value
    if isinstance(value, str) and value in PRECISIONS:
        return PRECISIONS[value]
    allowed = ", ".join(repr(n) for n in PRECISIONS)
    hint = _AMBIGUOUS.get(str(value).replace("torch.", "").lower()) if isinstance(value, (str, torch.dtype)) else None
    raise ValueError(f"precision={value!r} is not supported; use one of {allowed}"
                     + (f" (for {value!r}: {hint})" if hint else ""))


def resolve_precision(precision: Any = None, dtype: Any = None, default_dtype: Any = None) -> tuple[Precision, str]:
    """The precision a run uses, from `precision` and `dtype` (the parameters' dtype) as the module docstring says,
    and where it came from (for printing): ``(Precision, "precision='bf16-mixed'" | "dtype=bfloat16" | ...)``.

    `default_dtype`: the model's own dtype (a config's ``torch_dtype``), used when neither is given.
    Raises ValueError when both are given and disagree, naming both and the fix."""
    if precision is not None:
        p = precision_config(precision)
        if dtype is not None:
            d = dtype_from_name(dtype)
            if d != p.param_dtype:
                true = _TRUE_OF[d]
                raise ValueError(
                    f"dtype={dtype_name(d)} conflicts with precision={p.name!r}, whose parameters are "
                    f"{dtype_name(p.param_dtype)}"
                    + (f" ({dtype_name(p.compute_dtype)} is its autocast compute dtype)" if p.mixed else "")
                    + f"; pass precision alone, or precision={true!r} for {dtype_name(d)} parameters"
                )
        return p, f"precision={p.name!r}"
    if dtype is not None:
        d = dtype_from_name(dtype)
        return PRECISIONS[_TRUE_OF[d]], f"dtype={dtype_name(d)}"
    d = dtype_from_name(default_dtype) if default_dtype is not None else torch.float32
    return PRECISIONS[_TRUE_OF[d]], ("the model's dtype " + dtype_name(d)) if default_dtype is not None else "the default"
