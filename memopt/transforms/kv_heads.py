"""kv_heads=K: multi-head (or grouped-query) attention converted to K key/value heads, in place (GQA/MQA).

The KV cache of generation holds 2 x layers x kv_heads x head_dim values per token: 8 key/value heads instead of 32
is a 4x smaller cache. A multi-head checkpoint converts as in the GQA paper (Ainslie et al. 2023): the key and value
projection heads of each group of ``heads / K`` query heads are mean-pooled into one (``pooling="first"`` keeps the
group's first head instead, the paper's ablation), and the model is then uptrained briefly. The groups are contiguous
(heads 0..g-1 become key/value head 0, ...), the grouping transformers' ``repeat_kv`` assumes, so the converted model
runs through its architecture's own attention code and is an ordinary GQA checkpoint of its architecture:
``save_pretrained`` writes it, plain ``from_pretrained`` reads it back, ``generate()`` caches K heads per layer.

Which models:
- transformers models whose attention reads ``config.num_key_value_heads`` (the decoder's text config in composite
  models). The layout is read from the architecture itself, not from a list: the model is built twice on the meta
  device (no memory), from its config and from the same config with ``num_key_value_heads=K``; every parameter or
  buffer whose shape differs between the two is a key/value tensor to pool (k_proj/v_proj weights and biases, a
  norm over all key heads as OLMo-2's ``k_norm``, the k and v parts of a fused ``[q | k | v]`` projection as Phi-3's
  ``qkv_proj``) and every plain attribute that differs (``num_key_value_groups``, a Linear's ``out_features``) takes
  the twin's value. An architecture where nothing depends on ``num_key_value_heads`` (GPT-2, OPT, GPT-NeoX, BERT,
  T5: their configs have no such field), or where only head counts do (multi-head latent attention: its keys and
  values come from a shared latent, one per query head), or whose changed tensors are laid out in a way memopt does
  not know, or that does not share key/value heads among contiguous query heads (``num_key_value_groups`` is not
  ``heads / K``: JetMoe), or whose own forward fails with K heads where it runs with the current number (both twins
  run on the meta device where the architecture's mask code allows it: ESM-C), is refused before anything changes,
  with the reason.
- hand-written attention taught with `register_kv_heads(cls, fn)`: ``fn(module)`` returns a `KVLayout` naming the
  module's key/value tensors.

The conversion cannot be undone (`memopt.remove` leaves it): it replaces the pooled parameters by new, smaller ones,
so an optimizer must be created after it. It runs first in `memopt.apply`'s order: quantization and LoRA then see
the converted projections.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .._log import logger
from .._modules import get_submodule, transformers_class
from .._record import Entry, record_of
from .._registry import register_transform
from ..config import KVHeadsConfig

_PLAIN = (int, float, bool, str, tuple, list, type(None))

# ----------------------------------------------------------------------------------------------------------------
# register_kv_heads


@dataclass(frozen=True)
class KVLayout:
    """Where an attention module keeps its key/value heads: what a `register_kv_heads` function returns.

    Args:
        heads: query heads.
        kv_heads: key/value heads now.
        tensors: the module's key/value parameters or buffers (names relative to the module, e.g. ``"k.weight"``)
            -> where the heads are: an int ``dim`` (that dimension holds ``kv_heads`` contiguous heads, as a
            ``(kv_heads * head_dim, hidden)`` key projection's dim 0), or ``(dim, start, stop)`` for a slice of a
            fused projection (``[q | k | v]`` has the keys at ``(0, heads * hd, (heads + kv_heads) * hd)``), or a
            list of such slices.
        update: ``update(module, kv_heads)`` sets the module's own bookkeeping (``module.n_kv_head = kv_heads``)
            after its tensors were pooled; None when the forward reads the head count from the tensors' shapes.
    """

    heads: int
    kv_heads: int
    tensors: Mapping[str, Any]
    update: Callable[[nn.Module, int], None] | None = None


_REGISTERED: dict[type, Callable[[nn.Module], KVLayout]] = {}


def register_kv_heads(module_cls: type, fn: Callable[[nn.Module], KVLayout]) -> None:
    """Teach `memopt.apply(model, kv_heads=K)` a hand-written attention: ``fn(module)`` returns the `KVLayout` of an
    instance (its head counts and where its key/value tensors hold the heads). Subclasses match too; a registered
    transformers class is converted by its layout instead of memopt's own reading of the architecture.

    Example, an attention with separate ``k`` and ``v`` Linear layers and a ``n_kv`` attribute its forward reads::

        memopt.register_kv_heads(MyAttention, lambda m: memopt.KVLayout(
            heads=m.n_head, kv_heads=m.n_kv, tensors={"k.weight": 0, "k.bias": 0, "v.weight": 0, "v.bias": 0},
            update=lambda m, k: setattr(m, "n_kv", k)))
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"register_kv_heads expects an nn.Module subclass, got {module_cls!r}")
    if not callable(fn):
        raise TypeError(f"register_kv_heads expects fn(module) -> memopt.KVLayout, got {fn!r}")
    _REGISTERED[module_cls] = fn


