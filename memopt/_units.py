"""Bytes are ints inside memopt; units appear only here, at the edge."""

from __future__ import annotations

import math
import re
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | float, units: str = "auto") -> str:
    """`format_bytes(3 * 2**20) == "3.00 MiB"`; `units` forces one of B, KiB, MiB, GiB, TiB."""
    if units != "auto":
        if units not in _UNITS:
            raise ValueError(f"units={units!r} is not supported; use 'auto' or one of {_UNITS}")
        scaled = n / 1024 ** _UNITS.index(units)
        return f"{n} B" if units == "B" else f"{scaled:.2f} {units}"
    value, unit = float(n), "B"
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    return f"{int(n)} B" if unit == "B" else f"{value:.2f} {unit}"


def parse_bytes(value: Any, name: str = "budget") -> int:
    """``"24GiB"``, ``"80GB"``, ``"512 MiB"``, ``1.5e9`` or an int -> bytes (GiB/MiB/KiB powers of 1024, GB/MB/KB
    of 1000)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size; use e.g. '24GiB', '80GB' or an int number of bytes")
    if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
        return int(value)
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value)) if isinstance(value, str) else None
    if m is None or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise ValueError(f"{name}={value!r} is not a size; use e.g. '24GiB', '80GB' or an int number of bytes")
    return int(float(m.group(1)) * units[m.group(2).lower()])
