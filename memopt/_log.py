"""Warn-once and the package logger: memopt says what it did, never prints."""

from __future__ import annotations

import logging
import warnings

logger = logging.getLogger("memopt")

_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 2) -> None:
    """`warnings.warn` the first time `key` is seen in this process (stacklevel counted from the caller)."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