def _registered_fn(module: nn.Module) -> Callable[[nn.Module], KVLayout] | None:
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    return None


# ----------------------------------------------------------------------------------------------------------------
# pooling


def pool_heads(t: torch.Tensor, dim: int, kv_heads: int, to: int, pooling: str = "mean") -> torch.Tensor:
    """``t`` with ``dim`` holding `kv_heads` contiguous heads -> the same with `to` heads: each group of
    ``kv_heads // to`` neighbouring heads becomes one, their mean (computed in float32) or their first."""
    size = t.shape[dim]
    hd, group = size // kv_heads, kv_heads // to
    x = t.movedim(dim, 0)
    rest = x.shape[1:]
    x = x.reshape(to, group, hd, *rest)  # (to, group, head_dim, ...)
    y = x.float().mean(1).to(t.dtype) if pooling == "mean" else x[:, 0]
    return y.reshape(to * hd, *rest).movedim(0, dim).contiguous()


def _pooled(t: torch.Tensor, segments: Sequence[tuple[int, int, int]], kv: int, to: int, pooling: str) -> torch.Tensor:
    """`t` with each (dim, start, stop) slice pooled from `kv` to `to` heads, the rest kept."""
    dim = segments[0][0]  # one dim per tensor (checked in the plan)
    pieces, at = [], 0
    for _, start, stop in sorted(segments, key=lambda s: s[1]):
        pieces.append(t.narrow(dim, at, start - at))
        pieces.append(pool_heads(t.narrow(dim, start, stop - start), dim, kv, to, pooling))
        at = stop
    pieces.append(t.narrow(dim, at, t.shape[dim] - at))
    return torch.cat([p for p in pieces if p.shape[dim]], dim=dim).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# the plan: what will change, found and checked before anything does


@dataclass(frozen=True)
class _Pool:
    name: str  # the tensor's FQN
    segments: tuple[tuple[int, int, int], ...]  # (dim, start, stop): each holds the current kv heads, contiguous


@dataclass
class _Unit:
    """One attention module's conversion."""

    fqn: str
    cls: str
    heads: int
    kv_heads: int
    pools: list[_Pool] = field(default_factory=list)
    attrs: list[tuple[str, str, Any]] = field(default_factory=list)  # (module FQN, attribute, new value)
    update: Callable[[nn.Module, int], None] | None = None


@dataclass
class _Plan:
    units: list[_Unit]
    configs: list[Any]  # config objects whose num_key_value_heads becomes K
    attrs: list[tuple[str, str, Any]]  # attribute changes outside any attention module
    heads: int
    kv_heads: int  # now
    noop: bool  # K is the current number: nothing changes


def _check_k(k: int, heads: int, kv: int, what: str) -> None:
    if k == kv:
        return
    allowed = [d for d in range(1, kv + 1) if kv % d == 0 and heads % d == 0]
    if k > kv:
        raise ValueError(
            f"kv_heads={k} is more than the {kv} key/value heads of {what}: converting pools heads, it cannot split "
            f"them; use one of {allowed}"
        )
    if heads % k or kv % k:
        raise ValueError(
            f"kv_heads={k} does not divide the {heads} attention heads and {kv} key/value heads of {what} into equal "
            f"groups; use one of {allowed}"
        )


