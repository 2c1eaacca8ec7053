"""The optimizer step fused into backward: each parameter is updated as soon as its gradient has been accumulated,
and the gradient is freed right after, so at most a few parameters' gradients exist at once (PyTorch's
`register_post_accumulate_grad_hook` tutorial, torchtune's `optimizer_in_bwd`).

One optimizer of the chosen kind per parameter, stepped from the parameter's post-accumulate-grad hook. The object
`memopt.optimizer(..., in_backward=True)` returns is a `torch.optim.Optimizer` over those per-parameter optimizers:
its `param_groups` are theirs (the same dicts, one group per parameter), so LR schedulers, transformers' `Trainer`
and anything else that sets ``group["lr"]`` reach the optimizers that step; `state` is theirs too (the tracker and
`state_dict` see it); `step()` and `zero_grad()` are kept for the training loop and do no update.

What needs every gradient at once cannot run this way, and fails at the point it is asked for:
- gradient accumulation: a second backward before `step()`/`zero_grad()` raises (the first backward already
  updated the parameters);
- global-norm (or value) gradient clipping: `torch.nn.utils.clip_grad_norm_` / `clip_grad_value_` over parameters
  this optimizer owns raise (their gradients are gone by then; the norm would read 0 and clip nothing). Measuring
  without clipping, ``clip_grad_norm_(params, float("inf"))`` (what transformers' Trainer does to log grad_norm),
  returns the true 2-norm of the last backward's gradients, summed in the hooks as they were applied.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# parameter -> the in-backward optimizer that owns it (weakly: a dropped optimizer releases its parameters)
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class InBackwardOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` whose update runs inside backward, one parameter at a time.

    Args:
        params: the trainable parameters.
        build: ``build([p]) -> torch.optim.Optimizer``: one optimizer per parameter.
        name: the optimizer's name, for messages.

    Memory: gradients exist only between their accumulation and their parameter's update (a few parameters' worth
    instead of the model's); the state is the per-parameter optimizers' (the same bytes as one optimizer over all
    parameters, plus each instance's small bookkeeping: bitsandbytes keeps its two 1 KiB quantization maps per
    instance). Time: one optimizer call per parameter instead of one ``foreach`` call over all of them (on CUDA a
    few kernel launches per parameter; torchao's optimizers compile one kernel per parameter shape at the first
    step).
    """

    def __init__(self, params: list[torch.Tensor], build: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 name: str = "") -> None:
        self.name = name
        # the hooks hold this object: it lives as long as the parameters (or until remove()), kept or not
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = WeakIdKeyDictionary()
        inner = [(p, build([p])) for p in params]
        # torch.optim.Optimizer's machinery (step hooks, profiling, LR schedulers' isinstance check), then the
        # per-parameter optimizers' groups and state in place of its own
        super().__init__([p for p, _ in inner], {})
        self.param_groups = [group for _, opt in inner for group in opt.param_groups]
        self.state = _state_view(inner)
        self._order = [p for p, _ in inner]
        self._updated: set[int] = set()  # ids of the parameters updated since the last step()/zero_grad()
        self._norm_sq: Any = None  # sum of the squared gradients of the current backward
        self._handles = []
        for p, opt in inner:
            self.optimizers[p] = opt
            _OWNERS[p] = self
            self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(_hook, self)))
        _guard_clipping()

    # -- the update, from the hook ---------------------------------------------------------------------------
    def _update(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if id(p) in self._updated:
            self._updated.clear()  # the loop can recover after fixing its schedule
            p.grad = None
            raise RuntimeError(
                f"memopt.optimizer(..., in_backward=True) ({self.name}) already updated this parameter in an earlier "
                "backward: with the optimizer step in backward every backward is an optimizer step, so gradient "
                "accumulation (several backward passes per step) cannot work. Call optimizer.step() (it does no "
                "update) after each backward, and get a larger batch from checkpointing instead of accumulation "
                "(memopt.apply(model, checkpoint=True)), or use memopt.optimizer(..., in_backward=False)"
            )
        if not self._updated:  # the first gradient of this backward
            self._norm_sq = None
        self._updated.add(id(p))
        self._add_to_norm(p.grad)
        opt = self.optimizers[p]
        opt.step()
        p.grad = None  # what this mode is for: the gradient dies with its update

    def _add_to_norm(self, grad: torch.Tensor) -> None:
        """The gradients' global 2-norm, summed as they go (no sync): what clip_grad_norm_(..., inf) reports."""
        if type(grad) is not torch.Tensor:  # DTensor shards (FSDP2): a local sum is not the global norm
            self._norm_sq = float("nan")
            return
        sq = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()  # no fp32 copy of a half grad
        self._norm_sq = sq if self._norm_sq is None else self._norm_sq + sq

    def grad_norm(self) -> torch.Tensor:
        """The global 2-norm of the gradients of the last backward (nan where unknown: none yet, FSDP2 shards)."""
        if self._norm_sq is None or isinstance(self._norm_sq, float):
            return torch.tensor(float("nan"))
        return self._norm_sq.sqrt()

    # -- what a training loop calls ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """No update: the parameters were updated during backward. With a closure, runs it (its backward updates)
        and returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._updated.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Harmless: the gradients are freed by the updates already; any left (a backward interrupted) are
        dropped."""
        self._updated.clear()
        for p in self._order:
            p.grad = None

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A `torch.optim.Optimizer` state dict with one param group per parameter (index i is the i-th trainable
        parameter, in `model.parameters()` order)."""
        state, groups = {}, []
        for i, p in enumerate(self._order):
            sd = self.optimizers[p].state_dict()
            if sd["state"].get(0):  # parameters never updated have no state yet
                state[i] = sd["state"][0]
            (group,) = sd["param_groups"]
            groups.append({**group, "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self._order) or any(len(g["params"]) != 1 for g in groups):
            raise ValueError(
                f"load_state_dict: this in-backward optimizer has {len(self._order)} parameters, one group each; the "
                f"state dict has {len(groups)} group(s) of sizes {[len(g['params']) for g in groups][:8]}. Load a state "
                "dict saved by memopt.optimizer(..., in_backward=True) on the same model"
            )
        for p, group in zip(self._order, groups):
            (index,) = group["params"]
            state = state_dict["state"]
            sd = {"state": {0: state[index]} if index in state else {}, "param_groups": [{**group, "params": [0]}]}
            self.optimizers[p].load_state_dict(sd)
        # load_state_dict replaces each optimizer's groups and state: point at the new ones
        inner = [(p, self.optimizers[p]) for p in self._order]
        self.param_groups[:] = [group for _, opt in inner for group in opt.param_groups]
        self.state = _state_view(inner)

    def remove(self) -> None:
        """Take the hooks off: from now on backward leaves gradients in `.grad` and this object does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self._order:
            if _OWNERS.get(p) is self:
                del _OWNERS[p]

    def __repr__(self) -> str:
        return f"InBackwardOptimizer({self.name}, {len(self._order)} parameters)"


def _state_view(inner: list[tuple[torch.Tensor, torch.optim.Optimizer]]) -> dict:
    """``optimizer.state``: parameter -> the per-parameter optimizer's state dict for it (the same dict object,
    created empty here and filled in place at the parameter's first update)."""
    return {p: opt.state[p] for p, opt in inner}


def _hook(opt: InBackwardOptimizer, p: torch.Tensor) -> None:
    opt._update(p)


# -- gradient clipping: refused for parameters whose gradients this mode frees -------------------------------------
_CLIP_NAMES = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_")


def _owned(parameters: Any) -> tuple[list, "InBackwardOptimizer | None"]:
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    owner = next((_OWNERS.get(p) for p in params if isinstance(p, torch.Tensor) and _OWNERS.get(p) is not None),
                 None)
    return params, owner


def _guarded(fn: Callable, what: str) -> Callable:
    @functools.wraps(fn)
    def clip(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        params, owner = _owned(parameters)
        max_norm = args[0] if args else kwargs.get("max_norm", kwargs.get("clip_value"))
        norm_type = args[1] if len(args) > 1 else kwargs.get("norm_type", 2.0)
        if owner is not None and what != "clip_grad_value_" and max_norm == float("inf") and float(norm_type) == 2.0:
            # measuring, not clipping (transformers' Trainer logs grad_norm so): the norm summed during backward
            return owner.grad_norm()
        if owner is not None:
            raise RuntimeError(
                f"torch.nn.utils.{what} over parameters that memopt.optimizer(..., in_backward=True) ({owner.name}) "
                "updates during backward: their gradients are freed as soon as they are applied, so no global norm "
                "exists to clip by (it would read 0 and clip nothing). Drop the clipping (transformers' Trainer: "
                "TrainingArguments(max_grad_norm=0)), or use memopt.optimizer(..., in_backward=False) to clip"
            )
        return fn(params, *args, **kwargs)

    clip.__memopt_guard__ = fn
    return clip


def _guard_clipping() -> None:
    """Route torch.nn.utils' clipping functions through a check (once per process). Calls over parameters no
    in-backward optimizer owns go straight to PyTorch's functions."""
    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    for module in (utils, clip_grad):
        for name in _CLIP_NAMES:
            fn = getattr(module, name, None)
            if fn is not None and not hasattr(fn, "__memopt_guard__"):
                setattr(module, name, _guarded(fn, name))


def owner_of(p: torch.Tensor) -> "InBackwardOptimizer | None":
    """The in-backward optimizer that updates `p`, if any."""
    return _OWNERS.get(p)


def params_of(opt: Any) -> Iterable[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]
