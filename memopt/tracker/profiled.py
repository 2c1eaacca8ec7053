"""`profiled_peak`: the peak of a step from the PyTorch profiler's allocation events, for what `memopt.track` cannot
see: a step that torch.compile runs (the tracker's dispatch mode makes torch.compile run the eager code), frozen
or quantized parameters reallocated behind the dispatcher. No per-layer detail; CPU or CUDA allocations."""

from __future__ import annotations

from typing import Callable



def profiled_peak(fn: Callable[[], object], device: str = "cpu") -> int:
    """The highest bytes allocated on `device` ("cpu" or "cuda") above the starting point while `fn()` runs, from
    the profiler's allocation events (each op's own net allocation at its start, and "[memory]" events for what was
    freed or allocated outside any op, in time order). Costs the profiler's overhead for one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    own = "self_cpu_memory_usage" if device == "cpu" else "self_device_memory_usage"
    total = "cpu_memory_usage" if device == "cpu" else "device_memory_usage"
    deltas = []
    for e in prof.events():
        if e.name == "[memory]":
            deltas.append((e.time_range.start, getattr(e, total, 0)))
        elif getattr(e, own, 0):
            deltas.append((e.time_range.start, getattr(e, own)))
    live = peak = 0
    for _, delta in sorted(deltas, key=lambda d: d[0]):
        live += delta
        peak = max(peak, live)
    return int(peak)