def _plan(model: nn.Module, config: KVHeadsConfig) -> _Plan:
    k = config.kv_heads
    registered = [(n, m, fn) for n, m in model.named_modules() if (fn := _registered_fn(m)) is not None]
    units = [_registered_unit(n, m, fn, k) for n, m, fn in registered]
    pretrained = transformers_class("PreTrainedModel")
    if pretrained is not None and isinstance(model, pretrained):
        return _transformers_plan(model, config, units, {n for n, _, _ in registered})
    if not units:
        raise ValueError(
            f"kv_heads={k}: {type(model).__name__} is not a transformers model and none of its modules is an attention "
            "memopt knows how to convert; teach it with memopt.register_kv_heads(YourAttention, fn), fn(module) "
            "returning a memopt.KVLayout(heads=..., kv_heads=..., tensors={...})"
        )
    counts = {(u.heads, u.kv_heads) for u in units}
    heads, kv = min(counts, key=lambda c: c[1])
    return _Plan([u for u in units if u.kv_heads != k], [], [], heads, kv, all(u.kv_heads == k for u in units))


def _segments_of(spec: Any, name: str, cls: str) -> tuple[tuple[int, int, int], ...]:
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append((item, None, None))
        elif isinstance(item, tuple) and len(item) == 3 and all(isinstance(v, int) for v in item):
            out.append(item)
        else:
            raise TypeError(f"KVLayout.tensors[{name!r}] of {cls} is {spec!r}; give a dim (int), a (dim, start, "
                            "stop) slice or a list of slices")
    return tuple(out)


def _registered_unit(fqn: str, module: nn.Module, fn: Callable, k: int) -> _Unit:
    cls = type(module).__name__
    layout = fn(module)
    if not isinstance(layout, KVLayout):
        raise TypeError(f"the register_kv_heads function of {cls} returned {type(layout).__name__}, not a "
                        "memopt.KVLayout")
    _check_k(k, layout.heads, layout.kv_heads, f"{fqn or '<root>'} ({cls})")
    unit = _Unit(fqn, cls, layout.heads, layout.kv_heads, update=layout.update)
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, spec in layout.tensors.items():
        if name not in tensors:
            raise ValueError(f"KVLayout.tensors names {name!r}, which {cls} does not have; it has "
                             f"{sorted(tensors)[:8]}")
        t = tensors[name]
        segments = []
        for dim, start, stop in _segments_of(spec, name, cls):
            if not -t.dim() <= dim < t.dim():
                raise ValueError(f"KVLayout.tensors[{name!r}]: dim {dim} is out of range for a {t.dim()}-d tensor")
            dim %= t.dim()
            start, stop = (0, t.shape[dim]) if start is None else (start, stop)
            if not 0 <= start < stop <= t.shape[dim] or (stop - start) % layout.kv_heads:
                raise ValueError(f"KVLayout.tensors[{name!r}]: slice {start}:{stop} of dim {dim} (size "
                                 f"{t.shape[dim]}) does not hold {layout.kv_heads} heads of equal size")
            segments.append((dim, start, stop))
        if len({s[0] for s in segments}) > 1:
            raise ValueError(f"KVLayout.tensors[{name!r}] of {cls}: all slices of one tensor must be in one dim")
        ends = sorted((s[1], s[2]) for s in segments)
        if any(a[1] > b[0] for a, b in zip(ends, ends[1:])):
            raise ValueError(f"KVLayout.tensors[{name!r}] of {cls}: the slices {ends} overlap")
        _check_tensor(t, name, cls)
        unit.pools.append(_Pool(f"{fqn}.{name}" if fqn else name, tuple(segments)))
    return unit


def _check_tensor(t: torch.Tensor, name: str, cls: str) -> None:
    if not t.is_floating_point() or (type(t) not in (nn.Parameter, torch.Tensor) and not _is_fake(t)):
        raise ValueError(
            f"kv_heads: {name} of {cls} is a {type(t).__name__} of {t.dtype}, not a plain float tensor (quantized?); "
            "convert before quantization or LoRA: pass kv_heads= in the same memopt.apply call (it runs first)"
        )


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or isinstance(getattr(t, "data", None), FakeTensor)


# -- transformers: the layout read from two meta twins ---------------------------------------------------------------


def _text_config(config: Any) -> Any:
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        return config


