"""`MemoryReport.plot`: per-layer stacked bars and the step's memory timeline, in one PNG (matplotlib, Agg)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import MemoryReport

_COLOURS = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
            "autocast": "#8172b3", "kv_cache": "#937860", "other": "#8c8c8c"}
_PHASE_COLOURS = {"forward": "#e8f0fb", "backward": "#fbeee8", "optimizer": "#eaf6ec"}


def _mib(n: int) -> float:
    return n / 2**20


def plot_report(report: "MemoryReport", path: str, depth: int | None = None, title: str | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("MemoryReport.plot needs matplotlib: pip install 'memopt[plot]' (or matplotlib)") from exc

    rows = report.rows(depth if depth is not None else _default_depth(report))
    fig, (bars, line) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(rows) + 3), 8),
                                     gridspec_kw={"height_ratios": [3, 2]})
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for label, attr in (("params", "param_bytes"), ("grads", "grad_bytes"), ("optimizer", "optimizer_bytes"),
                        ("activations", "activation_bytes"), ("autocast", "autocast_bytes"),
                        ("kv_cache", "kv_cache_bytes")):
        values = [_mib(getattr(r, attr)) for r in rows]
        if label in ("autocast", "kv_cache") and not any(values):
            continue  # none in this run: no empty legend entry
        bars.bar(x, values, bottom=bottom, color=_COLOURS[label], label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    bars.set_xticks(list(x), [r.name or "<root>" for r in rows], rotation=60, ha="right", fontsize=7)
    bars.set_ylabel("MiB")
    bars.legend(fontsize=8)
    bars.set_title(title or f"peak {_mib(report.peak_bytes):.1f} MiB on {report.device} "
                            f"({report.peak_at.get('module') or '<root>'}, {report.peak_at.get('phase')})")

    if report.timeline:
        ops = [p[0] for p in report.timeline]
        live = [_mib(p[1]) for p in report.timeline]
        start = 0
        for i in range(1, len(report.timeline) + 1):  # shade each phase
            if i == len(report.timeline) or report.timeline[i][2] != report.timeline[start][2]:
                phase = report.timeline[start][2]
                line.axvspan(ops[start], ops[i - 1], color=_PHASE_COLOURS.get(phase, "white"), lw=0)
                start = i
        line.plot(ops, live, color="black", lw=1)
        if report.kv_cache_timeline:  # generation: the cache growing over the decode steps
            kv_ops = [p[0] for p in report.kv_cache_timeline]
            kv = [_mib(p[1]) for p in report.kv_cache_timeline]
            line.fill_between(kv_ops, kv, step="post", color=_COLOURS["kv_cache"], alpha=0.6, lw=0, label="KV cache")
        top = max(range(len(live)), key=live.__getitem__)
        line.annotate(f"peak {live[top]:.1f} MiB", (ops[top], live[top]), fontsize=8,
                      xytext=(5, -12), textcoords="offset points")
        for phase, colour in _PHASE_COLOURS.items():
            line.bar(0, 0, color=colour, label=phase)
        line.legend(fontsize=8, loc="lower right")
    line.set_xlabel("op")
    line.set_ylabel("live MiB (tracked storages)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _default_depth(report: "MemoryReport") -> int | None:
    """Few enough bars to read: the deepest level with at most 40 rows."""
    for depth in range(8, -1, -1):
        if len(report.rows(depth)) <= 40:
            return depth
    return 0
