"""One fake training step, and what it tells about every step that differs from it only in parts that add up.

`fake_model` builds the model to estimate on fake tensors (bitsandbytes stand-ins, `memopt.apply`), `train_step`
runs its forward and backward as a training loop does (autocast for the mixed precisions, a GradScaler stand-in for
"16-mixed", the model's own loss or ``loss_fn``). `estimate` in estimator.py runs that with the real optimizer step;
`profile` runs it without one and keeps what the optimizer adds to exactly:

    peak = max(peak of forward and backward + optimizer state,
               live bytes when the step starts + optimizer state + the step's working memory)

The state comes from the optimizer's layout (`optimizers.OPTIMIZERS`), the working memory from running the torch
optimizer alone on fake parameters of the same shapes: any optimizer, one fake forward and backward. With the step in
backward (``in_backward``) there is no step after backward; the profile keeps, per parameter shape, the live bytes at
the moments parameters of that shape are updated, and one parameter's update's working memory adds to those:

    peak = max(peak of forward and backward, max over shapes (live at its updates + its update's working memory))
           + optimizer state

Depth adds up too. For a model whose decoder layers are all alike, each segment of the step (the part before the
blocks, each block's forward and backward, the part between two blocks, the part after them) peaks at a value that is
affine in the number of layers and, inside the stack, in the block's index: so two shallow steps (3 and 4 blocks;
3N and 4N for ``checkpoint=N``) give every segment's peak at any depth, to the byte (tests/test_plan.py compares with
full-depth steps). The first and last blocks may differ from the others (a frozen embedding gives block 0 an input
that needs no gradient) and are fitted on their own. `memopt.plan` searches with these and confirms its answer with a
full `estimate`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..precision import Precision, resolve_precision
from ..tracker import CATEGORIES
from ..tracker.tracking import Tracker, track
from .fake_step import (FakeGradScaler, FakeOffload, _adapters_stay_put, _call, _fake_like_meta, _fake_quantize,
                        _hf_batch, build_model, find_loss, real_data_answers, with_layers)
from .optimizers import OptimizerSpec, ParamShape, device_state_bytes

DEVICES = ("cuda", "cpu")
MODES = ("train", "generate")


@dataclass
class Job:
    """What is estimated, apart from the memopt options: the model, its batch, precision, device and ranks."""

    config: Any  # a transformers config, or None for a builder
    builder: Callable[[], nn.Module] | None
    inputs: Callable[[], Any] | None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    batch_size: int
    seq_len: int
    precision: Precision | None  # None: a builder's own dtype, known once built
    precision_from: str
    device: str
    world_size: int = 1
    mode: str = "train"

    @property
    def round_to(self) -> int | None:
        return 512 if self.device == "cuda" else None

    def batch(self, net: nn.Module) -> Any:
        return self.inputs() if self.inputs is not None else _hf_batch(net, self.batch_size, self.seq_len, self.mode)


def check_positive_ints(optional: bool = False, **values: Any) -> None:
    """ValueError naming the first value that is not a positive int (None allowed with `optional`)."""
    for name, v in values.items():
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int" + (" or None" if optional else ""))


def make_job(model: Any, *, batch_size: int, seq_len: int, inputs: Any, loss_fn: Any, precision: Any, dtype: Any,
             device: str, world_size: int, mode: str) -> Job:
    """Check the arguments `estimate` and `plan` share and resolve the precision (see `memopt.precision`)."""
    from .fake_step import load_config

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use 'train' or 'generate'")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use 'cuda' or 'cpu'")
    check_positive_ints(batch_size=batch_size, seq_len=seq_len, world_size=world_size)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be a callable loss_fn(model, batch) -> scalar loss tensor")
    if callable(model) and not isinstance(model, str) and not hasattr(model, "to_dict") and \
            not hasattr(model, "__fspath__"):
        if inputs is None:
            raise ValueError("estimate(model=<callable>) needs inputs=<callable returning the batch>")
        config, builder = None, model
        default = None
    else:
        config, builder = load_config(model), None
        # the config's dtype (transformers 5 keeps it as `dtype`; reading `torch_dtype` logs a deprecation)
        default = vars(config).get("dtype") or vars(config).get("torch_dtype")
    if inputs is not None and not callable(inputs):
        raise TypeError(f"inputs={inputs!r} must be a zero-argument callable returning the batch")
    if builder is not None and precision is None and dtype is None:
        prec, source = None, "the model's dtype"
    else:
        prec, source = resolve_precision(precision, dtype, default)
    return Job(config, builder, inputs, loss_fn, batch_size, seq_len, prec, source, device, world_size, mode)


def fake_model(job: Job, options: dict, layers: int | None = None) -> tuple[nn.Module, list[str]]:
    """The model on fake tensors (inside an active FakeTensorMode), quantized (stand-ins) and `memopt.apply`-ed with
    `options`; with `layers`, a copy of the config with that many decoder layers. Returns (model, notes)."""
    from .. import apply as memopt_apply
    from ..config import quant_config

    notes: list[str] = []
    if job.builder is not None:
        net = job.builder()
        if not isinstance(net, nn.Module):
            raise TypeError(f"estimate(model=<callable>) must build an nn.Module, got {type(net).__name__}")
        if job.precision is None:  # the model's own dtype, as "-true"
            first = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
            job.precision, job.precision_from = resolve_precision(None, None, first)[0], "the model's dtype"
        _cast_floating(net, job.precision.param_dtype)
    else:
        config = job.config if layers is None else with_layers(job.config, layers)
        net = build_model(config, "meta", job.precision.param_dtype)  # no init, no memory
        _fake_like_meta(net)
    options = dict(options)
    kv_heads = options.pop("kv_heads", None)
    if kv_heads is not None and kv_heads is not False:  # first, as in memopt.apply: before the quantization stand-ins
        memopt_apply(net, kv_heads=kv_heads, attention=None)
    offload = options.pop("offload", None)
    quant = options.pop("quant", None)
    qconfig = quant_config(quant)
    if qconfig is not None:
        done, skipped = _fake_quantize(net, qconfig)
        notes.append(f"quant={qconfig.name!r}: {done} layers stood in by bitsandbytes' exact storage layout "
                     f"({skipped} skipped, as memopt.apply would); matmuls dequantize to a temporary")
    with _adapters_stay_put(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*offload.*CPU-only model.*")  # fake tensors live on CPU
        memopt_apply(net, **{k: v for k, v in options.items() if v is not None and v is not False or k == "attention"})
    if offload is not None and offload is not False:
        from ..config import offload_config

        config = offload_config(offload)
        if job.device == "cuda":
            net._memopt_fake_offload = FakeOffload(config, [*net.parameters(), *net.buffers()])
            notes.append(f"offload={config.name}: the tensors saved for backward outside checkpointed blocks (at least "
                         f"{config.min_bytes} bytes) counted in host memory, not on the device; {config.max_fwd_stash} "
                         "of them wait on the device for their copy in forward, and in backward each comes back with "
                         f"the {config.prefetch} needed next (the worst case of memopt's streams)")
        else:
            notes.append("offload=True does nothing with device='cpu': saved activations already live in host memory "
                         "(memopt.apply skips it there)")
    return net, notes


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` for fake parameters (which `Module.to` cannot swap): floating parameters and buffers are
    replaced by their cast copies, ties kept."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)


def train_step(net: nn.Module, job: Job, optimizer: torch.optim.Optimizer | None, notes: list[str] | None = None,
               after_backward: Callable[[], None] | None = None) -> None:
    """One training step as a loop writes it: forward and loss (under autocast for a mixed precision), backward
    (the loss scaled for "16-mixed", the gradients unscaled in place before the step), then the optimizer step and
    ``zero_grad(set_to_none=True)`` when an optimizer is given (else `after_backward` is called where it would
    step)."""
    precision = job.precision
    batch = job.batch(net)
    scaler = FakeGradScaler() if precision.grad_scaler else None
    offload = getattr(net, "_memopt_fake_offload", None)
    with real_data_answers(batch), precision.autocast("cpu"), \
            (offload.hooks() if offload is not None else contextlib.nullcontext()):  # fake tensors live on the CPU
        if job.loss_fn is not None:
            loss, note = job.loss_fn(net, batch), None
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}")
        else:
            loss, note = find_loss(_call(net, batch))
    if note and notes is not None and note not in notes:
        notes.append(note)
    if scaler is not None:
        loss = scaler.scale(loss)
    loss.backward()
    del loss
    if scaler is not None:
        scaler.unscale_([p for p in net.parameters() if p.requires_grad])
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elif after_backward is not None:
        after_backward()
    if scaler is not None:
        scaler.update()


def warm_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   spec: OptimizerSpec | None = None) -> None:
    """Create the optimizer's state as in every step after the first, without a forward: `spec.init_state` where the
    table has one, else one step with zero gradients."""
    if spec is not None and spec.init_state is not None:
        spec.init_state(optimizer, params)
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def block_names(net: nn.Module) -> list[str]:
    from .._modules import find_blocks

    try:
        return [n for n, _ in find_blocks(net)[0]]
    except ValueError:
        return []


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


# -- the step's profile ----------------------------------------------------------------------------------------------
@dataclass
class StepProfile:
    """A training step without the optimizer, as the optimizer's part adds to it (see the module docstring).

    Attributes:
        peak, breakdown, phase, module: the forward and backward's peak, what it was made of, where.
        at_step, at_step_breakdown: live bytes (and by category) when the optimizer step would start.
        trainable: (shape, dtype) of every trainable parameter, for the optimizer's state and step.
        param_bytes: parameters and buffers as stored; block_param_bytes (one block's) and root_param_bytes (the
            rest's), for the FSDP2 model; kept_block_bytes: what the blocks keep for backward (offloaded by
            ``checkpoint="offload"``).
        segments: each segment's peak (live bytes, by category, module), for the depth fit.
        how: "a full-depth fake step" or how it was extrapolated.
    """

    peak: int
    breakdown: dict[str, int]
    phase: str
    module: str
    at_step: int
    at_step_breakdown: dict[str, int]
    trainable: list[tuple[tuple[int, ...], torch.dtype]]
    param_bytes: int
    block_param_bytes: int
    root_param_bytes: int
    kept_block_bytes: int
    blocks: int
    block_activation_bytes: list[int] = field(default_factory=list)  # what each block keeps for backward
    notes: list[str] = field(default_factory=list)
    segments: dict = field(default_factory=dict, repr=False)
    block_trainable: list = field(default_factory=list, repr=False)
    root_trainable: list = field(default_factory=list, repr=False)
    how: str = "a full-depth fake step"
    fitted: bool = False  # from the depth fit: trainable is root_trainable + block_trainable * blocks
    in_backward: bool = False  # the optimizer step fused into backward: gradients freed as they are applied
    # in_backward: (shape, dtype) of a parameter -> the largest (live bytes, by category, module) at the moment one of
    # that shape is updated in backward: its update's working memory adds to that moment
    hooks: dict = field(default_factory=dict, repr=False)
    grad_bytes: int = 0  # every trainable parameter's gradient (a plain step holds them all at once)


class _SegmentTracker(Tracker):
    """`Tracker` that also keeps the peak of each segment of the step: ``(phase, "in", block index)`` inside a block,
    ``(phase, "out", index of the last block run in this phase or None)`` outside."""

    def __init__(self, model: nn.Module, blocks: list[str], round_to: int | None) -> None:
        self._seg_peak: dict[tuple, tuple[int, dict[str, int], str]] = {}
        self._last_block: dict[str, int] = {}
        index = {b: i for i, b in enumerate(blocks)}
        self._block_of: dict[str, int] = {}
        for name, _ in model.named_modules():
            probe = name
            while probe and probe not in index:
                probe = probe.rpartition(".")[0]
            if probe in index:
                self._block_of[name] = index[probe]
        super().__init__(model, None, None, round_to)

    def _record(self) -> None:
        super()._record()
        # a step in backward (in_backward) is part of backward's segments
        phase = "backward" if self._phase == "optimizer" else self._phase
        block = self._block_of.get(self._current)
        if block is not None:
            self._last_block[phase] = block
            key = (phase, "in", block)
        else:
            key = (phase, "out", self._last_block.get(phase))
        self._keep(key)

    def _keep(self, key: tuple) -> None:
        live = self._live_bytes
        best = self._seg_peak.get(key)
        if best is None or live > best[0]:
            self._seg_peak[key] = (live, dict(self._totals), self._current)

    def _pre_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        super()._pre_step(opt, args, kwargs)
        params = [p for g in opt.param_groups for p in g["params"]]
        if len(params) != 1 or not isinstance(opt, _NoStep):
            return
        # a parameter's update in backward: the moment its update's working memory adds to
        p, block = params[0], self._block_of.get(self._current)
        kind = Hook("in" if block is not None else "out", tuple(p.shape), p.dtype)
        self._keep(("backward", kind, block if block is not None else self._last_block.get("backward")))


class Hook(tuple):
    """A segment kind for the moments parameters of one shape are updated in backward: (where, shape, dtype)."""

    def __new__(cls, where: str, shape: tuple, dtype: torch.dtype) -> "Hook":
        return super().__new__(cls, (where, shape, dtype))

    @property
    def where(self) -> str:
        return self[0]


class _NoStep(torch.optim.Optimizer):
    """A per-parameter optimizer with no state and no update, for the profile's step in backward: the update's
    state and working memory are the optimizer's part, added after (`with_optimizer`)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:
        return None


