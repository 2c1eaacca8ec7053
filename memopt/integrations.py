"""Hugging Face `Trainer` integration: the memory report in the training logs.

    from memopt.integrations import MemoryCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[MemoryCallback()])

Importing this module imports transformers; ``import memopt`` does not.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback

from .tracker import CATEGORIES, MemoryReport, Tracker, track

_MIB = 2**20


class MemoryCallback(TrainerCallback):
    """Tracks the whole training run with `memopt.track` and puts memory in the logs.

    At every log (each ``logging_steps``) it adds ``memory/peak_MiB`` (the peak since the previous log) and
    ``memory/<category>_MiB`` at that peak (params, grads, optimizer, activations, other) to the logged values,
    so the progress bar, ``trainer.state.log_history`` and the reporting integrations listed after it see them. At
    the end of training it writes the report of the whole run to ``<output_dir>/memory_report.json`` and
    ``memory_report.txt`` (and ``memory.png`` with ``plot=True``); `report` holds it.

    Args:
        output_dir: where the report goes; default the Trainer's ``output_dir``.
        plot: also write ``memory.png`` (needs matplotlib).
        depth: the ``depth`` of the text report's table (None = every layer).

    Cost: the tracker's (a Python call per ATen op: 4-5% of a CPU step of the bench transformer), on every step of the run.
    """

    def __init__(self, output_dir: str | None = None, plot: bool = False, depth: int | None = None) -> None:
        self.output_dir = output_dir
        self.plot = plot
        self.depth = depth
        self.tracker: Tracker | None = None
        self.report: MemoryReport | None = None
        self._run_peak = 0
        self._run_breakdown: dict[str, int] = {}
        self._run_peak_at: dict[str, str] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        if model is None:
            raise ValueError("MemoryCallback needs the model: the Trainer passes it to callbacks as model=...")
        self.tracker = track(model, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        if self.tracker is None or logs is None:
            return
        values = self._interval()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer stored a copy of `logs` before calling us

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.tracker is None:
            return
        self._interval()
        report = self.tracker.report()
        self.tracker.remove()
        self.tracker = None
        report.peak_bytes, report.peak_breakdown, report.peak_at = (
            self._run_peak, self._run_breakdown, self._run_peak_at)
        report.notes.append("peak over the whole run")
        self.report = report
        if not state.is_world_process_zero:
            return
        out = self.output_dir or args.output_dir
        os.makedirs(out, exist_ok=True)
        report.to_json(os.path.join(out, "memory_report.json"))
        with open(os.path.join(out, "memory_report.txt"), "w") as f:
            f.write(report.table(depth=self.depth) + "\n")
        if self.plot:
            report.plot(os.path.join(out, "memory.png"))

    def _interval(self) -> dict[str, float]:
        """The logged values for the interval since the last log; starts the next interval."""
        report = self.tracker.report()
        if report.peak_bytes >= self._run_peak:
            self._run_peak, self._run_breakdown, self._run_peak_at = (
                report.peak_bytes, dict(report.peak_breakdown), dict(report.peak_at))
        values = {"memory/peak_MiB": round(report.peak_bytes / _MIB, 2)}
        for cat in CATEGORIES:
            values[f"memory/{cat}_MiB"] = round(report.peak_breakdown.get(cat, 0) / _MIB, 2)
        self.tracker.reset_peak()
        return values

    def __repr__(self) -> str:
        return f"MemoryCallback(output_dir={self.output_dir!r}, plot={self.plot})"


def read_report(path: str) -> MemoryReport:
    """A report written by `MemoryCallback` (or `MemoryReport.to_json`) read back."""
    with open(path) as f:
        return MemoryReport.from_dict(json.load(f))
