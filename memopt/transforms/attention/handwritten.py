"""Hand-written attention, recognised at runtime: ``softmax(q @ k^T * scale + mask) [dropout] @ v`` as one SDPA call.

A watched module's forward gets its tensor arguments as `_Watched` tensors (the same tensors, same storage and
autograd history, one subclass deeper); every op on a `_Watched` tensor comes to the call's `_Watch` and returns
`_Watched` tensors again, so the watch sees every op computed from the inputs:

- ``k.transpose(-2, -1)`` (or a permute that lays a key out transposed) comes back remembering its key;
- ``q @ kT`` (or Bloom's ``baddbmm(alibi, q, kT, beta, alpha)``) comes back as `_Scores`: a tensor of the scores'
  shape, dtype and device that holds no values (an expanded 0-d tensor), with the recipe to compute them;
- each step of the pattern (``* scale``, ``/ scale``, ``+ float mask``, ``masked_fill(mask, -inf or lowest)``,
  ``where(mask, scores, -inf or lowest)``, views that split or merge the batch dimensions, ``softmax(-1)`` in the
  scores' dtype or float32, the cast back, dropout) returns a new `_Scores`;
- ``probs @ v`` runs `scaled_dot_product_attention`: the (..., T, S) matrix is never materialised.

Any other op on the scores computes them for real, with autograd, exactly as written, and the reason is recorded.
Scores that leave the forward (returned, kept in an attribute or a dataclass) cost nothing unless they are used;
used, they are computed then, with autograd, and the module runs as written from its next call on (it needs the
matrix anyway). Dropout inside the converted attention draws its mask in SDPA: with dropout > 0, results differ
from eager by the random draw (not in distribution), and kept probabilities get their own draw.

The module's outputs go back as plain tensors. Traceable by torch.compile, inside checkpointed regions too: Dynamo
inlines the subclasses' ``__torch_function__`` (a `TorchFunctionMode` would not do: entering one inside a checkpoint
region is a side effect Dynamo refuses, and one entered outside is not applied inside), so a compiled graph holds one
SDPA call where the eager code had softmax(QK^T)V. What needs a tensor's values is eager-only (whether a mask is
exactly causal; a mask value held in a 0-d tensor, as GPT-Neo's): under compile the mask is passed as is, or the
pattern is computed as written.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import nullcontext
import inspect
import math
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from ..._patch import ForwardPatch, ambient
from ..._record import Applied
from . import probe

_T = torch.Tensor
_MATMUL = {torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm}
_BADDBMM = {torch.baddbmm, _T.baddbmm}
_TRANSPOSE = {torch.transpose, _T.transpose}
_MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}
_DIV = {torch.div, _T.div, _T.__truediv__}
_ADD = {torch.add, _T.add, _T.__add__, _T.__radd__}
_MASKED_FILL = {torch.masked_fill, _T.masked_fill}
# In-place ops on fresh scores: the out-of-place step, then the recipe moves into the caller's tensor.
_IN_PLACE = {_T.mul_: _T.mul, _T.__imul__: _T.mul, _T.div_: _T.div, _T.__itruediv__: _T.div, _T.add_: _T.add,
             _T.__iadd__: _T.add, _T.masked_fill_: _T.masked_fill}
_PERMUTE = {torch.permute, _T.permute}
_SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
_DROPOUT = {F.dropout}
_TO = {_T.to, _T.type_as, _T.float}
_VIEW = {_T.view, _T.reshape, torch.reshape}
# What the stand-in answers itself: it has the scores' shape, dtype and device. requires_grad and is_leaf too (no
# grad, a leaf): hooks that trackers (MemTracker, memopt.track) put on module outputs needing grad would otherwise
# compute the scores of a Dropout module that returns them.
# And what reads no values: observers (MemTracker) ask outputs for their storage, and see the stand-in's one element,
# which is all that exists.
_META = {_T.requires_grad.__get__, _T.is_leaf.__get__, _T.untyped_storage, _T.data_ptr, _T.storage_offset,
         _T.stride, _T.is_contiguous, _T.element_size, _T.nbytes.__get__, _T.itemsize.__get__,
         _T.is_floating_point, _T.is_complex, _T.get_device, _T.is_sparse.__get__, _T.is_meta.__get__, _T.size, _T.dim, _T.numel, _T.__len__, _T.shape.__get__, _T.dtype.__get__, _T.device.__get__,
         _T.ndim.__get__, _T.is_cuda.__get__, _T.layout.__get__}


# Asked of watched tensors outside any trace (code of PyTorch's walking `_base` chains, Dynamo building a graph's
# inputs after a graph break inside a watched forward): answered as is, not watched, or the chain never ends.
_UNWATCHED = {_T._base.__get__, _T.grad.__get__, _T.data.__get__, _T.grad_fn.__get__, _T._is_view}


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _number(x: Any) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


class _Watched(torch.Tensor):
    """A tensor inside a watched forward: its inputs and what is computed from them. `key`: for a transposed key,
    the tensor it is the transpose of."""

    watch: "_Watch"
    key: torch.Tensor | None = None

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})


def _forwarded(name: str) -> Callable:
    """A Tensor method written in Python, as a method of `_Watched` that goes straight to the watch. Dynamo cannot
    look such methods up on a tensor subclass inside a called function (``y.split(...)`` or ``1 - y`` in a helper
    breaks the graph), but it inlines methods of the subclass's own."""
    base = getattr(torch.Tensor, name)

    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _dispatch(base, (self, *args), kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _method in ("split", "__rsub__", "__rdiv__", "__rtruediv__", "__rpow__", "__pow__", "__floordiv__",
                "__rfloordiv__", "__rmatmul__", "__contains__", "norm", "unique", "unique_consecutive", "unflatten"):
    if _method in vars(torch.Tensor):
        setattr(_Watched, _method, _forwarded(_method))


_PY_METHODS = {f for f in vars(torch.Tensor).values() if getattr(f, "__module__", None) == "torch._tensor"}


def _raw(func: Any, args: tuple, kwargs: dict) -> Any:
    """`func` on the tensors underneath (no subclass dispatch): plain tensors out. Tensor methods written in Python
    (split, __rsub__, __iter__, ...) get plain tensors instead: Dynamo cannot trace them with subclass dispatch
    switched off."""
    if func in _PY_METHODS:
        return func(*_unwatched(args), **dict(zip(kwargs, _unwatched(tuple(kwargs.values())))))
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _unwatched(values: tuple) -> tuple:
    def plain(t: Any) -> Any:
        if isinstance(t, _Watched):
            with torch._C.DisableTorchFunctionSubclass():
                return t.view_as(t)
        if isinstance(t, (list, tuple)) and not hasattr(t, "_fields"):
            return type(t)(plain(v) for v in t)
        return t

    return tuple(plain(v) for v in values)


def _plain(x: Any) -> Any:
    """`_Watched` tensors in a forward's output as plain ones (aliases: an identity view, which torch.compile
    traces)."""
    def unwrap(t: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return t.view_as(t)

    return tree_map_only(_Watched, unwrap, x)


def _dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    """Every op on a `_Watched` or `_Scores` tensor: to the watch that made it while that watch's forward runs; after,
    plain (a `_Watched` tensor kept past the forward) or computed for real (scores used past the forward)."""
    for x in _tensors_in(args, kwargs):
        watch = getattr(x, "watch", None) if isinstance(x, (_Watched, _Scores)) else None
        if watch is not None and watch.active:
            return watch.handle(func, args, kwargs)
    if func in _META:
        return _raw(func, args, kwargs)
    for s in _scores_in(args, kwargs):
        s.owner.escaped(func)
    return _run_on_concrete(func, args, kwargs, None)


_FIELDS = ("q", "k", "watch", "seen", "dtype", "scale", "attend", "biases", "probs", "upcast", "dropout_p")


class _Scores(torch.Tensor):
    """Attention scores (or probabilities) not computed yet; see the module docstring.

    Recipe: q (*B, T, E) and k (*B, S, E) in the layout the matmul will run in; `seen` the (*V, T, S) shape the
    user sees (Bloom computes in (batch * heads) and views as (batch, heads)); `scale` (float, or a 0-d tensor);
    `attend` a bool mask (True = attend) and `biases` additive float masks, broadcastable to (*B, T, S); `probs`
    (softmax applied), `upcast` (softmax in float32), `dropout_p`; `dtype` the stand-in's dtype. `concrete` holds
    the scores once computed for real; `watch` is the `_Watch` that made them (`owner` its `_Handwritten` patch).
    """

    @staticmethod
    def make(q: torch.Tensor, k: torch.Tensor, watch: Any, seen: Any = None, dtype: Any = None, scale: Any = 1.0,
             attend: Any = None, biases: tuple = (), probs: bool = False, upcast: bool = False,
             dropout_p: float = 0.0) -> "_Scores":
        if seen is None:
            seen = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])  # (..., T, S)
        if watch.fake:  # fake tensors (memopt.estimate) cannot be re-classed: a wrapper with the metadata alone
            s = torch.Tensor._make_wrapper_subclass(_FakeScores, seen, dtype=dtype or q.dtype, device=q.device)
        else:
            with torch._C.DisableTorchFunctionSubclass():
                stand_in = q.new_empty((), dtype=dtype or q.dtype).expand(seen)  # no memory: one element, broadcast
            s = stand_in.as_subclass(_Scores)
        s.q, s.k, s.watch, s.seen, s.scale, s.attend, s.biases = q, k, watch, tuple(seen), scale, attend, biases
        s.probs, s.upcast, s.dropout_p, s.concrete = probs, upcast, dropout_p, None
        return s

    def but(self, **changes: Any) -> "_Scores":
        fields = {name: getattr(self, name) for name in _FIELDS if name != "dtype"}
        fields["dtype"] = self.dtype
        fields.update(changes)
        return _Scores.make(**fields)

    @property
    def owner(self) -> Any:
        return self.watch.owner

    @property
    def batch(self) -> tuple:
        """The batch dimensions the matmul runs in (q's and k's, broadcast)."""
        return tuple(torch.broadcast_shapes(self.q.shape[:-2], self.k.shape[:-2]))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _dispatch(func, args, kwargs or {})

    def materialise(self) -> torch.Tensor:
        """The scores (or probabilities) computed for real, with autograd, as the user's code would have."""
        if self.concrete is None:
            self.concrete = self._compute()
        return self.concrete

    def _compute(self) -> torch.Tensor:
        # On the tensors underneath: the watch must not take this matmul for new scores. Plain tensors out (the op
        # that needed them, if it runs under the watch, watches its own output).
        with torch._C.DisableTorchFunctionSubclass():
            s = self.q @ self.k.transpose(-2, -1)  # (*B, T, S)
            if not (isinstance(self.scale, float) and self.scale == 1.0):
                s = s * self.scale
            for bias in self.biases:
                s = s + bias
            if self.attend is not None:
                s = s.masked_fill(~self.attend, float("-inf"))
            if self.probs:
                s = F.softmax(s, dim=-1, dtype=torch.float32 if self.upcast else None)
                if self.dropout_p:
                    s = F.dropout(s, self.dropout_p, training=True)
            return s.to(self.dtype).reshape(self.seen)

    def sdpa(self, v: torch.Tensor) -> torch.Tensor:
        """probs @ v as one `scaled_dot_product_attention` call. v is (*V, S, Ev), in the user's layout; the result
        comes back in it too."""
        q, k, scale = self.q, self.k, self.scale
        if isinstance(scale, torch.Tensor):  # a 0-d tensor scale (no grad): folded into q
            q, scale = q * scale.to(q.dtype), 1.0
        batch = self.batch
        v_in = v.reshape(*batch, *v.shape[-2:])  # (*B, S, Ev): a view when only the batch layout differs
        mask, is_causal = _combined(self.biases), False
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        if self.attend is not None:
            if mask is not None:
                mask = mask.masked_fill(~self.attend, float("-inf"))
            elif _is_causal(self.attend, q.shape[-2], k.shape[-2]):
                is_causal = True  # no mask tensor at all: lets CUDA use the flash kernel
            else:
                mask = self.attend
        out = probe.sdpa((q, k, v_in), dict(attn_mask=mask, dropout_p=self.dropout_p, is_causal=is_causal,
                                            scale=scale))  # (*B, T, Ev)
        return out.reshape(*self.seen[:-2], *out.shape[-2:])


