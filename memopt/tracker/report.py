"""`MemoryReport` and `LayerMemory`: what `memopt.track` (and `memopt.estimate`) found, as plain data (int bytes),
with its display: `table`, `to_json`/`to_csv`, `plot`; and `compare`, two reports side by side. How the numbers
are counted is in `memopt.tracker.tracking`."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .._units import format_bytes

CATEGORIES = ("params", "grads", "optimizer", "activations", "autocast", "kv_cache", "other")
# shown in printed reports only where they are not zero (the data always has every category)
_OPTIONAL = ("autocast", "kv_cache")
PHASES = ("forward", "backward", "optimizer")
OUTSIDE = "(outside model)"


class Timeline:
    """The ``(op index, live bytes, phase)`` points of a tracked region, at most `limit` of them, for the plot.

    A long run is thinned evenly: when the list is full, neighbouring points merge pairwise into the higher of the
    two and from then on one point is kept per window of twice as many ops, again the window's highest. Every
    window shows its peak, so the first steps of a run, thinned most often, look as high as the last ones (keeping
    every other point instead drops peaks, more of them the older they are). The last point is always kept: the
    plot ends where the region did."""

    def __init__(self, limit: int) -> None:
        self.limit = max(4, int(limit))
        self.stride = 1  # points added per point kept
        self._points: list[tuple[int, int, str]] = []
        self._window: tuple[int, int, str] | None = None  # the highest point of the window being filled
        self._count = 0
        self._last: tuple[int, int, str] | None = None

    def add(self, op: int, live: int, phase: str) -> None:
        point = (op, live, phase)
        self._last = point
        if self._window is None or live > self._window[1]:
            self._window = point
        self._count += 1
        if self._count < self.stride:
            return
        self._points.append(self._window)
        self._window, self._count = None, 0
        if len(self._points) >= self.limit - 2:  # room for the window being filled and the last point
            pairs = zip(self._points[0::2], self._points[1::2])
            merged = [a if a[1] >= b[1] else b for a, b in pairs]
            if len(self._points) % 2:
                merged.append(self._points[-1])
            self._points = merged
            self.stride *= 2

    def points(self) -> list[tuple[int, int, str]]:
        points = list(self._points)
        if self._window is not None:
            points.append(self._window)
        if self._last is not None and (not points or points[-1] != self._last):
            points.append(self._last)
        return points


@dataclass
class LayerMemory:
    """One module's memory, as `MemoryReport.layers` lists it (bytes are ints).

    Attributes:
        name: FQN (``""`` is the model itself; ``"(outside model)"`` the ops run outside it, e.g. the loss).
        type: class name.
        params: number of elements of its own parameters (children excluded).
        param_bytes: its own parameters and buffers at their storage size (quantized weights with their state).
        trainable_bytes: the part of ``param_bytes`` that requires grad.
        grad_bytes: its parameters' gradients at their largest (measured just before each optimizer step and at the
            end of the region).
        optimizer_bytes: optimizer state of its own parameters at the end of the region.
        activation_bytes: what its own forward saved for backward (children excluded), or left alive for backward,
            in the step where that was largest.
        autocast_bytes: the copies of parameters its forward cast down to a narrower float (under
            `torch.autocast`, its weights' bf16/fp16 copies, kept for backward), in the step where they were largest;
            not part of ``activation_bytes``.
        kv_cache_bytes: its layer of the KV cache during generation (an attention module's keys and values, with
            a quantized cache's scales) at its largest; a paged cache's one flat tensor is split evenly over the
            layers. Not part of ``activation_bytes``.
        peak_bytes: the highest live total on the device while it ran (forward, or backward).
        forward_s, backward_s: wall time inside it (children included), summed over the region (`table` shows
            them per step); None where it is not meaningful (CUDA's asynchronous kernels, fake tensors).
        calls: forward calls in the region.
    """

    name: str
    type: str
    params: int = 0
    param_bytes: int = 0
    trainable_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0
    autocast_bytes: int = 0
    kv_cache_bytes: int = 0
    peak_bytes: int = 0
    forward_s: float | None = None
    backward_s: float | None = None
    calls: int = 0


@dataclass
class MemoryReport:
    """What `Tracker.report` returns: the peak of the tracked region, what it was made of, and each layer's share.

    The report covers the whole tracked region (one step or several): ``peak_bytes`` and each layer's
    ``peak_bytes`` are maxima over it, per-step quantities (a layer's activations and gradients) the largest single
    step's, ``steps`` how many forwards of the model it saw.

    Attributes:
        peak_bytes: the highest live bytes on ``device``: `torch.cuda.max_memory_allocated` on CUDA, exact storage
            accounting on CPU and under FakeTensorMode.
        peak_breakdown: bytes by category (`memopt.tracker.CATEGORIES`) at the moment of the peak.
        peak_at: ``{"module": FQN, "phase": "forward" | "backward" | "optimizer"}`` where the peak happened.
        layers: one `LayerMemory` per module that owns parameters or buffers or kept activations, in execution
            order.
        totals: bytes by category at the end of the region.
        timeline: ``(op index, live bytes, phase)`` after each op that allocated, for the plot; in a long region
            thinned to at most 20,000 points, each the highest of the ops it stands for (`Timeline`).
        kv_cache_timeline: ``(op index, KV cache bytes, phase)`` on the same op axis, where a KV cache was seen
            (generation): the cache growing over the decode steps.
    """

    peak_bytes: int
    peak_breakdown: dict[str, int]
    peak_at: dict[str, str]
    layers: list[LayerMemory]
    device: str
    steps: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[int, int, str]] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)
    kv_cache_timeline: list[tuple[int, int, str]] = field(default_factory=list, repr=False)

    def layer(self, name: str) -> LayerMemory:
        """The `LayerMemory` of FQN `name` (KeyError naming the known ones if there is none)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the report; layers: {[l.name for l in self.layers][:20]}")

    def total(self, attribute: str) -> int:
        """Sum of one `LayerMemory` attribute over the layers, e.g. ``total("activation_bytes")``."""
        return sum(getattr(layer, attribute) or 0 for layer in self.layers)

    def rows(self, depth: int | None = None) -> list[LayerMemory]:
        """The layers, or with `depth` the layers folded into their ancestors ``depth`` levels down (sums of
        bytes, max of peaks): ``depth=0`` is the model as one row, ``depth=2`` on a transformers model one row per
        ``model.layers`` and ``model.embed_tokens`` (the block list), ``depth=3`` one per block."""
        if depth is None:
            return list(self.layers)
        if depth < 0:
            raise ValueError(f"depth={depth!r} must be None or >= 0")
        folded: dict[str, LayerMemory] = {}
        for layer in self.layers:
            key = layer.name if layer.name == OUTSIDE else ".".join(layer.name.split(".")[:depth]) if layer.name else ""
            row = folded.get(key)
            if row is None:
                row = folded[key] = LayerMemory(key, layer.type if key == layer.name else "")
            for attr in ("params", "param_bytes", "trainable_bytes", "grad_bytes", "optimizer_bytes",
                         "activation_bytes", "autocast_bytes", "kv_cache_bytes"):
                setattr(row, attr, getattr(row, attr) + getattr(layer, attr))
            row.peak_bytes = max(row.peak_bytes, layer.peak_bytes)
            if key == layer.name:
                row.forward_s, row.backward_s, row.calls = layer.forward_s, layer.backward_s, layer.calls
        return list(folded.values())

    def table(self, depth: int | None = None, units: str = "auto") -> str:
        """The report as text: a header (peak, breakdown, where), then one row per layer (see `rows` for
        `depth`) and a total row. `units`: ``"auto"`` or one of B, KiB, MiB, GiB."""
        def b(n: int) -> str:
            return format_bytes(n, units)

        where = f"{self.peak_at.get('module') or '<root>'} ({self.peak_at.get('phase')})"
        head = [
            f"peak {b(self.peak_bytes)} on {self.device} at {where}, over {self.steps} step(s)",
            "  at the peak: " + ", ".join(f"{k} {b(v)}" for k, v in self.peak_breakdown.items()
                                          if v or k not in _OPTIONAL),
        ]
        head += [f"  note: {n}" for n in self.notes]
        timed = any(layer.forward_s is not None for layer in self.layers)
        steps = max(self.steps, 1)  # forward_s / backward_s are sums over the region: shown per step
        if timed:
            head.append(f"  times: mean per step over {steps} step{'s' if steps != 1 else ''} (wall clock, children "
                        "included)")
        cast = any(layer.autocast_bytes for layer in self.layers)
        kv = any(layer.kv_cache_bytes for layer in self.layers)
        cols = (["layer", "type", "params", "param", "grad", "optim", "activ"] + (["autocast"] if cast else [])
                + (["kv cache"] if kv else []) + ["peak"] + (["fwd ms/step", "bwd ms/step"] if timed else []))
        rows = []
        for r in self.rows(depth):
            row = [r.name or "<root>", r.type, f"{r.params:,}", b(r.param_bytes), b(r.grad_bytes),
                   b(r.optimizer_bytes), b(r.activation_bytes)] + ([b(r.autocast_bytes)] if cast else []) + \
                  ([b(r.kv_cache_bytes)] if kv else []) + \
                  [b(r.peak_bytes)]
            if timed:
                row += ["" if r.forward_s is None else f"{r.forward_s * 1e3 / steps:.1f}",
                        "" if r.backward_s is None else f"{r.backward_s * 1e3 / steps:.1f}"]
            rows.append(row)
        total = ["total", "", f"{self.total('params'):,}", b(self.total("param_bytes")), b(self.total("grad_bytes")),
                 b(self.total("optimizer_bytes")), b(self.total("activation_bytes"))] + \
                ([b(self.total("autocast_bytes"))] if cast else []) + \
                ([b(self.total("kv_cache_bytes"))] if kv else []) + [b(self.peak_bytes)]
        rows.append(total + ([""] * 2 if timed else []))
        widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                 for line in [cols, *rows]]
        return "\n".join(head + [""] + lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints for bytes), JSON-ready; `from_dict` reads it back."""
        d = asdict(self)
        d["timeline"] = [list(p) for p in self.timeline]
        d["kv_cache_timeline"] = [list(p) for p in self.kv_cache_timeline]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryReport":
        d = dict(d)
        d["layers"] = [LayerMemory(**layer) for layer in d["layers"]]
        d["timeline"] = [tuple(p) for p in d.get("timeline", [])]
        d["kv_cache_timeline"] = [tuple(p) for p in d.get("kv_cache_timeline", [])]
        return cls(**d)

    def to_json(self, path: str | None = None) -> str:
        """JSON text of `to_dict`; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_csv(self, path: str | None = None) -> str:
        """One CSV row per layer (bytes as ints); also written to `path` when given."""
        buf = io.StringIO()
        names = [f.name for f in LayerMemory.__dataclass_fields__.values()]
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for layer in self.layers:
            writer.writerow(asdict(layer))
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(buf.getvalue())
        return buf.getvalue()

    def plot(self, path: str, depth: int | None = None, title: str | None = None) -> str:
        """Write a PNG: per-layer stacked bars (params, grads, optimizer, activations) and the memory timeline of
        the region, with the peak marked. Needs matplotlib (``pip install memopt[plot]``). Returns `path`."""
        from .plot import plot_report

        plot_report(self, path, depth=depth, title=title)
        return path


def compare(before: MemoryReport, after: MemoryReport, names: tuple[str, str] = ("before", "after")) -> "Comparison":
    """Two reports side by side (e.g. before and after `memopt.apply`), with per-layer deltas."""
    for r in (before, after):
        if not isinstance(r, MemoryReport):
            raise TypeError(f"memopt.compare expects two MemoryReport objects, got {type(r).__name__}")
    return Comparison(before, after, names)


@dataclass
class Comparison:
    """`memopt.compare`'s result: `str()` prints the table; `ratio` is after's peak over before's."""

    before: MemoryReport
    after: MemoryReport
    names: tuple[str, str] = ("before", "after")

    @property
    def ratio(self) -> float:
        return self.after.peak_bytes / self.before.peak_bytes if self.before.peak_bytes else float("nan")

    def rows(self, depth: int | None = None) -> list[dict[str, Any]]:
        """One dict per layer present in either report: name, and per attribute (param/grad/optimizer/activation/
        peak bytes) ``(before, after, after - before)``; a side where the layer is not in that report is None
        (a layer that only exists after `memopt.apply`, or that the tracker did not see run), and so is the delta."""
        a = {r.name: r for r in self.before.rows(depth)}
        b = {r.name: r for r in self.after.rows(depth)}
        out = []
        for name in list(a) + [n for n in b if n not in a]:
            row: dict[str, Any] = {"name": name}
            for attr in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "autocast_bytes",
                         "peak_bytes"):
                x = getattr(a[name], attr) if name in a else None
                y = getattr(b[name], attr) if name in b else None
                row[attr] = (x, y, None if x is None or y is None else y - x)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "ratio": self.ratio, "before": self.before.to_dict(),
                "after": self.after.to_dict(), "rows": self.rows()}

    def table(self, depth: int | None = None, units: str = "auto") -> str:
        """The comparison as text; ``-`` marks a layer that is not in one of the reports (not ``0 B``, which is a
        measured zero)."""
        def b(n: int | None) -> str:
            return _MISSING if n is None else format_bytes(n, units)

        x, y = self.names
        head = [f"peak: {x} {b(self.before.peak_bytes)} -> {y} {b(self.after.peak_bytes)} ({self.ratio:.2f}x)"]
        for cat in CATEGORIES:
            p, q = self.before.peak_breakdown.get(cat, 0), self.after.peak_breakdown.get(cat, 0)
            if p or q or cat not in _OPTIONAL:
                head.append(f"  at the peak, {cat}: {b(p)} -> {b(q)} ({_signed(q - p, b)})")
        table_rows = self.rows(depth)
        cast = any(r["autocast_bytes"][0] or r["autocast_bytes"][1] for r in table_rows)
        cols = ["layer", f"param {x}", y, f"grad {x}", y, f"activ {x}", y, "delta"] + \
               ([f"autocast {x}", y] if cast else []) + [f"peak {x}", y]
        rows = []
        for r in table_rows:
            pa, gr, ac, ca, pk = (r[k] for k in ("param_bytes", "grad_bytes", "activation_bytes", "autocast_bytes",
                                                 "peak_bytes"))
            rows.append([r["name"] or "<root>", b(pa[0]), b(pa[1]), b(gr[0]), b(gr[1]), b(ac[0]), b(ac[1]),
                         _signed(ac[2], b)] + ([b(ca[0]), b(ca[1])] if cast else []) + [b(pk[0]), b(pk[1])])
        widths = [max(len(str(v)) for v in col) for col in zip(cols, *rows)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                 for line in [cols, *rows]]
        if any(_MISSING in row[1:] for row in rows):
            lines.append(f"({_MISSING}: not in that report)")
        return "\n".join(head + [""] + lines)

    def __str__(self) -> str:
        return self.table()


_MISSING = "-"  # a layer one of the two compared reports does not have


def _signed(n: int | None, fmt) -> str:
    if n is None:
        return _MISSING
    return ("+" if n > 0 else "-" if n < 0 else "") + fmt(abs(n))