@contextlib.contextmanager
def _real_tensors():
    """Meta twins are built outside any fake-tensor mode (memopt.estimate converts a model of fake tensors)."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover
        yield
        return
    with unset_fake_temporarily():
        yield


def _twin(model: nn.Module, kv: int | None) -> nn.Module:
    config = copy.deepcopy(model.config)
    if kv is not None:
        _text_config(config).num_key_value_heads = kv
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _real_tensors(), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(config)
    finally:
        hf_logging.set_verbosity(verbosity)


def _meta_forward(twin: nn.Module) -> Exception | None:
    """A forward of a meta twin on 4 token ids (shapes only, no memory): None if it ran. Many architectures cannot
    run on the meta device at all (their mask code reads values); this only tells a twin that fails where its
    original config's twin runs (an attention hard-wired to as many key heads as query heads, ESM-C's k_norm)."""
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    try:
        with _real_tensors(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin(input_ids=ids)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, _PLAIN)}


def _layout(old: torch.Size, new: torch.Size, heads: int, kv: int, k: int) -> tuple[tuple[int, int, int], ...] | None:
    """Where a tensor of shape `old` (kv key/value heads) holds its heads, from its shape `new` with k heads."""
    if len(old) != len(new):
        return None
    dims = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    if len(dims) != 1:
        return None
    d = dims[0]
    o, n = old[d], new[d]
    if o % kv == 0 and n * kv == o * k:  # (kv * head_dim): k_proj, v_proj, their biases, OLMo-2's k_norm
        return ((d, 0, o),)
    if (o - n) % (2 * (kv - k)) == 0:  # fused [q | k | v]: (heads + 2 kv) * head_dim, Phi-3's qkv_proj
        hd = (o - n) // (2 * (kv - k))
        if o == (heads + 2 * kv) * hd:
            return ((d, heads * hd, (heads + kv) * hd), (d, (heads + kv) * hd, (heads + 2 * kv) * hd))
    return None


def _refuse(model: nn.Module, why: str, k: int) -> ValueError:
    return ValueError(f"kv_heads={k}: {type(model).__name__} cannot be converted: {why}")


def _transformers_plan(model: nn.Module, config: KVHeadsConfig, units: list[_Unit], registered: set[str]) -> _Plan:
    k = config.kv_heads
    name = type(model).__name__
    text = _text_config(model.config)
    try:
        kv = getattr(text, "num_key_value_heads", None)
        heads = getattr(text, "num_attention_heads", None)
    except Exception as exc:  # noqa: BLE001 (transformers' per-layer configs refuse a global read)
        raise _refuse(model, "its config's head counts cannot be read as one number for every layer "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", k) from None
    if kv is None or heads is None:
        if units:
            return _Plan([u for u in units if u.kv_heads != k], [], [], units[0].heads, units[0].kv_heads,
                         all(u.kv_heads == k for u in units))
        raise _refuse(model, f"its config ({type(text).__name__}) has no num_key_value_heads: its attention has one "
                             "key/value head per query head, built in. memopt converts architectures whose attention "
                             "reads config.num_key_value_heads (Llama, Mistral, Qwen2, Gemma, Phi-3, ...); teach "
                             "another attention with memopt.register_kv_heads(cls, fn)", k)
    alias = getattr(type(text), "attribute_map", {}).get("num_key_value_heads")
    if kv is not None and alias is not None and "key_value" not in alias:
        raise _refuse(model, f"its config's num_key_value_heads is another name for {alias} (the query heads of its "
                             "attention), not a key/value head count of its own", k)
    if not (isinstance(kv, int) and isinstance(heads, int)):
        raise _refuse(model, f"its config's num_key_value_heads={kv!r} / num_attention_heads={heads!r} are not one "
                             "number for every layer", k)
    _check_k(k, heads, kv, f"{name} (config.num_key_value_heads={kv}, num_attention_heads={heads})")
    if k == kv:
        return _Plan([u for u in units if u.kv_heads != k], [], [], heads, kv, all(u.kv_heads == k for u in units))
    try:
        old, new = _twin(model, None), _twin(model, k)
    except Exception as exc:  # noqa: BLE001 (any failure to rebuild the architecture is a refusal)
        raise _refuse(model, f"building it from its config on the meta device (to read where it keeps its key/value "
                             f"heads) failed: {type(exc).__name__}: {exc}", k) from exc
    if _meta_forward(old) is None and (exc := _meta_forward(new)) is not None:
        raise _refuse(model, f"its own forward fails with {k} key/value heads (on the meta device: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the architecture does not "
                             "support grouped-query attention", k)
    converted, loose = _diff(model, old, new, heads, kv, k, registered)
    new_modules = dict(new.named_modules(remove_duplicate=False))
    for u in converted:
        groups = getattr(new_modules.get(u.fqn), "num_key_value_groups", None)
        if isinstance(groups, int) and groups != heads // k:
            raise _refuse(model, f"{u.fqn} ({u.cls}) does not share each key/value head among a contiguous group of "
                                 f"query heads (its num_key_value_groups is {groups} with {k} key/value heads, not "
                                 f"{heads // k}): pooling would not give it grouped-query attention", k)
    if not converted and not units:
        if loose:
            raise _refuse(model, "none of its key/value projections has num_key_value_heads heads (its attention "
                                 "derives keys and values per query head, as multi-head latent attention does): "
                                 "there is nothing to pool", k)
        raise _refuse(model, f"its attention does not read config.num_key_value_heads (nothing in {name} depends on "
                             "it)", k)
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    all_units = sorted(converted + [u for u in units if u.kv_heads != k], key=lambda u: order.get(u.fqn, 0))
    return _Plan(all_units, _configs(model, text, kv), loose, heads, kv, False)


def _diff(model: nn.Module, old: nn.Module, new: nn.Module, heads: int, kv: int, k: int,
          registered: set[str]) -> tuple[list[_Unit], list[tuple[str, str, Any]]]:
    """What differs between the meta twins with kv and k key/value heads, checked against the real model: the
    tensors to pool, grouped by attention module, and the attribute changes outside any of them."""
    old_t, new_t = _tensors(old), _tensors(new)
    if old_t.keys() != new_t.keys():
        extra = sorted(old_t.keys() ^ new_t.keys())[:4]
        raise _refuse(model, f"its parameters are not the same with {k} key/value heads ({extra} ...)", k)
    inside = lambda fqn: any(fqn == r or fqn.startswith(r + ".") for r in registered if r)  # noqa: E731
    real_t = _tensors(model)
    real_modules = dict(model.named_modules(remove_duplicate=False))
    by_unit: dict[str, _Unit] = {}
    old_modules = dict(old.named_modules(remove_duplicate=False))

    def unit_of(fqn: str) -> _Unit:
        """The attention module a changed tensor or attribute belongs to: the nearest enclosing module whose class
        name says attention, else the owner's parent."""
        parts = fqn.split(".")
        owner = ".".join(parts[:-1])
        chain = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        at = next((c for c in chain if "attention" in type(old_modules[c]).__name__.lower()), owner.rpartition(".")[0])
        if at not in by_unit:
            by_unit[at] = _Unit(at, type(real_modules.get(at, old_modules.get(at, old))).__name__, heads, kv)
        return by_unit[at]

    for tname, t in old_t.items():
        if t.shape == new_t[tname].shape or inside(tname):
            continue
        segments = _layout(t.shape, new_t[tname].shape, heads, kv, k)
        owner_name, _, attr = tname.rpartition(".")
        owner_cls = type(old_modules[owner_name]).__name__
        if segments is None:
            raise _refuse(model, f"{tname} ({owner_cls}) changes shape from {tuple(t.shape)} to "
                                 f"{tuple(new_t[tname].shape)} with {k} key/value heads, a layout memopt does not know "
                                 "how to pool; teach it with memopt.register_kv_heads(cls, fn)", k)
        real = real_t.get(tname)
        real_owner = real_modules.get(owner_name)
        if real is None or real_owner is None or type(real_owner) is not type(old_modules[owner_name]):
            got = "missing" if real_owner is None else f"a {type(real_owner).__name__}"
            raise _refuse(model, f"{owner_name} is {got}, not the {owner_cls} its architecture builds (quantized, "
                                 "given LoRA adapters, or changed otherwise); convert first: pass kv_heads= in the "
                                 "same memopt.apply call as quant=/lora= (it runs first), or before them", k)
        if real.shape != t.shape:
            raise _refuse(model, f"{tname} has shape {tuple(real.shape)}, not the {tuple(t.shape)} its config "
                                 "describes", k)
        _check_tensor(real, tname, owner_cls)
        unit_of(tname).pools.append(_Pool(tname, segments))

    loose: list[tuple[str, str, Any]] = []
    new_modules = dict(new.named_modules(remove_duplicate=False))
    for mname, m_old in old_modules.items():
        m_new = new_modules.get(mname)
        if m_new is None or type(m_new) is not type(m_old):
            raise _refuse(model, f"its module {mname or '<root>'} is not the same with {k} key/value heads", k)
        if inside(mname):
            continue
        a_old, a_new = _plain_attrs(m_old), _plain_attrs(m_new)
        for key in a_old.keys() | a_new.keys():
            if a_old.get(key) == a_new.get(key):
                continue
            real_owner = real_modules.get(mname)
            if real_owner is None or getattr(real_owner, key, None) != a_old.get(key):
                got = "missing" if real_owner is None else repr(getattr(real_owner, key, None))
                raise _refuse(model, f"{mname or '<root>'}.{key} is {got}, not the {a_old.get(key)!r} its config "
                                     "describes", k)
            change = (mname, key, a_new.get(key))
            unit = next((u for u in by_unit.values() if mname == u.fqn or mname.startswith(u.fqn + ".")), None)
            (unit.attrs if unit is not None else loose).append(change)
    return list(by_unit.values()), loose