def profile(job: Job, options: dict, layers: int | None = None, in_backward: bool = False) -> StepProfile:
    """The `StepProfile` of one fake forward and backward (with `layers` decoder layers, or the model's own);
    ``in_backward``: with the optimizer step fused into backward (each gradient freed as it is applied)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..optim.in_backward import InBackwardOptimizer

    with FakeTensorMode(allow_non_fake_inputs=True):
        net, notes = fake_model(job, options, layers)
        net.train()
        blocks = block_names(net)
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter: nothing to estimate a training step for")
        at: dict[str, Any] = {}
        fused = InBackwardOptimizer(params, _NoStep, name="estimate") if in_backward else None
        with _SegmentTracker(net, blocks, job.round_to) as tracker:
            def mark() -> None:
                tracker._grads_now()
                at.update(live=tracker.live_bytes, totals=dict(tracker._totals))

            train_step(net, job, None, notes, after_backward=mark)
        report = tracker.report()
        trainable = [(n, tuple(p.shape), p.dtype) for n, p in net.named_parameters() if p.requires_grad]
        if fused is not None:
            fused.remove()
    block_params = [sum(layer.param_bytes for layer in report.layers if _inside(layer.name, b)) for b in blocks]
    in_blocks = lambda n: any(_inside(n, b) for b in blocks)  # noqa: E731
    own = {r.name: r.activation_bytes for r in report.rows()}
    kept = sum(own.get(b, 0) for b in blocks)  # a checkpointed block's own: its kept input
    folded = {r.name: r.activation_bytes for r in report.rows(blocks[0].count(".") + 1)} if blocks else {}
    block_act = [folded.get(b, 0) for b in blocks]  # with its children's
    first_block = blocks[1] if len(blocks) > 1 else (blocks[0] if blocks else None)
    segments = dict(tracker._seg_peak)
    r = job.round_to or 1
    return StepProfile(
        peak=report.peak_bytes, breakdown=dict(report.peak_breakdown), phase=report.peak_at.get("phase", ""),
        module=report.peak_at.get("module", ""), at_step=at["live"], at_step_breakdown=at["totals"],
        trainable=[(s, d) for _, s, d in trainable], param_bytes=report.total("param_bytes"),
        block_param_bytes=max(block_params, default=0), root_param_bytes=report.total("param_bytes") - sum(block_params),
        kept_block_bytes=kept, blocks=len(blocks), block_activation_bytes=block_act, notes=notes,
        segments=segments,
        block_trainable=[(s, d) for n, s, d in trainable if first_block is not None and _inside(n, first_block)],
        root_trainable=[(s, d) for n, s, d in trainable if not in_blocks(n)],
        in_backward=in_backward, hooks=_hook_peaks(segments.items()),
        grad_bytes=sum(-(-ParamShape(s, d).numel() * d.itemsize // r) * r for _, s, d in trainable),
    )


def _hook_peaks(items: Any) -> dict:
    """(shape, dtype) -> the largest (live, by category, module) of the hook segments among `items`
    ((key, value) pairs; a key holds a `Hook` where it is one)."""
    out: dict = {}
    for key, value in items:
        hook = next((k for k in key if isinstance(k, Hook)), None)
        if hook is None:
            continue
        shape = (hook[1], hook[2])
        if shape not in out or value[0] > out[shape][0]:
            out[shape] = value
    return out


# -- depth: two shallow steps give every depth ------------------------------------------------------------------------
class NotAffine(ValueError):
    """The two shallow steps do not line up segment by segment: their depth fit would not hold."""


def _normalise(segments: dict, blocks: int, every: int) -> dict[tuple, tuple[int, dict[str, int], str]]:
    """Segment keys independent of the depth: ``(phase, "head"|"tail")`` outside the stack; ``(phase, kind, role,
    r)`` for a (super)block, role "first", "last" or ``("mid", j)``, r the block's place in its group of `every`."""
    groups = blocks // every
    out = {}
    for (phase, kind, i), value in segments.items():
        where = kind.where if isinstance(kind, Hook) else kind
        hook = (kind,) if isinstance(kind, Hook) else ()  # the moments a parameter is updated in backward
        if where == "out" and i is None:
            key = (phase, "head", *hook)
        elif where == "out" and ((phase != "backward" and i == blocks - 1) or (phase == "backward" and i == 0)):
            key = (phase, "tail", *hook)
        else:
            j, r = divmod(i, every)
            role = "first" if j == 0 else "last" if j == groups - 1 else ("mid", j)
            key = (phase, kind, role, r)
        out[key] = value
    return out


