"""The output head's logits as a stand-in: their shape, dtype and device, no memory, and the recipe to compute them.

In a training forward under `loss="chunked"` the head (`_Head`, an `nn.Linear`) returns a `_Logits` tensor: an
expanded 0-d tensor (one element, broadcast) that keeps the head's input, weight and bias, the autocast and grad
state of the call, and the ops applied to it since. Every op on it comes to `__torch_function__`:

- what reads no values (shape, size, dim, dtype, device, storage, strides) is answered by the stand-in itself;
- views and reshapes that keep the vocabulary as the last dimension, indexing of the leading dimensions
  (``logits[:, :-1]``), casts between float dtypes (``.float()``), multiplying or dividing by a Python number
  (a logit scale or temperature) and ``c * tanh(a * logits)`` (soft-capping) return a new stand-in: the leading-dim
  ops are applied to the kept input, the rest folded into a scale and a soft-cap;
- ``F.cross_entropy(logits (N, V), targets (N,), ignore_index=..., reduction=..., label_smoothing=...)`` (also through
  `nn.CrossEntropyLoss`) runs `chunked_cross_entropy` on the kept input with exactly those arguments: the (N, V)
  logits never exist;
- any other op computes the logits for real (the head's own forward, in the call's autocast and grad state, then the
  recorded ops replayed), warns once and runs as written: correct, at the full logits' memory. An in-place op first
  computes every stand-in of the same head call (in creation order), so that views alias and earlier results keep
  their values, as they would have.

Traceable by torch.compile: Dynamo inlines `__torch_function__` (as for attention's `_Scores`); a stand-in returned
by a compiled forward comes back as one. The eager-only parts (warnings, `memopt.applied` notes, the in-place
check of the kept input) are skipped while compiling.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from ..._log import warn_once
from ..._observe import counted_as
from .function import REDUCTIONS, _chunked

_T = torch.Tensor
# Answered by the stand-in itself: shape and type, and what observers (MemTracker, memopt.track) ask of module
# outputs: no grad (a leaf) so that no hook computes the logits, and its storage: the one element that exists.
_META = {
    _T.size, _T.dim, _T.numel, _T.__len__, _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__,
    _T.is_cuda.__get__, _T.layout.__get__, _T.is_floating_point, _T.is_complex, _T.get_device, _T.element_size,
    _T.is_sparse.__get__, _T.is_meta.__get__, _T.nbytes.__get__, _T.itemsize.__get__, _T.requires_grad.__get__,
    _T.is_leaf.__get__, _T.grad.__get__, _T.grad_fn.__get__, _T._base.__get__, _T._is_view, _T.untyped_storage,
    _T.data_ptr, _T.storage_offset, _T.stride, _T.is_contiguous,
}
_VIEWS = {_T.view, _T.reshape, torch.reshape, _T.flatten, torch.flatten, _T.unflatten, torch.unflatten, _T.view_as,
          _T.reshape_as, _T.squeeze, torch.squeeze, _T.unsqueeze, torch.unsqueeze}
_CASTS = {_T.float: torch.float32, _T.half: torch.float16, _T.bfloat16: torch.bfloat16, _T.to: None, _T.type_as: None}
_MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}
_DIV = {torch.div, _T.div, _T.__truediv__}
_TANH = {torch.tanh, _T.tanh}
_IN_PLACE_DUNDER = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
_CE_PARAMS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


class _Logits(torch.Tensor):
    """The logits of one head call, not computed (see the module docstring). Fields:

    head: the `_Head` patch that made it (its forward computes the logits; it keeps the notes for `applied`);
    hidden (*lead, H): the head's input with the leading-dim ops since applied, so that the logits are
    ``fold(hidden @ weight.T + bias)``; weight, bias: the head's parameters at the call; compute: the matmul dtype;
    autocast: (device type, enabled, dtype) of the call;
    scale, capped, cap: the fold, ``cap * tanh(scale * z)`` if capped (a tanh was applied), else ``scale * z``;
    parent, step: the stand-in this one was made from and the op that did (None for the head's output), replayed to
    compute the real value (grad_mode: the grad mode it was made in); group: every stand-in of this head call, in
    creation order; concrete: the real value
    once computed; checks: (tensor, version) of the kept input and weight (eager: an in-place change after the call
    would make the recomputed logits differ)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else None
        if isinstance(x, _Logits) and x.concrete is None:
            if func in _META:
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
            result = _step(func, args, kwargs)
            if result is not NotImplemented:
                return result
        elif func is F.cross_entropy or func in _MUL:  # the stand-in as a keyword input, or 2.0 * logits
            result = _step(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return _as_written(func, args, kwargs)

    # -- making ------------------------------------------------------------------------------------------------

    def _derived(self, func: Any, args: tuple, kwargs: dict, **changes: Any) -> "_Logits":
        """A new stand-in: this one after ``func(self, *args, **kwargs)``."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        fields.update(parent=self, step=(func, args, kwargs), grad_mode=torch.is_grad_enabled(), **changes)
        return _make(**fields)

    def fold(self) -> tuple[float, float | None] | None:
        """(s, cap) with the logits = ``cap * tanh(s * z / cap)`` (cap None: ``s * z``), as `chunked_cross_entropy`
        takes them (s folded into the hidden states and the bias); None if a negative or zero cap makes that
        impossible."""
        if not self.capped:
            return _snap(self.scale), None
        if not self.cap > 0:
            return None
        return _snap(self.scale * self.cap), self.cap

    # -- computing for real --------------------------------------------------------------------------------------

    def value(self, grad: bool | None = None, cache: bool = True) -> torch.Tensor:
        """The logits as the model's code would have them, with autograd (plain tensor). `grad=False` and
        `cache=False`: a detached copy, the autograd graph never built."""
        if self.concrete is not None:
            return self.concrete if grad is None else self.concrete.detach()
        self._check_inputs()
        enabled = self.grad_mode if grad is None else grad
        if self.parent is None:
            device, on, dtype = self.autocast
            with torch.autocast(device, dtype=dtype, enabled=on), torch.set_grad_enabled(enabled):
                z = self.head.call_inner(self.hidden)  # the head's own forward: F.linear
        else:
            parent = self.parent.value(grad, cache)
            func, args, kwargs = self.step
            with torch._C.DisableTorchFunctionSubclass(), torch.set_grad_enabled(enabled):
                z = func(parent, *args, **kwargs)
        if cache:
            self.concrete = z
        return z

    def _check_inputs(self) -> None:
        if torch.compiler.is_compiling():
            return
        for t, version in self.checks:
            if t._version != version:
                raise RuntimeError(
                    f"loss='chunked': the input or weight of the output head {self.head.fqn!r} was changed in place "
                    "after the head's call and before its logits were used; the logits memopt computes from them "
                    "now would differ from the ones the head would have returned. Do not modify them in place, or "
                    "pass loss=None"
                )


# Attribute names that no torch.Tensor attribute has (setting `grad` or `tanh` on a tensor would mean another thing)
class _FakeLogits(_Logits, FakeTensor):
    """The stand-in under FakeTensorMode (memopt.estimate): a FakeTensor (the mode runs its ops) that is a `_Logits`
    (it follows them first)."""


_FIELDS = ("head", "hidden", "weight", "bias", "compute", "autocast", "grad_mode", "scale", "capped", "cap", "parent",
           "step", "group", "checks", "shape", "dtype")


def _make(head: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype,
          autocast: tuple, grad_mode: bool, scale: float, capped: bool, cap: float | None, parent: Any, step: Any,
          group: list, checks: tuple, shape: tuple, dtype: torch.dtype) -> _Logits:
    mode = None if torch.compiler.is_compiling() else getattr(hidden, "fake_mode", None)
    if mode is not None:  # memopt.estimate's fake step: a FakeTensor cannot become a subclass, so one is made as one
        with unset_fake_temporarily():
            meta = torch.empty((), dtype=dtype, device="meta").expand(shape)
        s = _FakeLogits(mode, meta, hidden.device)
    else:
        with torch._C.DisableTorchFunctionSubclass():
            stand_in = hidden.new_empty((), dtype=dtype).expand(shape)  # no memory: one element, broadcast
        s = stand_in.as_subclass(_Logits)
    s.head, s.hidden, s.weight, s.bias, s.compute, s.autocast = head, hidden, weight, bias, compute, autocast
    s.grad_mode, s.scale, s.capped, s.cap, s.parent, s.step, s.group = grad_mode, scale, capped, cap, parent, step, group
    s.checks = checks
    s.concrete = None
    group.append(s)
    return s


def head_output(head: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                compute: torch.dtype, autocast: tuple) -> _Logits:
    """The stand-in for ``head(x)``: (*x.shape[:-1], vocab) in the dtype F.linear would return."""
    checks = () if torch.compiler.is_compiling() else ((x, x._version), (weight, weight._version))
    return _make(head, x, weight, bias, compute, autocast, torch.is_grad_enabled(), 1.0, False, None, None, None,
                 [], checks, (*x.shape[:-1], weight.shape[0]), compute)


def _snap(s: float) -> float:
    return 1.0 if math.isclose(s, 1.0, rel_tol=1e-9) else s


# -- the ops a stand-in follows ---------------------------------------------------------------------------------


def _step(func: Any, args: tuple, kwargs: dict) -> Any:
    """A new stand-in (or the loss) for the ops it follows; NotImplemented for any other."""
    if func is F.cross_entropy:
        return _cross_entropy(args, kwargs)
    if func in _MUL or func in _DIV:
        return _scaled(func, args, kwargs)
    x = args[0]
    if func is _T.__getitem__ and len(args) == 2 and not kwargs:
        return _indexed(x, args[1])
    if func in _VIEWS or func is _T.contiguous:
        return _reshaped(x, func, args, kwargs)
    if func in _CASTS:
        return _cast(x, func, args, kwargs)
    if func in _TANH and len(args) == 1 and not kwargs and not x.capped:
        return x._derived(func, (), {}, capped=True, cap=1.0)
    if func is _T.detach or func is _T.data.__get__:  # no autograd graph for what is read without it
        _computed_in_full(func, [x])
        return x.value(grad=False, cache=False)
    return NotImplemented


def _reshaped(x: _Logits, func: Any, args: tuple, kwargs: dict) -> Any:
    """A view or reshape that keeps the vocabulary as the last dimension: the same on the kept input's leading
    dimensions (row-major, so each row stays one position's logits)."""
    if func is _T.contiguous:
        if args[1:] or kwargs:
            return NotImplemented  # a memory format
        shape = tuple(x.shape)
    else:
        if any(isinstance(a, _Logits) for a in (*args[1:], *kwargs.values())):
            return NotImplemented
        with torch._C.DisableTorchFunctionSubclass():
            shape = tuple(func(*args, **kwargs).shape)  # on the stand-in's one element: a view, no memory
    if not shape or shape[-1] != x.shape[-1]:
        return NotImplemented
    hidden = x.hidden.reshape(*shape[:-1], x.hidden.shape[-1])
    return x._derived(func, args[1:], kwargs, hidden=hidden, shape=shape)


def _leading_only(index: tuple, ndim: int) -> bool:
    """Whether an index leaves the last dimension whole."""
    full = lambda i: isinstance(i, slice) and i.start is None and i.stop is None and i.step is None  # noqa: E731
    used = 0
    for i in index:
        if i is None or i is Ellipsis:
            continue
        if isinstance(i, torch.Tensor):
            if i.dtype not in (torch.bool, torch.uint8) and i.is_floating_point():
                return False
            used += i.dim() if i.dtype in (torch.bool, torch.uint8) else 1
        elif isinstance(i, (int, slice)) and not isinstance(i, bool):
            used += 1
        elif isinstance(i, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in i):
            used += 1
        else:
            return False
    if any(i is Ellipsis for i in index):
        return bool(index) and full(index[-1])
    if used < ndim:
        return True
    last = next((i for i in reversed(index) if i is not None), None)
    return used == ndim and full(last)


def _indexed(x: _Logits, index: Any) -> Any:
    """``logits[index]`` where the index leaves the vocabulary dimension whole (``logits[:, :-1]``,
    ``logits[:, [-1], :]``, ``logits[mask]``): the same index on the kept input."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, _Logits) for i in items) or not _leading_only(items, x.dim()):
        return NotImplemented
    with torch._C.DisableTorchFunctionSubclass():
        hidden = x.hidden[index]  # (*lead', H)
    return x._derived(_T.__getitem__, (index,), {}, hidden=hidden, shape=(*hidden.shape[:-1], x.shape[-1]))


def _cast(x: _Logits, func: Any, args: tuple, kwargs: dict) -> Any:
    """A cast to another float dtype of at most 32 bits on the same device (``logits.float()`` before the loss)."""
    dtype = _CASTS[func]
    if func is _T.type_as:
        other = args[1] if len(args) == 2 and not kwargs else None
        if not isinstance(other, torch.Tensor) or other.device != x.device:
            return NotImplemented
        dtype = other.dtype
    elif func is _T.to:
        rest = list(args[1:])
        if set(kwargs) - {"dtype", "device", "non_blocking", "copy"} or kwargs.get("copy"):
            return NotImplemented
        dtype, device = kwargs.get("dtype"), kwargs.get("device")
        for a in rest:
            if isinstance(a, torch.dtype) and dtype is None:
                dtype = a
            elif isinstance(a, (str, torch.device)) and device is None:
                device = a
            elif isinstance(a, bool):
                continue  # non_blocking
            else:
                return NotImplemented  # to(other_tensor), memory formats
        if device is not None:
            device = torch.device(device)
            if device.type != x.device.type or device.index not in (None, x.device.index):
                return NotImplemented  # another device: as written
        if dtype is None:
            return x
    elif len(args) != 1 or kwargs:
        return NotImplemented
    if not (dtype.is_floating_point and torch.finfo(dtype).bits <= 32):
        return NotImplemented
    if dtype == x.dtype:
        return x
    return x._derived(func, args[1:], kwargs, dtype=dtype)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _scaled(func: Any, args: tuple, kwargs: dict) -> Any:
    """``logits * c``, ``c * logits``, ``logits / c`` for a Python number c: into the fold."""
    if len(args) != 2 or kwargs:
        return NotImplemented
    x, c = args
    step = (func, (c,))  # replayed as func(logits, c)
    if not isinstance(x, _Logits) and func in _MUL:
        x, c = c, x  # torch.mul(c, logits)
        step = (_T.mul, (c,))
    factor = _number(c)
    if not isinstance(x, _Logits) or x.concrete is not None or factor is None:
        return NotImplemented
    if func in _DIV:
        if factor == 0:
            return NotImplemented
        factor = 1.0 / factor
    if x.capped:
        return x._derived(*step, {}, cap=x.cap * factor)
    return x._derived(*step, {}, scale=x.scale * factor)


def _cross_entropy(args: tuple, kwargs: dict) -> Any:
    """``F.cross_entropy(logits, targets, ...)`` over (N, V) stand-in logits and (N,) class indices: chunked, with the
    call's own ignore_index, reduction and label_smoothing."""
    if len(args) > len(_CE_PARAMS) or set(kwargs) - set(_CE_PARAMS):
        return NotImplemented
    call = dict(zip(_CE_PARAMS, args), **kwargs)
    x, target = call.get("input"), call.get("target")
    if not isinstance(x, _Logits) or x.concrete is not None:
        return NotImplemented
    if any(call.get(k) is not None for k in ("weight", "size_average", "reduce")):
        return NotImplemented  # class weights, legacy reduction arguments: as written
    if not isinstance(target, torch.Tensor) or isinstance(target, _Logits) or target.is_floating_point():
        return NotImplemented  # class probabilities: as written
    if not ((x.dim() == 2 and tuple(target.shape) == (x.shape[0],)) or (x.dim() == 1 and target.dim() == 0)):
        return NotImplemented  # (N, C, d1, ...) layouts: the class dimension is not the last one
    ignore_index, reduction = call.get("ignore_index", -100), call.get("reduction", "mean")
    smoothing = _number(call.get("label_smoothing", 0.0))
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or reduction not in REDUCTIONS:
        return NotImplemented
    if smoothing is None or not 0.0 <= smoothing <= 1.0:
        return NotImplemented
    fold = x.fold()
    if fold is None:
        return NotImplemented
    s, cap = fold
    hidden, bias = x.hidden, x.bias
    if s != 1.0:
        hidden = hidden * s  # (x * s) @ W.T + b * s = s * (x @ W.T + b)
        bias = None if bias is None else bias * s
    x._check_inputs()
    head = x.head
    with _counted(head.module):  # memopt.track files the chunked head + loss under the head's row
        loss = _chunked(hidden, x.weight, target, bias, ignore_index, reduction, None, smoothing, cap,
                        head.chunk_size, x.compute)
    # F.cross_entropy's result dtype: its input's, or float32 where autocast runs it (an fp32 op on CPU and CUDA)
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    if loss.dtype != out_dtype:
        loss = loss.to(out_dtype)
    if not torch.compiler.is_compiling():
        head.note_chunked(f"F.cross_entropy(ignore_index={ignore_index}, reduction={reduction!r}"
                          f"{f', label_smoothing={smoothing:g}' if smoothing else ''})")
    return loss


def _counted(module: Any) -> Any:
    if torch.compiler.is_compiling():
        import contextlib

        return contextlib.nullcontext()
    return counted_as(module)


# -- everything else: as written -------------------------------------------------------------------------------


def _stand_ins(values: Any) -> list[_Logits]:
    found = []
    for v in values:
        if isinstance(v, _Logits):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(_stand_ins(v))
    return found


def _real(v: Any) -> Any:
    if isinstance(v, _Logits):
        return v.value()
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return type(v)(_real(i) for i in v)
    return v


def _is_in_place(func: Any, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    return "out" in kwargs or name in _IN_PLACE_DUNDER or (name.endswith("_") and not name.startswith("_"))


def _as_written(func: Any, args: tuple, kwargs: dict) -> Any:
    """`func` on the logits computed for real. In place: every stand-in of the head call is computed first (views
    alias, earlier results keep their values), and the stand-in written to is returned, now holding its value."""
    found = _stand_ins((*args, *kwargs.values()))
    lazy = [s for s in found if s.concrete is None]
    in_place = _is_in_place(func, kwargs)
    if lazy:
        _computed_in_full(func, lazy)
        for s in lazy:
            for member in s.group if in_place else (s,):
                member.value()
    with torch._C.DisableTorchFunctionSubclass():
        out = func(*_real(args), **{k: _real(v) for k, v in kwargs.items()})
    if in_place and args and isinstance(args[0], _Logits) and out is args[0].concrete:
        return args[0]
    return out


def _computed_in_full(func: Any, lazy: list[_Logits]) -> None:
    if torch.compiler.is_compiling():
        return
    for s in lazy:
        s.head.note_full(_op_name(func), tuple(s.shape), s.dtype)


def _op_name(func: Any) -> str:
    """``Tensor.argmax``, ``F.log_softmax``, ``torch.cat``."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if name.startswith(("TensorBase.", "Tensor.", "_TensorBase.")):
        return "Tensor." + name.split(".", 1)[1]
    module = getattr(func, "__module__", None) or ""
    if module == "torch.nn.functional":
        return f"F.{name}"
    if module.startswith("torch") and not name.startswith("torch."):
        return f"torch.{name}"
    return name


def caller_level(skip: tuple[str, ...] = ()) -> int:
    """`warn_once` stacklevel of the first frame outside memopt, torch's module machinery and `skip`, counted from
    the function calling this one."""
    memopt_dir = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    internal = (memopt_dir, os.path.dirname(torch.nn.modules.module.__file__), *skip)
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def warn_full(fqn: str, op: str, shape: tuple, dtype: torch.dtype) -> None:
    """Warned once per head and op: the logits were computed in full."""
    torch_dir = os.path.dirname(torch.__file__)
    warn_once(
        f"loss-full-{fqn}-{op}",
        f"loss='chunked': {op} on the logits of the output head {fqn!r} computes them in full ({shape}, {dtype}): "
        "memopt computes F.cross_entropy(logits.view(-1, vocab), targets.view(-1), ...) on them chunked (through "
        "views, indexing of the leading dimensions, .float(), scaling by a number and soft-capping), and every "
        "other use as written, at the full logits' memory",
        stacklevel=caller_level((torch_dir,)),
    )
