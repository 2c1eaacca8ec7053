"""`memopt.plan`: the cheapest memopt options whose estimated peak fits a budget, searched over a small registry of
dimensions.

The search space is `SEARCH_SPACE`: one `Dimension` per choice (precision, what trains, checkpointing, the loss, the
optimizer, the optimizer step in backward, activation offloading and the optimizer state in host memory, the last two
on CUDA only), each a tuple of `Option` values with the step-time factor they cost and where that figure comes from. A
plan is one option per dimension. Adding an option is one `register_option` call (an optimizer is one entry in
`memopt.estimation.OPTIMIZERS`, which the optimizer dimension reads); a new kind of choice is one `Dimension` (its
``fake_step`` says whether its options change the forward and backward, so that each needs a fake step, or add up
with a step's profile exactly, as optimizers do; ``modes`` which estimate modes it applies to).

Order: plans that train every weight first (LoRA ones only with ``allow_lora``), then the preferred precision (the
order of ``precision=``), then AdamW's update (exact, or from 8/4-bit moments) before another rule (Adafactor), then
the predicted step time (the product of the options' factors), then the fewest
changes from the defaults. `plan` walks that order and returns the first plan whose peak fits the budget less the
headroom; every plan before it is listed with why it did not fit (its estimated peak, or its parameters, gradients
and optimizer state alone).

Speed: parameters, gradients and optimizer state are known without running anything and rule most plans out at
once; the optimizer's part adds to a fake forward and backward exactly (one fake step for every optimizer); and for a
model whose layers are alike, fake steps of 3 and 4 layers give the step at any depth exactly (`profile.extrapolate`).
The plan found is confirmed by a full-depth `estimate`, whose result is `Plan.estimate`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .._units import format_bytes, parse_bytes
from ..precision import PRECISIONS, precision_config, resolve_precision
from .estimator import Estimate, _is_offload, _plain, estimate, finish
from .optimizers import OPTIMIZERS, ParamShape, device_state_bytes
from .profile import NotAffine, extrapolate, make_job, profile, signature, with_optimizer

_GiB = 2**30
DEFAULT_HEADROOM = 0.10  # of the budget: allocator fragmentation and the estimate's error
CUDA_CONTEXT = _GiB // 2  # the CUDA context and kernels, taken before any tensor


@dataclass(frozen=True)
class Option:
    """One choice in a `Dimension`.

    Attributes:
        name: as printed ("full checkpointing").
        value: what the dimension's keyword of `plan` takes to name it (``checkpoint="full"``); ``aliases`` too.
        kwargs: the `memopt.estimate` keywords it sets (``{"checkpoint": "full"}``); the `memopt.apply` ones among
            them become `Plan.options`.
        slowdown, source: the step time over the dimension's default, and where that figure comes from.
        trains_all: False where only some weights train (LoRA): searched with ``allow_lora`` only, after every plan
            that trains all of them.
        needs_cuda: only searched with ``device="cuda"``.
        every: the checkpointing period (the depth fit steps over groups of this many layers).
        same_step_as: the value of another option of the dimension whose fake step this one shares (offloaded
            checkpointing runs as full checkpointing on fake tensors; the offloaded inputs are taken off after).
        only_with: ``{dimension: (values, ...)}``: searched only in plans whose option of that dimension is one of
            these (activation offloading only with full checkpointing, whose block inputs are all it has to copy;
            without it, or with every-N checkpointing's unwrapped blocks, whole layers' activations cross PCIe twice
            a step, slower than recomputing them).
    """

    name: str
    value: Any
    kwargs: dict = field(default_factory=dict)
    slowdown: float = 1.0
    source: str = "baseline"
    trains_all: bool = True
    needs_cuda: bool = False
    every: int = 1
    aliases: tuple = ()
    same_step_as: Any = None
    only_with: dict = field(default_factory=dict)  # dimension -> the values of it this option combines with

    def matches(self, value: Any) -> bool:
        return any(value is v or (type(value) is type(v) and value == v) for v in (self.value, *self.aliases))


@dataclass(frozen=True)
class Dimension:
    """One choice the plan makes: its options (the default first), or a function giving them (the optimizers come
    from `OPTIMIZERS`). ``fake_step``: whether the options change the forward and backward (one fake step per
    option) or add to a step's profile exactly. ``sets_params``: whether they change what the parameters are (for the
    bound from parameters, gradients and optimizer state). ``preference``: the options' order is the user's
    preference, searched before the step time (precision). ``modes``: the `estimate` modes it applies to."""

    name: str
    options: tuple[Option, ...] | Callable[[], tuple[Option, ...]]
    fake_step: bool = True
    sets_params: bool = False
    preference: bool = False
    modes: tuple[str, ...] = ("train",)

    def all_options(self) -> tuple[Option, ...]:
        return self.options() if callable(self.options) else self.options


def _precision_options() -> tuple[Option, ...]:
    return tuple(Option(p.name, p.name, {"precision": p.name}, source=p.summary) for p in PRECISIONS.values())


def _optimizer_options() -> tuple[Option, ...]:
    return tuple(Option(s.name, s.name, {"optimizer": s.name}, s.slowdown, s.source)
                 for s in OPTIMIZERS.values() if s.plan)


# keywords of `estimate` that are not `memopt.apply`'s: the optimizer's (memopt.optimizer) and the precision
_NOT_APPLY = ("precision", "optimizer", "in_backward", "cpu_offload")


# Step-time factors: checkpointing measured on the bench model with benchmarks/checkpoint.py (selective 1.03x,
# every-2 1.09x, full 1.21x of no checkpointing); the chunked loss measured 0.75-0.91x on CPU (benchmarks/loss.py) and
# counted as 1.00 (CUDA's fused cross-entropy is fast); the others as published, and marked as such.
SEARCH_SPACE: dict[str, Dimension] = {d.name: d for d in (
    Dimension("precision", _precision_options, sets_params=True, preference=True),
    Dimension("weights", (
        Option("full fine-tune", "full", {}, aliases=(None, False)),
        Option("LoRA r16", "lora", {"lora": 16}, 0.75, "LoRA paper: ~25% faster training (no weight gradients)",
               trains_all=False),
        Option("4-bit NF4 + LoRA r16 (QLoRA)", "4bit+lora", {"quant": "4bit", "lora": 16}, 1.05,
               "published: QLoRA's 4-bit dequantization makes a LoRA step ~1.3-1.5x slower", trains_all=False),
        Option("8-bit + LoRA r16", "8bit+lora", {"quant": "8bit", "lora": 16}, 1.60,
               "published: LLM.int8 matmuls are slower than 16-bit ones", trains_all=False),
    ), sets_params=True),
    Dimension("checkpoint", (
        Option("no checkpointing", False, {}, aliases=(None, "none")),
        Option("selective checkpointing", "selective", {"checkpoint": "selective"}, 1.03,
               "measured, benchmarks/checkpoint.py"),
        Option("every-2 checkpointing", 2, {"checkpoint": 2}, 1.09, "measured, benchmarks/checkpoint.py", every=2),
        Option("full checkpointing", "full", {"checkpoint": "full"}, 1.21, "measured, benchmarks/checkpoint.py",
               aliases=(True,)),
        Option("full checkpointing with CPU offload", "offload", {"checkpoint": "offload"}, 1.30,
               "assumed: host copies overlap poorly on small models", needs_cuda=True, same_step_as="full"),
    )),
    Dimension("loss", (
        Option("plain loss", None, {}, aliases=(False, "none")),
        Option("chunked loss", "chunked", {"loss": "chunked"}, 1.00,
               "measured 0.75-0.91x on CPU (benchmarks/loss.py), counted as 1.00"),
    )),
    Dimension("optimizer", _optimizer_options, fake_step=False, sets_params=False),
    Dimension("in_backward", (
        Option("optimizer step after backward", False, {}, aliases=(None,)),
        Option("optimizer step in backward", True, {"in_backward": True}, 1.00,
               "assumed: one optimizer call per parameter instead of one foreach call, negligible for large "
               "parameters (torchtune's optimizer_in_bwd); benchmarks/fullft.py measures it on CPU"),
    )),
    Dimension("offload", (
        Option("no activation offloading", False, {}, aliases=(None,)),
        Option("activation offloading", True, {"offload": True}, 1.05,
               "assumed: the checkpointed blocks' inputs copied on side streams, mostly hidden behind compute "
               "(torchtune's OffloadActivations); unmeasured here (no CUDA)", needs_cuda=True,
               only_with={"checkpoint": ("full",)}),
    )),
    Dimension("cpu_offload", (
        Option("optimizer state on the device", False, {}, aliases=(None,)),
        Option("optimizer state in host memory", True, {"cpu_offload": True}, 2.00,
               "assumed: the update runs on the CPU, and every gradient and parameter crosses PCIe each step "
               "(torchao's CPUOffloadOptimizer)", needs_cuda=True),
    ), fake_step=False),
)}


def register_option(dimension: str, option: Option) -> None:
    """Add `option` to the dimension named `dimension` of `SEARCH_SPACE` (after its others)."""
    dim = SEARCH_SPACE[dimension]
    if callable(dim.options):
        raise ValueError(f"the {dimension!r} dimension's options come from a table (precision: memopt.precision."
                         "PRECISIONS; optimizer: memopt.estimation.OPTIMIZERS): add the entry there")
    SEARCH_SPACE[dimension] = dataclasses.replace(dim, options=dim.options + (option,))


@dataclass
class Candidate:
    """One plan considered: its options, predicted step time, peak and why it did (not) fit."""

    name: str
    precision: str
    options: dict[str, Any]
    optimizer: str
    slowdown: float
    peak_bytes: int | None  # None: ruled out by `bound_bytes` without running a step
    bound_bytes: int
    fits: bool
    how: str
    trains_all: bool = True
    parts: dict[str, str] = field(default_factory=dict)  # dimension -> option name
    in_backward: bool = False
    cpu_offload: bool = False

    @property
    def reason(self) -> str:
        if self.peak_bytes is None:
            return f"at least {format_bytes(self.bound_bytes)}: {self.how}"
        return f"estimated peak ({self.how})"


@dataclass
class Plan:
    """What `memopt.plan` chose. ``memopt.apply(model, **plan.options)``, ``memopt.optimizer(model,
    plan.optimizer)`` and the precision ``plan.precision`` (`memopt.precision.PRECISIONS`) apply it.

    Attributes:
        fits: whether any plan's peak fits ``usable_bytes`` (the budget less ``headroom_bytes``); when not, the plan
            is the one with the smallest peak and ``needed_bytes`` the smallest budget that would do (headroom
            included).
        estimate: the full `Estimate` of the plan (a full-depth fake step).
        slowdown: the predicted step time over a plain full fine-tune step in the same precision, with
            ``slowdown_source``.
        tried: the plans considered before it, and it, in the order searched (`Candidate`).
        in_backward, cpu_offload: the `memopt.optimizer` flags of the plan (``memopt.optimizer(model,
            plan.optimizer, in_backward=plan.in_backward, cpu_offload=plan.cpu_offload)``).
        searched: how many plans the search space held; notes: how the search went.
    """

    fits: bool
    budget_bytes: int
    headroom_bytes: int
    usable_bytes: int
    name: str
    options: dict[str, Any]
    optimizer: str
    precision: str
    estimate: Estimate
    slowdown: float
    slowdown_source: str
    needed_bytes: int
    changes_training: bool
    tried: list[Candidate]
    searched: int = 0
    seconds: float = 0.0
    headroom: str = ""
    notes: list[str] = field(default_factory=list)
    space: dict[str, list[str]] = field(default_factory=dict)  # dimension -> the option names searched
    in_backward: bool = False  # memopt.optimizer(model, plan.optimizer, in_backward=True)
    cpu_offload: bool = False  # memopt.optimizer(model, plan.optimizer, cpu_offload=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimate"] = {k: v for k, v in self.estimate.to_dict().items() if k != "report"}
        d["options"] = {k: _plain(v) for k, v in self.options.items()}
        d["tried"] = [{**dataclasses.asdict(c), "options": {k: _plain(v) for k, v in c.options.items()},
                       "reason": c.reason} for c in self.tried]
        return d

    def __str__(self) -> str:
        est = self.estimate
        lines = [f"plan for a budget of {format_bytes(self.budget_bytes)}: a peak of at most "
                 f"{format_bytes(self.usable_bytes)} (headroom {format_bytes(self.headroom_bytes)}: {self.headroom})",
                 f"  assumed: {est.mode}, batch {est.batch_size} x seq {est.seq_len} on {est.device}"
                 + (f", world size {est.world_size}" if est.world_size > 1 else "") + "; searched: "
                 + "; ".join(f"{dim} {' | '.join(names)}" for dim, names in self.space.items()),
                 "  not counted in the peaks: " + "; ".join(est.not_counted),
                 f"{self.searched} plans, in order of what trains, precision, update rule, step time; these came first:"
                 if len(self.tried) > 1 else f"{self.searched} plans; the first one:"]
        lines += _grouped(self.tried, self.space)
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        flags = "".join(f", {k}=True" for k, v in (("in_backward", self.in_backward),
                                                     ("cpu_offload", self.cpu_offload)) if v)
        call = (f"memopt.apply(model{', ' + opts if opts else ''}); "
                f"memopt.optimizer(model, {self.optimizer!r}{flags}); precision {self.precision!r}")
        if self.fits:
            lines.append(f"plan: {self.name}: peak {format_bytes(est.peak_bytes)} (a full estimate), predicted step "
                         f"time {self.slowdown:.2f}x a plain full fine-tune step in this precision "
                         f"({self.slowdown_source})")
            lines.append(f"  {call}")
            lines.append("  at the peak: " + ", ".join(f"{cat} {format_bytes(n)}" for cat, n in est.breakdown.items()
                                                       if n))
            lines += [f"  {a}" for a in est.assumed]
            if self.changes_training:
                lines.append("  note: with LoRA only the adapters train (a different fine-tune than a full one)")
        else:
            lines.append(f"nothing fits: the smallest peak is {format_bytes(est.peak_bytes)} ({self.name}); a budget of "
                         f"{format_bytes(self.needed_bytes)} would do with this headroom, or lower batch_size/seq_len")
            lines.append(f"  it would be: {call}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _grouped(tried: list[Candidate], space: dict[str, list[str]] | None = None) -> list[str]:
    """One line per plan; plans ruled out by the same bound (their parameters, gradients and optimizer state alone,
    or a shallow fake step) that differ only in checkpointing and loss folded into one line, at the first's place."""
    lines: list[Any] = []
    folded: dict[tuple, list[Candidate]] = {}
    for c in tried:
        if c.peak_bytes is None:
            rest = tuple((k, v) for k, v in c.parts.items() if k not in _FOLDED)
            key = (rest, c.bound_bytes, c.how)
            if key not in folded:
                folded[key] = []
                lines.append(key)
            folded[key].append(c)
            continue
        lines.append(f"  {'fits ' if c.fits else 'over '} {format_bytes(c.peak_bytes):>12}  {c.slowdown:.2f}x  "
                     f"{c.name}{'' if c.fits else ': ' + c.reason}")
    out = []
    for line in lines:
        if not isinstance(line, tuple):
            out.append(line)
            continue
        group = folded[line]
        c = group[0]
        label = c.name
        if len(group) > 1:
            varying = []
            for dim in _FOLDED:
                names = list(dict.fromkeys(g.parts.get(dim, "") for g in group))
                every = space is not None and len(names) > 1 and set(names) == set(space.get(dim, ()))
                varying.append(f"any {dim}" if every else " / ".join(names))
            label = ", ".join([c.precision] + [v for k, v in line[0] if k != "precision" and not _is_default(k, v)]) + \
                f" ({len(group)} plans: {'; '.join(v for v in varying if v)})"
        out.append(f"  over  >={format_bytes(c.bound_bytes):>11}  {min(g.slowdown for g in group):.2f}x  {label}: "
                   f"{c.how}")
    return out


