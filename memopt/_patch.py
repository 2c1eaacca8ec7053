"""Instance-level `forward` patches: how memopt changes what a module does without a wrapper module.

A patch replaces `module.forward` on the instance only, so FQNs, `state_dict` keys, the class and the module's own
hooks stay as they were (hooks run once, outside the patch, as with transformers' `GradientCheckpointingLayer`).
Patches chain: each keeps the forward it replaced (`inner`), so checkpointing can wrap an attention patch on the same
module, and either can be removed without disturbing the other. Patches are small objects rather than closures so
that `copy.deepcopy` rebinds them to the copy and `torch.save(model)` can pickle them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn


class ForwardPatch:
    """Base class: subclasses implement `__call__` and reach the original forward through `call_inner`.

    `rank` orders a chain whatever order the patches were installed in: higher ranks sit outside lower ones.
    Checkpointing ranks highest, so its recompute replays every other patch exactly as the forward ran them.
    """

    rank = 0

    def __init__(self, module: nn.Module, inner: Callable | None):
        self.module = module
        self.inner = inner  # the instance-level forward this patch replaced, or None for the class's forward

    def inner_forward(self) -> Callable:
        # a partial rather than a bound method: torch.compile (Dynamo) traces partials, not types.MethodType
        return self.inner if self.inner is not None else functools.partial(type(self.module).forward, self.module)

    def call_inner(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.inner_forward())


P = TypeVar("P", bound=ForwardPatch)


def _slot(module: nn.Module) -> str:
    """Where the chain starts. accelerate's hooks (device_map, offloading) replace `forward` with their own wrapper
    and call the previous one as `_old_forward`: memopt's patches live there, inside the hook, so the hook runs once
    and moves inputs before checkpointing sees them, whichever of the two came first."""
    if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def install(module: nn.Module, patch_cls: type[P], **state: Any) -> P:
    """Put a `patch_cls` patch into the module's forward chain, outside every patch of lower or equal rank and
    inside every patch of higher rank; returns it."""
    chain = _chain(module)
    outer = [p for p in chain if p.rank > patch_cls.rank]
    inner = outer[-1].inner if outer else module.__dict__.get(_slot(module))
    patch = patch_cls(module, inner, **state)
    if outer:
        outer[-1].inner = patch
    else:
        setattr(module, _slot(module), patch)
    return patch


def _chain(module: nn.Module) -> list[ForwardPatch]:
    chain, link = [], module.__dict__.get(_slot(module))
    while isinstance(link, ForwardPatch):
        chain.append(link)
        link = link.inner
    return chain


def find(module: nn.Module, patch_cls: type[P]) -> P | None:
    """The module's patch of this class, if it has one."""
    return next((p for p in _chain(module) if isinstance(p, patch_cls)), None)


def uninstall(module: nn.Module, patch_cls: type[ForwardPatch]) -> bool:
    """Remove the module's patches of this class from its chain, keeping the others; True if one was there."""
    chain = _chain(module)
    if not any(isinstance(p, patch_cls) for p in chain):
        return False
    kept = [p for p in chain if not isinstance(p, patch_cls)]
    tail = chain[-1].inner  # whatever forward was there before any memopt patch
    for patch, nxt in zip(kept, kept[1:] + [None]):
        patch.inner = nxt if nxt is not None else tail
    slot = _slot(module)
    if kept:
        setattr(module, slot, kept[0])
    elif tail is not None:
        setattr(module, slot, tail)
    elif slot == "forward":
        module.__dict__.pop("forward", None)
    else:  # accelerate's hook calls _old_forward: give it the class's forward back
        setattr(module, slot, types.MethodType(type(module).forward, module))
    return True


# ----------------------------------------------------------------------------------------------------------------
# Ambient contexts: what a patch keeps active around the modules it runs, replayed by checkpointing's recompute.

_AMBIENT: list[Callable[[], Any]] = []  # context factories of the patches running now, outermost first


class ambient:
    """``with ambient(factory):`` while a patch's forward runs: a block checkpointed inside it is recomputed in
    backward, outside that forward, so checkpointing enters ``factory()`` around the recompute (the hand-written
    attention watch of a module that contains checkpointed blocks). Eager only: under torch.compile the graph
    already holds what the context did."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory

    def __enter__(self) -> None:
        _AMBIENT.append(self.factory)

    def __exit__(self, *exc: Any) -> None:
        _AMBIENT.pop()


def replaying_ambient(fn: Callable) -> Callable:
    """`fn`, entering the ambient contexts active now whenever it runs again during backward (a recompute)."""
    factories = tuple(_AMBIENT)
    if not factories:
        return fn

    def run(*args: Any, **kwargs: Any) -> Any:
        if torch._C._current_graph_task_id() == -1:  # the forward itself: the contexts are active already
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for factory in factories:
                stack.enter_context(factory())
            return fn(*args, **kwargs)

    return run