def _tensors_in(args: tuple, kwargs: dict) -> list:
    """The arguments of an op, and what is in its list or tuple arguments (torch.cat([cache, new]))."""
    found = []
    for x in (*args, *kwargs.values()):
        if isinstance(x, (list, tuple)):
            found.extend(x)
        else:
            found.append(x)
    return found


class _FakeScores(_Scores):
    """`_Scores` on fake tensors: a wrapper holding the metadata alone (see `_Scores.make`)."""

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # An op below the torch-function layer (an observer's dispatch mode) gets the scores computed for real,
        # without autograd (there is none down here).
        args, kwargs = tree_map_only(_Scores, lambda t: t.materialise().detach(), (args, kwargs or {}))
        return func(*args, **kwargs)


def _scores_in(args: tuple, kwargs: dict) -> list[_Scores]:
    return [x for x in _tensors_in(args, kwargs) if isinstance(x, _Scores)]


def materialise(x: Any) -> Any:
    """The scores in an op's arguments (nested in a list or tuple at most) computed for real."""
    if isinstance(x, _Scores):
        return x.materialise()
    if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
        return type(x)(materialise(v) for v in x)
    if isinstance(x, dict) and type(x) is dict:
        return {k: materialise(v) for k, v in x.items()}
    return x


def _run_on_concrete(func: Any, args: tuple, kwargs: dict, watch: "_Watch | None") -> Any:
    """`func` on the scores computed for real (under `watch` if its forward runs). In-place ops change the concrete
    tensor under the caller's name, so they return the stand-in (whose concrete value now holds the result)."""
    args, kwargs = materialise(args), materialise(kwargs)
    out = watch.handle(func, args, kwargs) if watch is not None else _raw(func, args, kwargs)
    name = _name(func).split(".")[-1]
    in_place = name.startswith("__i") if name.startswith("__") else name.endswith("_")  # mul_, __imul__; not __repr__
    return _scores_in(args, kwargs)[0] if in_place else out


