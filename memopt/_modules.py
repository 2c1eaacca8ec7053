"""Finding things in a model by FQN: the repeated blocks, and modules named by a user's `blocks=`."""

from __future__ import annotations

import fnmatch
import sys
from collections import Counter
from typing import Any, Iterable

import torch.nn as nn

# Containers are never blocks themselves: a stack of stacks is searched one level down.
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
# Containers whose forward never runs (their owner calls the modules inside): never a block, found or named.
_NO_FORWARD = (nn.ModuleList, nn.ModuleDict)

def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None

def outermost(named: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop every module that sits inside another one of the list (checkpointing inside a checkpoint buys nothing)."""
    kept: list[tuple[str, nn.Module]] = []
    for name, module in named:
        if any(is_inside(name, outer) for outer, _ in kept):
            continue
        kept.append((name, module))
    return kept

def is_inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")

def transformers_class(name: str) -> type | None:
    """A transformers class, only if transformers is already imported: a model of its classes cannot exist otherwise,
    so plain PyTorch users never pay transformers' import time."""
    if "transformers" not in sys.modules:
        return None
    import transformers

    if name == "GradientCheckpointingLayer":
        from transformers import modeling_layers

        return getattr(modeling_layers, name, None)  # absent before transformers 4.52
    return getattr(transformers, name, None)


def hf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers transformers itself would checkpoint (`GradientCheckpointingLayer` subclasses), if any."""
    layer_cls = transformers_class("GradientCheckpointingLayer")
    if layer_cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, layer_cls)]

def _repeated_children(model: nn.Module, containers: bool = False, least: int = 2) -> list[tuple[str, nn.Module]]:
    """Children of a ModuleList/Sequential whose class occurs at least twice there and that hold parameters in
    submodules of their own (so a Sequential(Linear, ReLU, Linear) is not a stack of two "blocks"). Containers
    among them count only with `containers=True` (a stack of nn.Sequential blocks with nothing repeated inside)."""
    found = []
    for name, container in model.named_modules():
        if not isinstance(container, nn.ModuleList if least < 2 else (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.named_children())
        counts = Counter(type(c) for _, c in children)
        for child_name, child in children:
            if counts[type(child)] < least or isinstance(child, _CONTAINERS) != containers:
                continue
            if isinstance(child, _NO_FORWARD):
                continue  # UNet/timm stages: ModuleLists whose layers the model calls one by one
            if next(child.children(), None) is None or not _has_params(child):
                continue
            found.append((f"{name}.{child_name}" if name else child_name, child))
    return found

def find_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """The model's repeated layers, outermost first, in registration order, and how they were found.

    transformers models: the `GradientCheckpointingLayer` instances (the decoder/encoder layers of every stack).
    Anything else: the children of an `nn.ModuleList`/`nn.Sequential` that repeat a class there, outermost ones only
    (a Mixtral-style expert list inside a decoder layer is not picked; the decoder layers are), searching through
    nested containers; failing that, a run of `nn.Sequential` blocks (``Sequential(*[Sequential(Linear, ReLU)] * n)``);
    failing that, the layers of a one-element ModuleList (ALBERT applies its one shared layer at every depth).
    """
    hf = outermost(hf_layers(model))
    if hf:
        return hf, "transformers GradientCheckpointingLayer"
    found = outermost(_repeated_children(model))
    if found:
        return found, "repeated modules in a ModuleList/Sequential"
    found = outermost(_repeated_children(model, containers=True))
    if found:
        return found, "repeated nn.Sequential blocks"
    # Last: a layer kept in a ModuleList on its own, as ALBERT keeps the one layer it applies at every depth.
    return outermost(_repeated_children(model, least=1)), "a ModuleList's layer (weights shared across depth)"

def _as_list(spec: Any) -> list:
    if isinstance(spec, (list, tuple, set, frozenset)):
        return list(spec)
    return [spec]

def select_modules(model: nn.Module, spec: Any, what: str) -> list[tuple[str, nn.Module]]:
    """Modules named by a user's spec: FQN strings (exact, or glob patterns), classes, or a predicate fn(name, module).

    Raises ValueError when an explicit item matched nothing, naming it and what the model has instead.
    """
    items = _as_list(spec)
    if not items:
        raise ValueError(f"{what}={spec!r} names no module; name the blocks ({_suggest(model)}) or leave {what}= "
                         "out to find them automatically")
    named = list(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for item in items:
        if isinstance(item, str):
            hits = [(n, m) for n, m in named if n == item or (_is_glob(item) and fnmatch.fnmatchcase(n, item))]
        elif isinstance(item, type) and issubclass(item, nn.Module):
            hits = [(n, m) for n, m in named if isinstance(m, item)]
        elif callable(item):
            hits = [(n, m) for n, m in named if item(n, m)]
        else:
            raise TypeError(
                f"{what}={item!r} is not supported; give FQN strings (glob patterns allowed), nn.Module classes "
                "or a predicate fn(name, module) -> bool"
            )
        if not hits:
            raise ValueError(f"{what}={_describe(item)} matched no module; {_suggest(model)}")
        chosen.update(hits)
    for name, module in chosen.items():
        if isinstance(module, _NO_FORWARD):
            raise ValueError(
                f"{what}= matched {name or '<root>'!r}, an {type(module).__name__} whose forward never runs (its owner "
                f"calls the modules inside one by one): checkpointing it would do nothing. Name its layers instead: "
                f"{what}=['{name + '.' if name else ''}*']"
            )
    order = {n: i for i, (n, _) in enumerate(named)}
    return outermost(sorted(chosen.items(), key=lambda nm: order[nm[0]]))

def _is_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")

def _describe(item: Any) -> str:
    if isinstance(item, type):
        return item.__name__
    if isinstance(item, str):
        return repr(item)
    return getattr(item, "__name__", repr(item))

def _suggest(model: nn.Module) -> str:
    """A short hint listing the model's top-level structure and a `blocks=` that names modules it has."""
    lines = []
    for name, child in model.named_children():
        sub = [n for n, _ in child.named_children()][:4]
        more = ", ..." if len(list(child.named_children())) > 4 else ""
        inner = f" (children: {', '.join(sub)}{more})" if sub else ""
        lines.append(f"{name}: {type(child).__name__}{inner}")
    shown = "; ".join(lines[:8]) or f"{type(model).__name__} has no submodules"
    return (f"the model's top-level modules are: {shown}. Name the blocks with {_example(model)}, blocks=MyBlockClass, "
            "or blocks=lambda name, module: ...")


def _example(model: nn.Module) -> str:
    """``blocks=[...]`` naming real modules: the layers with parameters of the model's first stack (an nn.ModuleList
    or nn.Sequential, the model itself included) holding two or more, else a glob over a nested stack's children."""
    glob = None
    for name, stack in model.named_modules():
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) < 2:
            continue
        prefix = f"{name}." if name else ""
        layers = [f"{prefix}{n}" for n, m in stack.named_children() if _has_params(m) and not isinstance(m, _NO_FORWARD)]
        if len(layers) >= 2:
            return "blocks=[" + ", ".join(repr(n) for n in layers[:3]) + (", ...]" if len(layers) > 3 else "]")
        if name and glob is None:
            glob = f"blocks=['{prefix}*']"
    return glob or "blocks=['<fqn>', ...] (FQNs from model.named_modules())"


