"""`memopt.track`: where a training step's memory goes, per layer.

    tracking.py   the machinery: a dispatch mode counting storages, module and optimizer hooks (`Tracker`, `track`)
    report.py     what it returns, as data and its display (`MemoryReport`, `LayerMemory`, `compare`)
    plot.py       `MemoryReport.plot`
    profiled.py   `profiled_peak`: a step's peak from profiler events (compiled steps)
"""

from .profiled import profiled_peak
from .report import CATEGORIES, OUTSIDE, PHASES, Comparison, LayerMemory, MemoryReport, compare
from .tracking import Tracker, sum_storage_bytes, track

__all__ = ["CATEGORIES", "OUTSIDE", "PHASES", "Comparison", "LayerMemory", "MemoryReport", "Tracker", "compare",
           "profiled_peak", "sum_storage_bytes", "track"]
