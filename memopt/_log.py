"""Warn-once and the package logger: memopt says what it did, never prints."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch.nn.modules.module as module_py

logger = logging.getLogger("memopt")

_warned: set[str] = set()
# Frames that are not the user's: memopt itself and the nn.Module call machinery between a forward and its caller.
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(module_py.__file__)))


def warn_once(key: str, message: str, stacklevel: int | None = None) -> None:
    """`warnings.warn` the first time `key` is seen in this process. The warning points at `stacklevel` frames
    above the caller, or by default at the first frame outside memopt and torch.nn's call machinery: the user's
    line, however deep inside memopt it was raised."""
    if key in _warned:
        return
    _warned.add(key)
    if stacklevel is None:
        stacklevel = _user_level()
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def _user_level() -> int:
    """`stacklevel` (counted from `warn_once`'s caller) of the first frame outside memopt and torch.nn.modules."""
    frame, level = sys._getframe(2), 1  # the caller of warn_once is level 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