def extrapolate(low: StepProfile, high: StepProfile, groups_low: int, every: int, layers: int) -> StepProfile:
    """The `StepProfile` at `layers` decoder layers from the profiles of ``groups_low * every`` and
    ``(groups_low + 1) * every`` layers (`every`: the checkpointing period, 1 unless ``checkpoint=N``)."""
    groups_high = groups_low + 1
    if layers % every:
        raise NotAffine(f"{layers} layers are not whole groups of {every}")

    def _affine(a: int, b: int, sa: int, sb: int, s: int) -> int:  # sb == sa + 1: integer bytes, exactly
        return a + (b - a) * (s - sa)

    g = layers // every
    a = _normalise(low.segments, groups_low * every, every)
    b = _normalise(high.segments, groups_high * every, every)
    mids = {}
    for src, groups in ((a, groups_low), (b, groups_high)):
        for key, value in src.items():
            if len(key) == 4 and isinstance(key[2], tuple):
                mids.setdefault((key[0], key[1], key[3]), {})[(key[2][1], groups)] = value
    plain_a = {k: v for k, v in a.items() if not (len(k) == 4 and isinstance(k[2], tuple))}
    plain_b = {k: v for k, v in b.items() if not (len(k) == 4 and isinstance(k[2], tuple))}
    if set(plain_a) != set(plain_b):
        raise NotAffine(f"segments differ between {groups_low} and {groups_high} groups: "
                        f"{sorted(map(str, set(plain_a) ^ set(plain_b)))[:4]}")

    def fit(va, vb, sa, sb, s):
        live = _affine(va[0], vb[0], sa, sb, s)
        cats = {c: _affine(va[1].get(c, 0), vb[1].get(c, 0), sa, sb, s) for c in CATEGORIES}
        return live, cats, vb[2]

    candidates = [(key, fit(plain_a[key], plain_b[key], groups_low, groups_high, g)) for key in plain_a]
    for (phase, kind, r), points in mids.items():
        try:  # v(j, S) = A + B S + C j from (1, low), (1, high), (2, high)
            v1l, v1h, v2h = points[(1, groups_low)], points[(1, groups_high)], points[(2, groups_high)]
        except KeyError:
            raise NotAffine(f"the middle blocks' segment {(phase, kind, r)} is missing in a shallow step") from None
        for j in {1, g - 2} if g >= 3 else set():
            def at(v1l=v1l, v1h=v1h, v2h=v2h, j=j, index=0, cat=None):
                pick = (lambda v: v[0]) if cat is None else (lambda v: v[1].get(cat, 0))
                base = _affine(pick(v1l), pick(v1h), groups_low, groups_high, g)
                return base + (pick(v2h) - pick(v1h)) * (j - 1)
            live = at()
            cats = {c: at(cat=c) for c in CATEGORIES}
            candidates.append(((phase, kind, r), (live, cats, v2h[2])))
    hooks = _hook_peaks(candidates)  # the moments of updates in backward, kept apart by the parameter's shape
    candidates = [c for c in candidates if not any(isinstance(k, Hook) for k in c[0])]
    if not candidates:
        raise NotAffine("no segment to fit")
    if any(v[0] < 0 for v in hooks.values()):
        raise NotAffine("the depth fit gives a negative peak")
    phase, (peak, breakdown, module) = max(((k[0], v) for k, v in candidates), key=lambda c: c[1][0])
    if peak < 0 or any(v < 0 for v in breakdown.values()):
        raise NotAffine("the depth fit gives a negative peak")
    per = lambda x, y: _affine(x, y, groups_low, groups_high, g)  # noqa: E731
    at_step = per(low.at_step, high.at_step)
    at_breakdown = {c: per(low.at_step_breakdown.get(c, 0), high.at_step_breakdown.get(c, 0)) for c in CATEGORIES}
    kept = per(low.kept_block_bytes, high.kept_block_bytes)
    return StepProfile(
        peak=int(peak), breakdown={c: int(v) for c, v in breakdown.items()}, phase=phase, module=module,
        at_step=int(at_step), at_step_breakdown={c: int(v) for c, v in at_breakdown.items()},
        trainable=high.root_trainable + high.block_trainable * layers,
        param_bytes=high.root_param_bytes + high.block_param_bytes * layers, block_param_bytes=high.block_param_bytes,
        root_param_bytes=high.root_param_bytes, kept_block_bytes=int(kept), blocks=layers, notes=high.notes,
        how=f"fitted from fake steps of {groups_low * every} and {groups_high * every} layers", fitted=True,
        root_trainable=high.root_trainable, block_trainable=high.block_trainable, in_backward=high.in_backward,
        hooks={k: (int(v[0]), {c: int(x) for c, x in v[1].items()}, v[2]) for k, v in hooks.items()},
        grad_bytes=per(low.grad_bytes, high.grad_bytes),
    )


