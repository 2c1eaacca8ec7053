"""Hooks that observers read: a technique says what it is doing here, and never imports an observer.

The tracker (`memopt.track`) listens; the techniques (`memopt.transforms`) only call these functions, which cost
nothing when no observer is listening.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch.nn as nn

_LISTENERS: list[Any] = []  # objects with enter_scope(module) / exit_scope(module): the running trackers


def listen(listener: Any) -> None:
    """Start telling `listener` about scopes (`listener.enter_scope(module)`, `listener.exit_scope(module)`)."""
    _LISTENERS.append(listener)


def unlisten(listener: Any) -> None:
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


@contextlib.contextmanager
def counted_as(module: nn.Module) -> Iterator[None]:
    """What runs inside is `module`'s own work: for code that does a module's job without calling it (the chunked
    loss computes the output head's matmuls itself). Each listener decides whether `module` is one it watches."""
    listeners = list(_LISTENERS)
    for listener in listeners:
        listener.enter_scope(module)
    try:
        yield
    finally:
        for listener in reversed(listeners):
            listener.exit_scope(module)