def _configs(model: nn.Module, text: Any, kv: int) -> list[Any]:
    """The text config and every copy of it a submodule keeps (same class, same count), to update together."""
    found = {id(text): text}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and type(c) is type(text) and getattr(c, "num_key_value_heads", None) == kv:
            found.setdefault(id(c), c)
    return list(found.values())


# ----------------------------------------------------------------------------------------------------------------
# apply


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, replaced: dict[int, torch.Tensor]) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = get_submodule(model, owner_name)
    old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if id(old) in replaced:  # a tensor registered under several names: one new tensor for all
        value = replaced[id(old)]
    elif attr in owner._parameters:
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    replaced[id(old)] = value
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


@torch.no_grad()
def _convert(model: nn.Module, unit: _Unit, k: int, pooling: str, replaced: dict[int, torch.Tensor]) -> None:
    tensors = _tensors(model)
    for pool in unit.pools:
        old = tensors[pool.name]
        if id(old) not in replaced:
            _set_tensor(model, pool.name, _pooled(old.detach(), pool.segments, unit.kv_heads, k, pooling), replaced)
        else:
            _set_tensor(model, pool.name, old, replaced)
    for mname, key, value in unit.attrs:
        setattr(get_submodule(model, mname), key, value)
    if unit.update is not None:
        unit.update(get_submodule(model, unit.fqn), k)