_SHARED: list[tuple[tuple, weakref.ref, tuple]] = []  # eager: (what it was made of, its storage, its layout)


def _layout(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _shared(key: tuple, inputs: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A mask derived from other masks (`key` names how, `inputs` from what), made once and shared. Every layer of
    a model derives the same masks (Bloom's ALiBi plus the padding mask, Falcon's ALiBi times its scale): in eager
    the result is made once, so SDPA keeps one copy for backward, not one per layer. Found again by the inputs'
    storage and layout (each layer sees them as new tensor objects) while the result's storage lives (SDPA keeps it
    for backward). Under torch.compile and on fake tensors: made each time (Inductor shares equal computations)."""
    if torch.compiler.is_compiling() or any(is_fake(t) for t in inputs):
        return compute()
    full = (key, tuple(_layout(t) for t in inputs))
    _SHARED[:] = [entry for entry in _SHARED if entry[1]() is not None]
    for entry_key, storage, (offset, shape, stride, dtype, device) in _SHARED:
        st = storage()
        if entry_key == full and st is not None:
            with torch._C.DisableTorchFunctionSubclass():
                return torch.empty(0, dtype=dtype, device=device).set_(st, offset, shape, stride)
    out = compute()
    _SHARED.append((full, weakref.ref(out.untyped_storage()),
                    (out.storage_offset(), tuple(out.shape), tuple(out.stride()), out.dtype, out.device)))
    return out


def _combined(biases: tuple) -> torch.Tensor | None:
    """The sum of the additive masks, shared across layers (`_shared`)."""
    if len(biases) < 2:
        return biases[0] if biases else None

    def total() -> torch.Tensor:
        out = biases[0]
        for b in biases[1:]:
            out = out + b
        return out

    return _shared(("sum",), biases, total)


def _is_causal(attend: torch.Tensor, t: int, s: int) -> bool:
    """Whether the mask is the plain causal one (then SDPA gets `is_causal=True` and no mask tensor). It needs the
    mask's values: fake tensors (memopt.estimate) and torch.compile pass the mask instead."""
    if t != s or attend.shape[-2:] != (t, s) or torch.compiler.is_compiling() or is_fake(attend):
        return False
    tril = torch.ones(t, s, dtype=torch.bool, device=attend.device).tril()
    return bool((attend == tril).all())


def _constant_tensor(x: Any) -> bool:
    """A 0-d tensor that needs no gradient (a scale or mask value kept as a tensor)."""
    return isinstance(x, torch.Tensor) and not isinstance(x, _Scores) and x.dim() == 0 and not x.requires_grad


def _swaps_last_two(args: tuple, kwargs: dict) -> bool:
    if len(args) != 3 or kwargs or not isinstance(args[0], torch.Tensor):
        return False
    if not all(isinstance(d, int) for d in args[1:3]):
        return False
    n = args[0].dim()
    return {args[1] % n, args[2] % n} == {n - 2, n - 1}


def _permuted_key(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """For ``x.permute(dims)``: the tensor whose ``transpose(-2, -1)`` it is, ``x.permute(dims with the last two
    swapped)`` (a view); OpenAI-GPT and others lay their keys out as (B, H, E, S) directly."""
    x = args[0]
    dims = args[1:] if len(args) > 2 else args[1] if len(args) == 2 else kwargs.get("dims")
    if kwargs and "dims" not in kwargs or not isinstance(x, torch.Tensor) or dims is None:
        return None
    dims = tuple(dims)
    if len(dims) != x.dim() or not all(isinstance(d, int) for d in dims):
        return None
    return _raw(torch.permute, (x, (*dims[:-2], dims[-1], dims[-2])), {})


def _in_layout(x: _Scores, mask: torch.Tensor) -> torch.Tensor | None:
    """A mask given in the user's layout (*V, t, s), in the matmul's (*B, t, s); None if it cannot be (without
    materialising a broadcast dimension)."""
    view_batch, batch = x.seen[:-2], x.batch
    lead = mask.shape[:-2]
    if len(lead) < len(view_batch):
        lead = (1,) * (len(view_batch) - len(lead)) + tuple(lead)
    mask = mask.reshape(*lead, *mask.shape[-2:])
    if tuple(view_batch) == tuple(batch):
        return mask
    if all(d == 1 for d in lead):
        return mask.reshape(*(1,) * len(batch), *mask.shape[-2:])
    if tuple(lead) == tuple(view_batch):
        return mask.reshape(*batch, *mask.shape[-2:])
    return None


class _Watch:
    """One call of a watched module's forward: sees every op on its `_Watched` tensors (see the module docstring)."""

    def __init__(self, owner: Any, fake: bool = False) -> None:
        self.owner = owner
        self.active = True  # while the forward runs (and while checkpointing recomputes inside it)
        self.converted = 0
        self.reason: str | None = None
        # Fake tensors (memopt.estimate) cannot be re-classed as `_Watched`: `_FakeWatch`, a TorchFunctionMode, sees
        # every op instead (eager only, so no trouble for torch.compile), and transposed keys are remembered here.
        self.fake = fake
        self.keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(kT) -> (kT, k)

    def watched(self, t: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        if self.fake:
            if key is not None:
                self.keys[id(t)] = (t, key)
            return t
        w = t.as_subclass(_Watched)
        w.watch, w.key = self, key
        return w

    def key_of(self, kt: Any) -> torch.Tensor | None:
        if isinstance(kt, _Watched):
            return kt.key
        entry = self.keys.get(id(kt)) if self.fake else None
        return entry[1] if entry is not None and entry[0] is kt else None

    def wrap(self, x: Any) -> Any:
        """The tensors in `x` (an op's output; a forward's arguments, nested), watched."""
        if self.fake:
            return x
        if isinstance(x, torch.Tensor):
            return x if isinstance(x, (_Watched, _Scores)) else self.watched(x)
        if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
            return type(x)(self.wrap(v) for v in x)
        if isinstance(x, dict) and type(x) is dict:
            return {k: self.wrap(v) for k, v in x.items()}
        return x

    def handle(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func in _META or (not torch.compiler.is_dynamo_compiling() and func in _UNWATCHED):
            return _raw(func, args, kwargs)
        scores = _scores_in(args, kwargs)
        if not scores:
            if func in _MATMUL and not kwargs and len(args) == 2:
                found = self._scores(args[0], args[1])
                if found is not None:
                    return found  # q @ k^T: not computed
            if func in _BADDBMM and len(args) <= 3:
                found = self._baddbmm(args, kwargs)
                if found is not None:
                    return found
            out = _raw(func, args, kwargs)
            if func in _TRANSPOSE and _swaps_last_two(args, kwargs) and isinstance(out, torch.Tensor):
                return self.watched(out, key=args[0])
            if func in _PERMUTE and isinstance(out, torch.Tensor) and out.dim() >= 3:
                key = _permuted_key(args, kwargs)
                if key is not None:
                    return self.watched(out, key=key)  # x.permute(0, 2, 3, 1): a key laid out already transposed
            return self.wrap(out)
        if all(s.concrete is None for s in scores):
            if func in _IN_PLACE and isinstance(args[0], _Scores):
                result = self._step(_IN_PLACE[func], args, kwargs)
                if isinstance(result, _Scores) and result.dtype == args[0].dtype and result.seen == args[0].seen:
                    for name in _FIELDS:
                        if name != "dtype":
                            setattr(args[0], name, getattr(result, name))
                    return args[0]  # in place: the caller's tensor now stands for the changed scores
                result = NotImplemented
            else:
                result = self._step(func, args, kwargs)
            if result is not NotImplemented:
                return result
            if self.reason is None:
                self.reason = f"{_name(func)} was applied to the attention scores"
        return _run_on_concrete(func, args, kwargs, self)

    def _scores(self, q: Any, kt: Any) -> _Scores | None:
        k = self.key_of(kt) if isinstance(kt, torch.Tensor) else None
        if k is None or not isinstance(q, torch.Tensor) or q.dim() < 3:
            return None
        if q.dim() != k.dim() or q.shape[-1] != k.shape[-1]:
            return None
        return _Scores.make(q, k, self)

    def _baddbmm(self, args: tuple, kwargs: dict) -> _Scores | None:
        """``baddbmm(bias, q, kT, beta=b, alpha=a)`` = b * bias + a * (q @ kT): Bloom's ALiBi scores."""
        bias = args[0] if args else kwargs.get("input")
        q = args[1] if len(args) > 1 else kwargs.get("batch1")
        kt = args[2] if len(args) > 2 else kwargs.get("batch2")
        beta, alpha = _number(kwargs.get("beta", 1.0)), _number(kwargs.get("alpha", 1.0))
        if set(kwargs) - {"input", "batch1", "batch2", "beta", "alpha"} or beta is None or not alpha:
            return None
        if not isinstance(bias, torch.Tensor) or bias.requires_grad or not bias.is_floating_point():
            return None
        found = self._scores(q, kt)
        if found is None:
            return None
        biases = () if beta == 0 else (bias if beta == 1 else bias * beta,)
        return found.but(scale=alpha, biases=biases)

    def _step(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else None
        if func is torch.where:  # where(mask, scores, value): GPT-Neo's causal mask
            if len(args) != 3 or kwargs or not isinstance(args[1], _Scores) or args[1].probs:
                return NotImplemented
            return self._masked(args[1], args[0], args[2])
        if not isinstance(x, _Scores):
            if func in (_MUL | _ADD) and len(args) == 2 and isinstance(args[1], _Scores):
                x, args = args[1], (args[1], args[0])  # scalar * scores, mask + scores
            else:
                return NotImplemented
        other = args[1] if len(args) > 1 else None
        if func in _VIEW and len(args) >= 2 and not kwargs:
            return self._viewed(x, args[1:])
        if func in _TO and not kwargs:
            return self._cast(x, torch.float32 if func is _T.float else args[1] if len(args) > 1 else None)
        if not x.probs:
            if func in _MUL | _DIV and len(args) == 2 and not kwargs:
                return self._scaled(x, other, divide=func in _DIV)
            if func in _ADD and len(args) == 2 and not kwargs and isinstance(other, torch.Tensor):
                if isinstance(other, _Scores) or other.requires_grad or not other.is_floating_point():
                    return NotImplemented
                bias = _in_layout(x, other)
                if bias is None:
                    return NotImplemented
                return x.but(biases=(*x.biases, bias), dtype=torch.promote_types(x.dtype, other.dtype))
            if func in _MASKED_FILL:
                mask = args[1] if len(args) > 1 else kwargs.get("mask")
                value = args[2] if len(args) > 2 else kwargs.get("value")
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                    return NotImplemented
                return self._masked(x, ~mask, value)
            if func in _SOFTMAX:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                at = 3 if func is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype); x.softmax(dim, dtype)
                dtype = kwargs.get("dtype", args[at] if len(args) > at else None)
                if dim not in (-1, x.dim() - 1) or (dtype is not None and dtype not in (x.dtype, torch.float32)):
                    return NotImplemented
                # softmax in float32 of half scores: as SDPA's kernels compute it (accumulating in float32)
                upcast = (dtype or x.dtype) == torch.float32 and x.q.dtype != torch.float32
                return x.but(probs=True, upcast=upcast, dtype=dtype or x.dtype)
            return NotImplemented
        if func in _DROPOUT:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if x.dropout_p or _number(p) is None:
                return NotImplemented  # a second dropout: not SDPA's
            return x.but(dropout_p=float(p) if training else 0.0)
        if func in _MATMUL and len(args) == 2 and not kwargs and isinstance(other, torch.Tensor):
            if isinstance(other, _Scores) or x.dtype != x.q.dtype or other.dtype != x.q.dtype:
                return NotImplemented
            if other.dim() != len(x.seen) or other.shape[-2] != x.seen[-1] or tuple(other.shape[:-2]) != x.seen[:-2]:
                return NotImplemented
            self.converted += 1
            return x.sdpa(other)
        return NotImplemented

    def _scaled(self, x: _Scores, other: Any, divide: bool) -> Any:
        """``scores * c`` (or ``/ c``): into the scale, and into the additive masks already there (Falcon scales
        ``scores + alibi``). A 0-d tensor c only before any mask: its sign is not known."""
        c = _number(other)
        if c is not None:
            if c <= 0 and (x.attend is not None or x.biases):
                return NotImplemented  # a negative factor would turn -inf into +inf
            if c == 0:
                return NotImplemented
            c = 1.0 / c if divide else c
            return x.but(scale=x.scale * c, biases=tuple(_shared(("scaled", c), (b,), lambda b=b: b * c)
                                                           for b in x.biases))
        if _constant_tensor(other) and x.attend is None and not x.biases:
            factor = (1.0 / other) if divide else other
            return x.but(scale=factor if isinstance(x.scale, float) and x.scale == 1.0 else factor * x.scale)
        return NotImplemented

    def _masked(self, x: _Scores, keep: Any, value: Any) -> Any:
        """The scores where `keep`, `value` elsewhere, if `value` means "masked out": -inf (an attend mask), or the
        dtype's lowest value (an additive mask of it: s + lowest rounds to lowest, and exp underflows to 0 alike)."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            return NotImplemented
        number = _number(value)
        if number is None and _constant_tensor(value) and not torch.compiler.is_compiling() and not is_fake(value):
            number = float(value.item())
        keep = _in_layout(x, keep)
        if number is None or keep is None:
            return NotImplemented
        if number == -math.inf:
            return x.but(attend=keep if x.attend is None else x.attend & keep)
        if number > torch.finfo(x.dtype).min:
            return NotImplemented
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        bias = torch.where(keep, zero, torch.full((), number, dtype=x.dtype, device=x.device))  # 0 or lowest
        return x.but(biases=(*x.biases, bias))

    def _cast(self, x: _Scores, target: Any) -> Any:
        """``.float()`` of half scores before the softmax (MPT), ``.to(dtype)`` back after a float32 softmax
        (transformers' eager code)."""
        target = target.dtype if isinstance(target, torch.Tensor) else target
        if target == x.dtype:
            return x
        if not x.probs and target == torch.float32 and x.dtype == x.q.dtype:
            return x.but(dtype=target, upcast=True)
        if x.probs and x.dtype == torch.float32 and target == x.q.dtype:
            return x.but(dtype=target)
        return NotImplemented

    def _viewed(self, x: _Scores, shape: tuple) -> Any:
        """A view that only splits or merges the batch dimensions (Bloom's (batch * heads) <-> (batch, heads)). A
        split moves q and k to the finer layout; a merge only changes what the user sees."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if not all(isinstance(d, int) for d in shape):
            return NotImplemented
        numel = math.prod(x.seen)
        if shape.count(-1) == 1:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(numel // known if d == -1 else d for d in shape)
        if math.prod(shape) != numel or tuple(shape[-2:]) != tuple(x.seen[-2:]):
            return NotImplemented
        new_batch = tuple(shape[:-2])
        if len(new_batch) <= len(x.batch):
            return x.but(seen=tuple(shape))  # merged (or unchanged): the matmul keeps its layout

        def split(t: torch.Tensor | None) -> torch.Tensor | None:  # (*B, t, s) -> (*new B, t, s): always a view
            return None if t is None else t.expand(*x.batch, *t.shape[-2:]).reshape(*new_batch, *t.shape[-2:])

        return x.but(q=split(x.q), k=split(x.k), seen=tuple(shape), attend=split(x.attend),
                     biases=tuple(split(b) for b in x.biases))


class _Handwritten(ForwardPatch):
    """Runs a hand-written attention module's forward under `_Watch`, and records what happened."""

    def __init__(self, module: nn.Module, inner: Callable | None, fqn: str, record: Applied):
        super().__init__(module, inner)
        self.fqn = fqn
        self.record = record
        self.converted = 0
        self.calls = 0
        self.as_written: str | None = None  # why this module now runs as written, if it does
        self.escape: str | None = None  # why it will, from its next forward (not a recompute of this one) on

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.escape is not None and torch._C._current_graph_task_id() == -1:
            self.as_written = self.escape  # a forward, not checkpointing's recompute: that must redo what ran
        if self.as_written is not None:
            return self.call_inner(*args, **kwargs)
        if torch.compiler.is_compiling():
            watch = _Watch(self)
            args, kwargs = watch.wrap((args, kwargs))
            out = self.call_inner(*args, **kwargs)
            watch.active = False
            return _plain(out)
        watch = _Watch(self, fake=any(is_fake(t) for t in _tensors_in(args, kwargs) if isinstance(t, torch.Tensor)))
        args, kwargs = watch.wrap((args, kwargs))
        try:
            with ambient(functools.partial(_rewatch, watch)), _FakeWatch(watch) if watch.fake else nullcontext():
                out = self.call_inner(*args, **kwargs)
        finally:
            watch.active = False
        out = _plain(out)
        self.calls += 1
        self.converted += watch.converted
        if watch.reason is not None:
            self.record.set("attention", self.fqn, "skipped", f"hand-written attention kept as written: {watch.reason}")
        elif self.calls == 1:
            if watch.converted:
                self.record.set("attention", self.fqn, "applied",
                                f"hand-written softmax(QK^T)V -> SDPA ({watch.converted} per call)")
            else:
                self.record.set("attention", self.fqn, "skipped",
                                "calls softmax, but no softmax(q @ k.transpose(-2, -1)) @ v pattern ran")
        return out

    def escaped(self, func: Any) -> None:
        """Scores made under this module's watch are used after its forward returned (kept in an attribute,
        returned, put in a dataclass): they are computed now, with autograd. The module needs the (T, S) matrix
        anyway, so from its next forward on it runs as written."""
        if self.escape is None and not torch.compiler.is_compiling():
            self.escape = (f"its attention scores are used after its forward returns ({_name(func)} on them): "
                           "computed as written, with autograd")
            self.record.set("attention", self.fqn, "skipped", f"hand-written attention kept as written: {self.escape}")


class _FakeWatch(TorchFunctionMode):
    """The watch on fake tensors (see `_Watch.fake`): every op of the forward goes to it."""

    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.watch.handle(func, args, kwargs or {})


@contextlib.contextmanager
def _rewatch(watch: _Watch) -> Iterator[None]:
    """The watch on again while checkpointing recomputes a block inside the watched forward (see `_patch.ambient`):
    the recompute must run the ops the forward ran."""
    watch.active = True
    try:
        with _FakeWatch(watch) if watch.fake else nullcontext():
            yield
    finally:
        watch.active = False


def handwritten_candidate(module: nn.Module, registered: Callable[[nn.Module], Any]) -> bool:
    """A module whose class (its own methods, or its bases' outside torch) calls softmax: it may hold attention."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or registered(module) is not None:
        return False
    for klass in cls.__mro__:
        if klass is nn.Module or klass.__module__.startswith("torch."):
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "softmax" in source:
            return True
    return False
