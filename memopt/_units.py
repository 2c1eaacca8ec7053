"""Bytes are ints inside memopt; units appear only here, at the edge."""

from __future__ import annotations

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