def signature(module: nn.Module) -> tuple:
    """What makes two blocks alike for the depth fit: their submodules' classes and their tensors' names, shapes and
    dtypes."""
    return (tuple((n, type(m).__name__) for n, m in module.named_modules()),
            tuple((n, tuple(t.shape), t.dtype) for n, t in [*module.named_parameters(), *module.named_buffers()]))


# -- what the optimizer adds ------------------------------------------------------------------------------------------
_WORKING: dict[tuple, int] = {}


def step_working_bytes(spec: OptimizerSpec, trainable: list[tuple[tuple[int, ...], torch.dtype]], device: str,
                       round_to: int | None) -> int:
    """What `spec`'s step allocates above the parameters, gradients and state while it runs (foreach AdamW on CUDA:
    one parameter-sized temporary per parameter at once; the CPU loop: one parameter's), measured by running the
    torch optimizer on fake parameters of these shapes (its state created first). 0 for a step in place."""
    if spec.torch_optimizer is None:
        return 0
    key = (spec.name, device, round_to, tuple(trainable))
    if key not in _WORKING:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            params = [nn.Parameter(torch.empty(shape, dtype=dtype)) for shape, dtype in trainable]
            holder = nn.ParameterList(params)
            opt = spec.torch_optimizer(params, device)
            warm_optimizer(opt, params, spec)
            for p in params:
                p.grad = torch.zeros_like(p)
            with track(holder, opt, round_to=round_to) as tracker:
                before = tracker.live_bytes
                opt.step()
            _WORKING[key] = tracker.report().peak_bytes - before
    return _WORKING[key]