_FOLDED = ("checkpoint", "loss")


def _is_default(dimension: str, name: str) -> bool:
    """Whether `name` is the default option of `dimension` (left out of a plan's name; what trains and the optimizer
    are always said)."""
    dim = SEARCH_SPACE.get(dimension)
    return dim is not None and dimension not in ("weights", "optimizer") and dim.all_options()[0].name == name


def _headroom(headroom: Any, budget: int, device: str) -> tuple[int, str, Callable[[int], int]]:
    """(bytes, description, inverse) of the headroom: inverse(peak) is the smallest budget leaving `peak` usable."""
    if headroom is None:
        context = CUDA_CONTEXT if device == "cuda" else 0
        text = f"{DEFAULT_HEADROOM:.0%} of the budget" + (
            f" + {format_bytes(context)} for the CUDA context" if context else "")
        return (int(budget * DEFAULT_HEADROOM) + context, text,
                lambda peak: -(-(peak + context) * 100 // round(100 * (1 - DEFAULT_HEADROOM))))
    if isinstance(headroom, float) and not isinstance(headroom, bool):
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom={headroom!r}: a float is a fraction of the budget, in [0, 1); use a size "
                             "such as '2GiB' for bytes")
        return int(budget * headroom), f"{headroom:.0%} of the budget", lambda peak: int(-(-peak // (1 - headroom)))
    if headroom == 0:
        return 0, "none", lambda peak: peak
    size = parse_bytes(headroom, "headroom")
    return size, format_bytes(size), lambda peak: peak + size


_RESERVED = ("quant", "lora")


def plan(model: Any, budget: Any = "24GiB", *, batch_size: int = 1, seq_len: int = 512, device: str = "cuda",
         headroom: Any = None, allow_lora: bool = True, mode: str = "train", **kwargs: Any) -> Plan:
    """The cheapest way to make a training step fit `budget`: see the module docstring for the search and its order.

    Args:
        model, batch_size, seq_len, device: as `memopt.estimate`; the other `estimate` keywords (dtype, world_size,
            inputs, loss_fn, attention, blocks) pass through.
        budget: device memory, e.g. ``"24GiB"``, ``"80GB"`` or bytes.
        headroom: what a plan leaves free: default 10% of the budget, plus 0.5 GiB for the CUDA context with
            ``device="cuda"``; a float in [0, 1) is a fraction of the budget, a size (``"2GiB"``, bytes) an amount;
            0 lets a plan fill the budget.
        allow_lora: also consider plans that train LoRA adapters instead of every weight (on the base as is,
            4-bit or 8-bit): they change what is trained.
        precision, weights, checkpoint, loss, optimizer, in_backward, offload, cpu_offload: restrict a dimension of
            `SEARCH_SPACE` to one value or a list of them (``precision=["bf16-mixed", "bf16-true"]`` searches both,
            the first preferred; ``optimizer="adamw"`` keeps torch AdamW; ``in_backward=True`` only steps in
            backward; ``offload=False`` no activation offloading). The optimizers are every `memopt.optim` name the
            estimator plans (adamw, adamw8bit, adamw4bit, adafactor); the step in backward drops the gradients from
            the peak at about AdamW's step time; activation offloading (with full checkpointing only) and the state
            in host memory are searched with ``device="cuda"``. The precision defaults to the one `estimate` would
            assume (``dtype=``, else the config's dtype as "-true"): pass a list to let the plan choose.
        mode: ``"generate"``: how many sequences of `seq_len` fit, and with which KV cache, weights and vLLM
            settings (`memopt.estimation.generate.plan_generate`: new_tokens=, sequences=, kv_caches=,
            allow_quant=, kv_heads=, page_size=, device_memory=); returns a `GeneratePlan`.

    Cost: parameters are sized without running anything; for each (precision, weights, checkpointing, loss) it
    reaches, one fake forward and backward at 3 and 4 layers (or at full depth when the layers differ); then one full
    `estimate` of the plan found. Under a minute for an 8B model on 2 CPU cores.

    Raises:
        ValueError: a restriction names no option of its dimension, or `quant`/`lora` is given (the plan chooses
        them; ``allow_lora=False`` keeps full fine-tunes).
    """
    if mode == "generate":  # generation: memopt/estimation/generate.py
        from .generate import plan_generate

        if headroom is not None:
            raise ValueError(f"plan(mode='generate', headroom={headroom!r}): the generate plan sizes the cache from "
                             "the budget as given; pass the budget minus the headroom you want")
        return plan_generate(model, budget, seq_len=seq_len, device=device, **kwargs)
    if mode != "train":
        raise ValueError(f"mode={mode!r} is not supported; use 'train' or 'generate'")
    started = time.perf_counter()
    for key in _RESERVED:
        if key in kwargs:
            raise ValueError(f"plan(..., {key}=...) is chosen by the plan; pass allow_lora=False to keep every weight "
                             "training, weights=[...] to choose among "
                             f"{[o.value for o in SEARCH_SPACE['weights'].all_options()]}")
    restrict = {name: kwargs.pop(name) for name in list(kwargs) if name in SEARCH_SPACE}
    budget_bytes = parse_bytes(budget)
    head, head_text, budget_for = _headroom(headroom, budget_bytes, device)
    usable = max(0, budget_bytes - head)  # a budget below the headroom: nothing fits, and the plan says what would
    search = _Search(model, batch_size, seq_len, device, kwargs)
    space = search.space(restrict, allow_lora)
    notes: list[str] = []
    while True:
        result = search.run(space, usable)
        if result is not None:
            break
        notes.append("the depth fit disagreed with a full-depth estimate for this model: searched again with "
                     "full-depth fake steps")
    best, est, tried = result
    fits = best.fits and est.peak_bytes <= usable
    needed = budget_for(est.peak_bytes)
    notes += search.notes
    from ..optim import OPTIMIZERS as _REGISTRY

    entry = _REGISTRY.get(best.candidate.optimizer)
    if entry is not None and not entry.available():  # planned from its layout; training needs its library
        notes.append(f"optimizer {entry.name!r} needs {entry.requires}, which is not installed here: pip install "
                     + (f'"memopt[{entry.extra}]"' if entry.extra else entry.requires))
    sources = [f"{o.name} {o.slowdown:.2f}x ({o.source})" for o in best.chosen if o.slowdown != 1.0]
    return Plan(fits, budget_bytes, head, usable, best.candidate.name, best.apply_options, best.candidate.optimizer,
                best.candidate.precision, est, best.candidate.slowdown, "; ".join(sources) or "baseline", needed,
                not best.candidate.trains_all, tried, len(space), time.perf_counter() - started, head_text, notes,
                search.searched, best.candidate.in_backward, best.candidate.cpu_offload)


@dataclass
class _Choice:
    chosen: tuple[Option, ...]  # one per dimension, in SEARCH_SPACE order
    candidate: Candidate
    kwargs: dict  # estimate() keywords
    apply_options: dict
    fits: bool = False


class _Search:
    """The search of one `plan` call: the job, the profiles and parameter sizes found so far."""

    def __init__(self, model: Any, batch_size: int, seq_len: int, device: str, kwargs: dict) -> None:
        self.model, self.device = model, device
        self.kwargs = kwargs
        self.batch_size, self.seq_len = batch_size, seq_len
        self.job = make_job(model, batch_size=batch_size, seq_len=seq_len, inputs=kwargs.get("inputs"),
                            loss_fn=kwargs.get("loss_fn"), precision=kwargs.get("precision"),
                            dtype=kwargs.get("dtype"), device=device, world_size=kwargs.get("world_size", 1),
                            mode="train")
        self.fit_depth = True
        self.notes: list[str] = []
        self.searched: dict[str, list[str]] = {}
        self._profiles: dict[tuple, Any] = {}
        self._low: dict[tuple, Any] = {}  # the 3-layer (3N) profiles, for the partial bound
        self._params: dict[tuple, tuple[int, list]] = {}
        self._layers = self._uniform_layers()

    # -- the space ---------------------------------------------------------------------------------------------
    def space(self, restrict: dict, allow_lora: bool) -> list[_Choice]:
        dims = [d for d in SEARCH_SPACE.values() if "train" in d.modes]
        per_dim: list[list[Option]] = []
        skipped = []
        for d in dims:
            options = list(d.all_options())
            if d.name == "precision":
                options = self._precisions(restrict.get("precision"), options)
            elif d.name in restrict:
                wanted = restrict[d.name]
                wanted = list(wanted) if isinstance(wanted, (list, tuple)) else [wanted]
                chosen = []
                for w in wanted:
                    match = [o for o in options if o.matches(w)]
                    if not match:
                        raise ValueError(f"plan({d.name}={w!r}): not an option of {d.name!r}; use one of "
                                         f"{[o.value for o in options]}")
                    chosen += [m for m in match if m not in chosen]
                options = chosen
            if self.device != "cuda":
                skipped += [f"{d.name}={o.value!r} (needs device='cuda')" for o in options if o.needs_cuda]
                options = [o for o in options if not o.needs_cuda]
            if not allow_lora:
                options = [o for o in options if o.trains_all]
            if not options:
                raise ValueError(f"plan: nothing left to search in the {d.name!r} dimension")
            per_dim.append(options)
            self.searched[d.name] = [o.name for o in options]
        if skipped:
            self.notes.append("not searched: " + ", ".join(skipped))
        defaults = [d.all_options()[0] for d in dims]
        choices = []
        names = [d.name for d in dims]
        for index, combo in enumerate(itertools.product(*per_dim)):
            values = {n: o for n, o in zip(names, combo)}
            if any(n in values and not any(values[n].matches(v) for v in allowed)
                   for o in combo for n, allowed in o.only_with.items()):
                continue
            kwargs: dict[str, Any] = {}
            for o in combo:
                kwargs.update(o.kwargs)
            slowdown = 1.0
            for o in combo:
                slowdown *= o.slowdown
            trains_all = all(o.trains_all for o in combo)
            precision = kwargs.get("precision", self.job.precision.name)
            optimizer = kwargs.get("optimizer", "adamw")
            apply_options = {k: v for k, v in kwargs.items() if k not in _NOT_APPLY}
            spec = OPTIMIZERS[optimizer]
            if kwargs.get("cpu_offload") and spec.cuda_only:
                continue
            name = ", ".join(o.name for d, o in zip(dims, combo) if d.name != "precision" and
                             (o is not d.all_options()[0] or d.name in ("weights", "optimizer")))
            name = f"{precision}, {name}"
            cand = Candidate(name, precision, apply_options, optimizer, round(slowdown, 4), None, 0, False, "",
                             trains_all, {d.name: o.name for d, o in zip(dims, combo)},
                             bool(kwargs.get("in_backward")), bool(kwargs.get("cpu_offload")))
            changes = sum(o is not dflt for o, dflt in zip(combo, defaults))
            pref = per_dim[0].index(combo[0]) if dims[0].name == "precision" else 0
            # AdamW (exact or from quantized moments) before another update rule (Adafactor) of the same weights
            choices.append(((not trains_all, pref, not getattr(spec, "adam", True), round(slowdown, 6), changes, index),
                            _Choice(combo, cand, kwargs, apply_options)))
        choices.sort(key=lambda kc: kc[0])
        return [c for _, c in choices]

    def _precisions(self, wanted: Any, options: list[Option]) -> list[Option]:
        if wanted is None:
            names = [self.job.precision.name]
        else:
            names = [precision_config(w).name for w in (wanted if isinstance(wanted, (list, tuple)) else [wanted])]
            dtype = self.kwargs.get("dtype")
            for n in names:  # dtype with a list of precisions: each must agree with it
                resolve_precision(n, dtype)
        by_name = {o.value: o for o in options}
        return [by_name[n] for n in dict.fromkeys(names)]

    # -- evaluation --------------------------------------------------------------------------------------------
    def run(self, space: list[_Choice], usable: int) -> tuple[_Choice, Estimate, list[Candidate]] | None:
        """Walk `space` in order; the first plan that fits, confirmed (or, if nothing fits, the smallest). None when
        a confirmation disagreed with the depth fit (the caller searches again without it)."""
        tried: list[Candidate] = []
        evaluated: list[_Choice] = []
        for choice in space:
            cand = dataclasses.replace(choice.candidate)
            choice.candidate = cand
            cand.bound_bytes = self._bound(choice)
            if cand.bound_bytes > usable:
                cand.how = "parameters, gradients and optimizer state alone"
                tried.append(cand)
                continue
            partial = self._partial_bound(choice)
            if partial is not None and partial[0] > usable:
                cand.bound_bytes, cand.how = partial
                tried.append(cand)
                continue
            cand.peak_bytes, cand.how = self._peak(choice)
            cand.fits = cand.peak_bytes <= usable
            tried.append(cand)
            evaluated.append(choice)
            if cand.fits:
                est = self._confirm(choice)
                if est is None:
                    return None
                choice.fits = True
                return choice, est, tried
        # nothing fits: the smallest peak. Plans in order of their bound (the most frugal first among equals), each
        # evaluated only while its bound is below the smallest peak found so far
        best = min((c.candidate.peak_bytes for c in evaluated), default=None)
        for choice in sorted(space, key=lambda c: (c.candidate.bound_bytes, -c.candidate.slowdown)):
            cand = choice.candidate
            if choice in evaluated:
                continue
            if best is not None and cand.bound_bytes >= best:
                break
            partial = self._partial_bound(choice)
            if partial is not None and best is not None and partial[0] >= best:
                continue
            cand.peak_bytes, cand.how = self._peak(choice)
            evaluated.append(choice)
            best = cand.peak_bytes if best is None else min(best, cand.peak_bytes)
        smallest = min(evaluated, key=lambda c: c.candidate.peak_bytes) if evaluated else \
            min(space, key=lambda c: c.candidate.bound_bytes)
        est = self._confirm(smallest)
        if est is None:
            return None
        return smallest, est, tried

    def _estimate_kwargs(self, choice: _Choice) -> dict:
        return {**self.kwargs, **choice.kwargs}

    def _confirm(self, choice: _Choice) -> Estimate | None:
        model = self.job.config if self.job.config is not None else self.model  # read once
        est = estimate(model, batch_size=self.batch_size, seq_len=self.seq_len, device=self.device,
                       **self._estimate_kwargs(choice))
        predicted = choice.candidate.peak_bytes
        if predicted is not None and self.fit_depth and abs(est.peak_bytes - predicted) > max(4096, predicted // 1000):
            self.fit_depth = False
            self._profiles.clear()
            self._low.clear()
            return None
        prof = self._profiles.get(self._family(choice, params_only=False))
        exact = predicted == est.peak_bytes and prof is not None and prof.fitted
        choice.candidate.peak_bytes = est.peak_bytes
        choice.candidate.how = "a full estimate, as the depth fit predicted" if exact else "a full estimate"
        return est

    def _family(self, choice: _Choice, params_only: bool) -> tuple:
        dims = [d for d in SEARCH_SPACE.values() if "train" in d.modes]
        return tuple((d.name, o.value if params_only or o.same_step_as is None else o.same_step_as)
                     for d, o in zip(dims, choice.chosen) if (d.sets_params if params_only else d.fake_step))

    def _job(self, choice: _Choice):
        job = dataclasses.replace(self.job)
        name = choice.kwargs.get("precision")
        if name is not None:
            job.precision, job.precision_from = precision_config(name), "the plan"
        return job

    def _options(self, choice: _Choice) -> dict:
        opts = {"attention": self.kwargs.get("attention", "sdpa"), "blocks": self.kwargs.get("blocks")}
        opts.update(choice.apply_options)
        return {k: v for k, v in opts.items() if v not in (None, False) or k == "attention"}

    def _bound(self, choice: _Choice) -> int:
        """Parameters + gradients of the trainable ones + the optimizer's state, per rank: a lower bound of the
        peak (the optimizer step holds all three), known without running a step."""
        key = self._family(choice, params_only=True)
        if key not in self._params:
            self._params[key] = self._parameters(choice)
        params, trainable, grads = self._params[key]
        cand = choice.candidate
        if cand.in_backward:  # gradients a few at a time: at least the largest one
            r = self.job.round_to or 1
            grads = max((-(-ParamShape(s, d).numel() * d.itemsize // r) * r for s, d in trainable), default=0)
        state = device_state_bytes(OPTIMIZERS[cand.optimizer], trainable, self.job.round_to or 1, cand.in_backward,
                                   cand.cpu_offload)
        return (params + grads + state) // self.job.world_size

    def _partial_bound(self, choice: _Choice) -> tuple[int, str] | None:
        """From the fake step of 3 layers (3N for checkpoint=N) alone: every layer more adds at least its parameters
        to every moment of the step, and its gradients to the optimizer step, so the full depth peaks at least at
        (3-layer peak + the other layers' parameters) + the state. None where it does not apply."""
        every = max((o.every for o in choice.chosen), default=1)
        key = self._family(choice, params_only=False)
        cand = choice.candidate
        spec = OPTIMIZERS[cand.optimizer]
        if cand.in_backward and key not in self._profiles and self.job.world_size == 1 and \
                not _is_offload(choice.apply_options.get("checkpoint")):
            # the same step with the update after backward, profiled already: the step in backward frees gradients
            # and nothing else, so its peak is at least that step's less every gradient
            sibling = self._profiles.get(tuple((n, False if n == "in_backward" else v) for n, v in key))
            if sibling is not None:
                state = device_state_bytes(spec, sibling.trainable, self.job.round_to or 1, True, cand.cpu_offload)
                return (sibling.peak - sibling.grad_bytes + state,
                        "the same step with the update after backward, less every gradient")
        if key in self._profiles or not self._fits_depth(every) or self.job.world_size > 1 or \
                _is_offload(choice.apply_options.get("checkpoint")) or choice.apply_options.get("offload"):
            return None
        low = self._low_profile(choice, every)
        more = self._layers - 3 * every
        block_grads = 0 if cand.in_backward else \
            sum(-(-ParamShape(s, d).numel() * d.itemsize // (self.job.round_to or 1)) * (self.job.round_to or 1)
                for s, d in low.block_trainable)
        state = device_state_bytes(spec, low.root_trainable + low.block_trainable * self._layers,
                                   self.job.round_to or 1, cand.in_backward, cand.cpu_offload)
        # when backward starts every block still holds what it keeps for backward: at least the smallest of them
        kept = self._layers * min(low.block_activation_bytes, default=0)
        params, _, _ = self._params[self._family(choice, params_only=True)]
        bound = max(low.peak + more * low.block_param_bytes,
                    low.at_step + more * (low.block_param_bytes + block_grads),
                    params + kept) + state
        return bound, (f"a {3 * every}-layer fake step + the other {more} layers' parameters and what each keeps for "
                       "backward")

    def _fits_depth(self, every: int) -> bool:
        return self.fit_depth and self._layers is not None and self._layers > 4 * every and \
            self._layers % every == 0

    def _low_profile(self, choice: _Choice, every: int):
        key = self._family(choice, params_only=False)
        if key not in self._low:
            self._low[key] = profile(self._job(choice), self._options(choice), 3 * every,
                                     in_backward=choice.candidate.in_backward)
        return self._low[key]

    def _parameters(self, choice: _Choice) -> tuple[int, list, int]:
        """(parameter and buffer bytes as the tracker counts them, trainable (shape, dtype), their gradients' bytes)
        at full depth: from the model built at 3 and 4 layers when its layers are alike, else built at full depth;
        nothing runs."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ..tracker.tracking import Tracker
        from .profile import block_names, fake_model

        job, options = self._job(choice), self._options(choice)
        options = {k: v for k, v in options.items() if k in ("quant", "lora", "attention")}

        def sized(layers):
            with FakeTensorMode(allow_non_fake_inputs=True):
                net, _ = fake_model(job, options, layers)
                tracker = Tracker(net, None, None, job.round_to)
                total = tracker.live_bytes
                tracker.remove()
                blocks = block_names(net)
                trainable = [(n, tuple(p.shape), p.dtype) for n, p in net.named_parameters() if p.requires_grad]
            return total, trainable, blocks

        if self._layers is None:
            total, trainable, _ = sized(None)
            trainable = [(s, d) for _, s, d in trainable]
        else:
            (a, _, _), (b, named, blocks) = sized(3), sized(4)
            inside = lambda n, blk: n.startswith(blk + ".")  # noqa: E731
            block = [(s, d) for n, s, d in named if inside(n, blocks[1])]
            root = [(s, d) for n, s, d in named if not any(inside(n, blk) for blk in blocks)]
            total, trainable = a + (b - a) * (self._layers - 3), root + block * self._layers
        r = self.job.round_to or 1
        grads = sum(-(-ParamShape(s, d).numel() * d.itemsize // r) * r for s, d in trainable)
        return total, trainable, grads

    def _peak(self, choice: _Choice) -> tuple[int, str]:
        prof = self._profile(choice)
        job = self._job(choice)
        spec = OPTIMIZERS[choice.candidate.optimizer]
        cand = choice.candidate
        peak, breakdown, phase, state = with_optimizer(prof, spec, self.device, job.round_to, cand.cpu_offload)
        peak, _, _ = finish(peak, breakdown, phase, job=job, optimizer=spec.name, added_state=state,
                            offload=_is_offload(choice.apply_options.get("checkpoint")),
                            block_param_bytes=prof.block_param_bytes, root_param_bytes=prof.root_param_bytes,
                            kept_block_bytes=prof.kept_block_bytes, in_backward=cand.in_backward,
                            cpu_offload=cand.cpu_offload)
        return peak, prof.how

    def _profile(self, choice: _Choice):
        key = self._family(choice, params_only=False)
        if key in self._profiles:
            return self._profiles[key]
        job, options = self._job(choice), self._options(choice)
        every = max((o.every for o in choice.chosen), default=1)
        prof = None
        if self._fits_depth(every):
            try:
                low = self._low_profile(choice, every)
                prof = extrapolate(low, profile(job, options, 4 * every, in_backward=choice.candidate.in_backward), 3,
                                   every, self._layers)
            except NotAffine as exc:
                self.notes.append(f"{choice.candidate.name}: the depth fit does not hold ({exc}); a full-depth step")
        if prof is None:
            prof = profile(job, options, in_backward=choice.candidate.in_backward)
        self._profiles[key] = prof
        return prof

    def _uniform_layers(self) -> int | None:
        """The number of decoder layers when they are all alike (the depth fit holds), else None."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        from .fake_step import build_model, with_layers
        from .profile import block_names

        config = self.job.config
        if config is None or with_layers(config, 3) is None:
            return None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = text.num_hidden_layers
        with FakeTensorMode(allow_non_fake_inputs=True):
            net = build_model(config, "meta", self.job.precision.param_dtype)
        blocks = block_names(net)
        if len(blocks) != layers:
            return None
        signatures = {signature(net.get_submodule(b)) for b in blocks}
        return layers if len(signatures) == 1 else None


__all__ = ["SEARCH_SPACE", "Candidate", "Dimension", "Option", "Plan", "plan", "register_option"]