def no_blocks_message(model: nn.Module) -> str:
    return (
        f"found no repeated blocks in {type(model).__name__} (no transformers GradientCheckpointingLayer, no "
        "nn.ModuleList/nn.Sequential holding two or more blocks of one class, a block being a module with layers of "
        "its own: a Sequential(Linear, ReLU, Linear) holds layers, not blocks); " + _suggest(model)
    )

_TASK_HEADS = ("classifier", "score", "qa_outputs")  # transformers' task heads (sequence/token classification, QA)


def task_head_names(model: nn.Module) -> set[str]:
    """FQNs of the Linear layers of a transformers task head (`classifier`, `score`, `qa_outputs`, or Linear layers
    inside one, as RoBERTa's classification head): new, untrained layers with few outputs."""
    if transformers_class("PreTrainedModel") is None or not isinstance(model, transformers_class("PreTrainedModel")):
        return set()
    names = set()
    for n, m in model.named_modules():
        if n.split(".")[-1] in _TASK_HEADS:
            names |= {f"{n}.{c}" if c else n for c, sub in m.named_modules() if isinstance(sub, nn.Linear)}
    return names


def head_names(model: nn.Module) -> set[str]:
    """FQNs of the output head: `lm_head`, what a transformers model reports as its output embedding, and the Linear
    layers of a transformers task head (`task_head_names`)."""
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"} | task_head_names(model)
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
        names |= {n for n, m in model.named_modules() if head is not None and m is head}
    return names


def shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def mha_projections(model: nn.Module) -> set[str]:
    """FQNs of nn.MultiheadAttention's children: it reads their weights directly, never calling their forward."""
    return {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }


def uncompiled(model: nn.Module) -> nn.Module:
    """The module `torch.compile(module)` wrapped (its `OptimizedModule` holds it as `_orig_mod`), or `model`.
    memopt changes that module in place; the compiled wrapper traces it again at its next call (Dynamo's guards on
    the module's attributes see the change)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return uncompiled(inner)
    return model


def compiled_parts(model: nn.Module) -> list[str]:
    """FQNs of the modules of `model` that torch.compile runs: `module.compile()` (in place) or an OptimizedModule
    wrapper in the tree; `""` when `model` itself is one."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None:
            found.append(name)
    return found


def get_submodule(model: nn.Module, fqn: str) -> nn.Module:
    return model if fqn == "" else model.get_submodule(fqn)