def stack_working_bytes(spec: OptimizerSpec, root: list, block: list, layers: int, device: str,
                        round_to: int | None) -> int:
    """`step_working_bytes` of ``root + block * layers`` parameters, from 3, 4 and 5 layers when those line up
    (a foreach step's temporaries grow by one block's per layer; a loop's are one parameter's), else run at
    `layers`."""
    if layers <= 5:
        return step_working_bytes(spec, root + block * layers, device, round_to)
    w3, w4, w5 = (step_working_bytes(spec, root + block * k, device, round_to) for k in (3, 4, 5))
    if w5 - w4 == w4 - w3:
        return w3 + (w4 - w3) * (layers - 3)
    return step_working_bytes(spec, root + block * layers, device, round_to)


def with_optimizer(prof: StepProfile, spec: OptimizerSpec, device: str, round_to: int | None,
                   cpu_offload: bool = False) -> tuple[int, dict[str, int], str, int]:
    """(peak, breakdown, phase, state bytes) of `prof`'s step with `spec` as its optimizer (see the module
    docstring). With the step in backward (``prof.in_backward``) there is no step after backward: each parameter's
    update adds its working memory to the moment it runs. ``cpu_offload``: the state and the update on the host
    (torchao's CPUOffloadOptimizer), only small parameters' state on the device."""
    state = device_state_bytes(spec, prof.trainable, round_to or 1, prof.in_backward, cpu_offload)
    if prof.in_backward:
        peak, cats, phase, work = prof.peak, prof.breakdown, prof.phase, 0
        for shape, (live, at, _) in prof.hooks.items():
            w = 0 if cpu_offload else step_working_bytes(spec, [shape], device, round_to)
            if live + w > peak:
                peak, cats, phase, work = live + w, at, "backward", w
        breakdown = dict(cats)
        breakdown["optimizer"] = breakdown.get("optimizer", 0) + state + work
        return peak + state, breakdown, "backward" if phase == "optimizer" else phase, state
    if cpu_offload:
        work = 0
    elif prof.fitted:  # root + block * layers
        work = stack_working_bytes(spec, prof.root_trainable, prof.block_trainable, prof.blocks, device, round_to)
    else:
        work = step_working_bytes(spec, prof.trainable, device, round_to)
    during_step = prof.at_step + state + work
    if during_step > prof.peak + state:
        breakdown = dict(prof.at_step_breakdown)
        breakdown["optimizer"] = breakdown.get("optimizer", 0) + state + work
        return during_step, breakdown, "optimizer", state
    breakdown = dict(prof.breakdown)
    breakdown["optimizer"] = breakdown.get("optimizer", 0) + state
    return prof.peak + state, breakdown, prof.phase, state