def _short(unit: _Unit) -> str:
    names = [p.name[len(unit.fqn) + 1:] if unit.fqn else p.name for p in unit.pools]
    return ", ".join(names)


@register_transform(KVHeadsConfig, technique="kv_heads", order=5, plan=_plan)
def _apply(model: nn.Module, config: KVHeadsConfig, plan: _Plan) -> list[Entry]:
    k, name = config.kv_heads, type(model).__name__
    previous = [e for e in record_of(model).entries if e.technique == "kv_heads"]
    if plan.noop:
        if previous:  # converted before, already at K: what was done stays on record
            return previous
        logger.info("memopt: kv_heads=%d: %s already has %d key/value heads; nothing changed", k, name, k)
        return [Entry("kv_heads", "", "skipped", f"{name} already has {k} key/value heads (of {plan.heads} attention "
                                                  "heads): nothing to pool")]
    history = {e.fqn: e.detail.split(" key/value heads", 1)[0] for e in previous if e.status == "applied"}
    replaced: dict[int, torch.Tensor] = {}
    entries = []
    for unit in plan.units:
        _convert(model, unit, k, config.pooling, replaced)
        group = unit.kv_heads // k
        how = f"mean of {group} heads" if config.pooling == "mean" else f"first of {group} heads"
        before = history.get(unit.fqn, str(unit.kv_heads))
        entries.append(Entry("kv_heads", unit.fqn, "applied",
                             f"{before} -> {k} key/value heads ({how}; {_short(unit)}) of {unit.heads} query heads"))
    for mname, key, value in plan.attrs:
        setattr(get_submodule(model, mname), key, value)
    for c in plan.configs:
        c.num_key_value_heads = k
    if plan.configs:
        before = history.get("", str(plan.kv_heads))
        entries.insert(0, Entry("kv_heads", "", "applied",
                                f"{before} -> {k} key/value heads ({type(plan.configs[0]).__name__}."
                                f"num_key_value_heads; {config.pooling} pooling) of {plan.heads} query heads"))
    logger.info("memopt: converted %d attention modules of %s to %d key/value heads (%s pooling)", len(plan.units),
                name, k, config.pooling)
    return entries
