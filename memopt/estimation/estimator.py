"""`memopt.estimate`: will it fit? Answered before renting the GPU, without allocating.

The estimate runs the real training step (forward, backward, optimizer step, with the optimizer state already there)
of the real model under `FakeTensorMode`: every op computes shapes and dtypes, none touches memory. The model goes
through the same `memopt.apply` and the same tracker as a measured run, so `Estimate.report` is a `MemoryReport` like
a measured one. Fake tensors live on the CPU device whatever `device=` says (PyTorch cannot run CUDA fake tensors
without a CUDA build); ``device="cuda"`` counts each storage as the CUDA caching allocator does (512-byte blocks) and
steps AdamW the way it runs on CUDA (``foreach``).

The precision is what users name (`memopt.precision`): "bf16-mixed" builds float32 parameters and runs the forward
and the loss under `torch.autocast` (CPU autocast: fake tensors are CPU tensors), so autocast's bf16 weight copies
are counted where it keeps them (category ``autocast`` of the report).

Where the real thing cannot run on fake tensors, the estimate stands in for it and says so in `Estimate.notes`:
bitsandbytes' quantized parameters are tensor subclasses fake tensors cannot wrap, so each layer memopt would quantize
becomes a stand-in holding exactly bitsandbytes' storage (packed weight, absmax, nested statistics and code tables
for 4-bit; int8 weight and row scales for 8-bit) whose matmul dequantizes to a temporary as bitsandbytes does; the
8-bit optimizers' state is sized from bitsandbytes' layout (`optimizers.OPTIMIZERS`) and added to a step whose update
works in place; the GradScaler of "16-mixed" is a stand-in of its tensors (`fake_step.FakeGradScaler`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .._units import format_bytes, parse_bytes
from ..precision import dtype_from_name, dtype_name, resolve_precision
from ..tracker import CATEGORIES, MemoryReport, track
from .optimizers import OPTIMIZERS, OptimizerSpec, device_state_bytes, optimizer_spec
from .profile import DEVICES, MODES, Job, block_names, fake_model, make_job, train_step, warm_optimizer

__all__ = ["DEVICES", "MODES", "OPTIMIZERS", "Estimate", "dtype_from_name", "estimate", "finish", "not_counted"]


@dataclass
class Estimate:
    """What `memopt.estimate` returns. Bytes are ints.

    Attributes:
        peak_bytes: the predicted peak of tensor memory on one device (one rank with ``world_size > 1``); what it
            does not count is in ``not_counted`` (the CUDA context, allocator fragmentation, ...).
        breakdown: bytes per category (`memopt.tracker.CATEGORIES`) at that peak.
        report: the `MemoryReport` of the fake step (one device, before any FSDP sharding is applied).
        options: the `memopt.apply` keyword arguments it ran with; ``optimizer`` the optimizer name and
            ``precision`` the precision's name (``dtype`` the parameters' dtype).
        kv_cache_bytes, weights_bytes: for ``mode="generate"``: 2 x layers x kv_heads x head_dim x seq x batch x
            bytes (GQA/MQA models with their own number of KV heads), and the weights.
        per_sequence_bytes: for ``mode="generate"``: one sequence's KV cache (see `max_concurrent_sequences`).
        assumed: the precision and optimizer it assumed, in words (printed first).
        not_counted: what the peak leaves out.
        notes: every place the estimate stood in for something it could not run.
    """

    peak_bytes: int
    breakdown: dict[str, int]
    report: MemoryReport | None
    options: dict[str, Any]
    optimizer: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    world_size: int = 1
    mode: str = "train"
    weights_bytes: int = 0
    kv_cache_bytes: int | None = None
    per_sequence_bytes: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    table_depth: int | None = None  # the depth of the blocks, for the printed table
    precision: str = "32-true"
    assumed: list[str] = field(default_factory=list)
    not_counted: list[str] = field(default_factory=list)
    in_backward: bool = False  # the optimizer step in backward (memopt.optimizer(..., in_backward=True))
    cpu_offload: bool = False  # the optimizer state in host memory (memopt.optimizer(..., cpu_offload=True))

    def fits(self, budget: Any) -> bool:
        """Whether the peak fits `budget` (bytes, or a string such as ``"24GiB"``). No headroom: `memopt.plan`
        keeps some (``headroom=``)."""
        return self.peak_bytes <= parse_bytes(budget)

    def max_concurrent_sequences(self, budget: Any) -> int:
        """``mode="generate"``: how many sequences of ``seq_len`` fit `budget` at once: the weights, the working
        memory of one sequence's prefill (this estimate's prefill working memory / batch size), then one KV cache
        (`per_sequence_bytes`) per sequence."""
        if self.per_sequence_bytes is None:
            raise ValueError("max_concurrent_sequences needs an estimate made with mode='generate'")
        working = self.peak_bytes - self.weights_bytes - self.per_sequence_bytes * self.batch_size
        free = parse_bytes(budget) - self.weights_bytes - max(0, working) // self.batch_size
        return max(0, free // self.per_sequence_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["report"] = None if self.report is None else self.report.to_dict()
        d["options"] = {k: _plain(v) for k, v in self.options.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "nothing"
        lines = [
            f"estimated peak: {format_bytes(self.peak_bytes)} per {'rank' if self.world_size > 1 else 'device'} "
            f"({self.mode}, {self.device}, batch {self.batch_size} x seq {self.seq_len}"
            f"{f', world size {self.world_size}' if self.world_size > 1 else ''})",
        ]
        lines += [f"  {a}" for a in self.assumed]
        lines.append(f"  memopt.apply({opts})")
        lines += [f"  {cat:<12}{format_bytes(self.breakdown.get(cat, 0)):>12}" for cat in CATEGORIES]
        if self.mode == "generate":
            lines.append(f"  weights {format_bytes(self.weights_bytes)}, KV cache {format_bytes(self.kv_cache_bytes or 0)}"
                         f", {format_bytes(self.per_sequence_bytes or 0)} per concurrent sequence")
        if self.not_counted:
            lines.append("  not counted: " + "; ".join(self.not_counted))
        lines += [f"  note: {n}" for n in self.notes]
        if self.report is not None and self.mode == "train" and self.world_size == 1:
            lines += ["", self.report.table(depth=self.table_depth)]
        return "\n".join(lines)


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _block_depth(model: nn.Module) -> int | None:
    blocks = block_names(model)
    return blocks[0].count(".") + 1 if blocks else None


def _is_offload(checkpoint: Any) -> bool:
    return checkpoint == "offload" or bool(getattr(checkpoint, "offload", False))


def not_counted(device: str, world_size: int = 1, offload: bool = False, optimizer: str = "adamw",
                cpu_offload: bool = False, activations_offloaded: bool = False) -> list[str]:
    """What an estimate's peak leaves out, for printing."""
    out = []
    if device == "cuda":
        out += ["the CUDA context (~0.5 GiB)", "the caching allocator's fragmentation and reserved-but-free blocks "
                "(typically 5-15%)", "cuBLAS/cuDNN workspaces"]
    else:
        out.append("the process's own memory (interpreter, libraries)")
    if world_size > 1:
        out.append("FSDP2's communication buffers")
    if offload:
        out.append("the host memory of the offloaded block inputs")
    if activations_offloaded:
        out.append("the pinned host memory of the offloaded activations")
    if not OPTIMIZERS[optimizer].on_device:
        out.append("the optimizer state in host/unified memory")
    if cpu_offload:
        out.append("the optimizer state, the gradients' host copies and the update in host memory (cpu_offload)")
    return out


def _fsdp(breakdown: dict[str, int], phase: str, block_param_bytes: int, root_param_bytes: int,
          world_size: int) -> tuple[int, dict[str, int], list[str]]:
    """Per-rank memory under FSDP2 (`fully_shard` per block and on the root) from the one-device step: parameters,
    gradients and optimizer state divided by `world_size`; the root's own parameters (embeddings, head) gathered for
    the whole step; in forward a block gathered plus the next one prefetched, in backward also the block's unsharded
    gradients before their reduce-scatter."""
    gathered = {"forward": 2 * block_param_bytes, "backward": 3 * block_param_bytes}.get(phase, 0)
    shard = 1 - 1 / world_size
    out = dict(breakdown)
    for cat in ("params", "grads", "optimizer"):
        out[cat] = int(out[cat] / world_size)
    out["params"] += int(root_param_bytes * shard) if phase != "optimizer" else 0
    out["other"] += gathered
    notes = [f"FSDP2 model: parameters, gradients and optimizer state / {world_size}; root parameters "
             f"({format_bytes(root_param_bytes)}) gathered for the step; {format_bytes(gathered)} of gathered block "
             f"parameters and gradients at the peak ({phase}); communication buffers not counted"]
    return sum(out.values()), out, notes


def finish(peak: int, breakdown: dict[str, int], phase: str, *, job: Job, optimizer: str, added_state: int,
           offload: bool, block_param_bytes: int, root_param_bytes: int,
           kept_block_bytes: int, in_backward: bool = False,
           cpu_offload: bool = False) -> tuple[int, dict[str, int], list[str]]:
    """From one device's step to what `estimate` reports: FSDP2's sharding, offloaded block inputs. `added_state`:
    the optimizer state that was added to `breakdown` from the layout (not run), for the note."""
    notes = []
    breakdown = dict(breakdown)
    if in_backward:
        notes.append(f"in_backward: each parameter updated by its own {optimizer} as soon as its gradient is "
                     "accumulated, and the gradient freed: no step after backward holding every gradient "
                     f"({format_bytes(breakdown.get('grads', 0))} of gradients at the peak)")
    if job.world_size > 1:
        peak, breakdown, fsdp_notes = _fsdp(breakdown, phase, block_param_bytes, root_param_bytes, job.world_size)
        notes += fsdp_notes
    spec = OPTIMIZERS[optimizer]
    if cpu_offload:
        notes.append(f"cpu_offload: {optimizer}'s state and update in host memory (torchao's CPUOffloadOptimizer); on "
                     f"the device only the state of parameters under 4096 values ({format_bytes(added_state)})"
                     + ("; with in_backward each gradient leaves the device as it is computed" if in_backward else
                        "; every gradient on the device until step() copies it to the host"))
    elif spec.torch_optimizer is None:
        if spec.on_device:
            notes.append(f"{optimizer} state sized from its layout (memopt.optim.OPTIMIZERS[{optimizer!r}]): "
                         f"{format_bytes(added_state)}; its step updates in place")
        else:
            notes.append(f"{optimizer} state ({format_bytes(added_state)}) lives in CUDA unified memory, paged to the "
                         "host under pressure: not counted on the device")
    if offload and phase != "optimizer":
        peak -= kept_block_bytes
        breakdown["activations"] -= kept_block_bytes
        notes.append(f"checkpoint offload: the blocks' kept inputs ({format_bytes(kept_block_bytes)}) counted in host "
                     "memory, not on the device (the fake step ran them as full checkpointing)")
    if job.device == "cuda":
        notes.append("CUDA: storages counted in 512-byte allocator blocks")
        if job.precision.mixed:
            notes.append("CUDA autocast: the fake step runs CPU autocast's op lists (fake tensors are CPU tensors); "
                         "for transformer blocks they cast the same ops (matmuls, SDPA) to "
                         f"{dtype_name(job.precision.compute_dtype)}, but CUDA's float32 list (softmax, exp, norms "
                         "and losses of half inputs) can add float32 copies not counted here")
    return peak, breakdown, notes


def assumptions(job: Job, optimizer: str, in_backward: bool = False, cpu_offload: bool = False) -> list[str]:
    p = job.precision
    how = [w for w, on in (("step in backward", in_backward), ("state in host memory", cpu_offload)) if on]
    return [f"precision {p.name!r} (from {job.precision_from}): {p.summary}",
            f"optimizer {optimizer!r}{' (' + ', '.join(how) + ')' if how else ''}: {OPTIMIZERS[optimizer].summary}"]


class _InPlace(torch.optim.Optimizer):
    """The stand-in for an optimizer that cannot run on fake tensors (bitsandbytes' kernels, torchao's compiled
    step, an update on the host): its state is the layout's tensors (`memopt.optim.OPTIMIZERS`), created at once,
    and its step updates in place (``p -= lr * grad``), allocating nothing, as their fused kernels do."""

    def __init__(self, params: list, layout: Callable[[Any], list], shared: list) -> None:
        super().__init__(params, {"lr": 1e-3})
        for p in params:
            self.state[p].update({f"state{i}": torch.empty(shape, dtype=dtype)
                                  for i, (shape, dtype) in enumerate(layout(p))})
        if shared and params:  # per optimizer instance (bitsandbytes' quantization maps)
            self.state[params[0]].update({f"shared{i}": torch.empty(shape, dtype=dtype)
                                          for i, (shape, dtype) in enumerate(shared)})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def fake_optimizer(spec: OptimizerSpec, params: list, device: str, in_backward: bool = False,
                   cpu_offload: bool = False) -> tuple[torch.optim.Optimizer, bool]:
    """The optimizer of the fake step, its state already there (as in every step after the first): the torch
    optimizer itself where it runs on fake tensors, else `_InPlace` holding the layout's state; with `in_backward`
    one of them per parameter, stepped from backward (`memopt.optim.InBackwardOptimizer`); with `cpu_offload` the
    state of the parameters torchao's CPUOffloadOptimizer keeps on the device (under 4096 values) only. Returns
    (optimizer, whether it is the real one)."""
    from .optimizers import CPU_OFFLOAD_MIN_SIZE

    real = spec.torch_optimizer is not None and not cpu_offload  # cpu_offload: the update runs on the host
    skip = len(spec.shared)

    def layout(p: Any) -> list:
        if cpu_offload and p.numel() >= CPU_OFFLOAD_MIN_SIZE:
            return []
        return list(spec.state([p]))[skip:] if spec.on_device else []

    def make(ps: list) -> torch.optim.Optimizer:
        if real:
            return spec.torch_optimizer(ps, device)
        kept = spec.on_device and any(layout(p) or not cpu_offload for p in ps)
        return _InPlace(ps, layout, spec.shared if kept else [])

    if not in_backward:
        opt = make(params)
        if real:
            warm_optimizer(opt, params, spec)
        return opt, real
    from ..optim.in_backward import InBackwardOptimizer

    opt = InBackwardOptimizer(params, make, name=spec.name)
    if real:
        for p, inner in list(opt.optimizers.items()):
            warm_optimizer(inner, [p], spec)
    return opt, real


def estimate(
    model: Any,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    inputs: Any = None,
    loss_fn: Any = None,
    optimizer: str = "adamw",
    precision: Any = None,
    dtype: Any = None,
    device: str = "cuda",
    world_size: int = 1,
    mode: str = "train",
    checkpoint: Any = False,
    attention: Any = "sdpa",
    quant: Any = None,
    lora: Any = None,
    loss: Any = None,
    blocks: Any = None,
    in_backward: bool = False,
    cpu_offload: bool = False,
    offload: Any = None,
    # mode="generate" only (memopt/estimation/generate.py):
    kv_cache: Any = None,
    new_tokens: int | None = None,
    requests: Any = None,
    max_concurrent_sequences: int | None = None,
    kv_heads: Any = None,
) -> Estimate:
    """Predict the peak memory of a training step (or of generation) without allocating it.

    Args:
        model: a transformers `PretrainedConfig`, a path to a local config JSON file (any name) or a folder holding
            a ``config.json``, or a zero-argument callable that builds an `nn.Module` (then `inputs` builds the batch).
        batch_size, seq_len: per device; with a config the batch is random token ids (labels = inputs).
        inputs: for a callable `model`: a zero-argument callable returning the batch (a dict of kwargs, a tuple of
            args or one tensor).
        loss_fn: ``loss_fn(model, batch) -> loss``: the step's loss as your loop computes it. Default: the loss the
            model returns (``.loss``, a ``"loss"`` entry, a scalar output, the scalar of a ``(logits, loss)`` tuple),
            else a stand-in on its first output (said in the notes).
        optimizer: a name in `memopt.optim.OPTIMIZERS` (the registry `memopt.optimizer` builds from; its layouts
            size the state): ``"adamw"`` (torch AdamW: 8 bytes of state per float32 parameter), ``"adamw8bit"`` (~2
            bytes), ``"adamw4bit"`` (torchao, ~1.06 bytes), ``"adafactor"`` (torch, ~0.03 bytes: factored second
            moment), ``"paged_adamw8bit"`` (state in CUDA unified memory: not counted on the device; CUDA only) or
            ``"sgd"`` (no state).
        in_backward: the step of `memopt.optimizer(..., in_backward=True)`: each parameter updated as soon as its
            gradient is accumulated and the gradient freed, so gradients live a few at a time and there is no step
            after backward holding all of them (the peak loses up to the trainable parameters' size).
        cpu_offload: `memopt.optimizer(..., cpu_offload=True)` (CUDA only): the state and the update in host memory
            (only parameters under 4096 values keep theirs on the device); with `in_backward` the gradients leave the
            device as they are computed.
        offload: as `memopt.apply` (``True`` or an `OffloadConfig`): with ``device="cuda"`` the tensors saved for
            backward outside checkpointed blocks are counted in host memory (the device keeps the copies in flight
            and the ones brought back); with ``device="cpu"`` it does nothing (said in the notes), as in
            `memopt.apply`.
        precision: ``"32-true"``, ``"bf16-mixed"`` (float32 weights, gradients and optimizer state, bf16 autocast:
            16 bytes per trainable parameter with AdamW plus autocast's bf16 weight copies), ``"16-mixed"`` (the same
            in fp16, with a GradScaler), ``"bf16-true"`` (everything bf16: 8 bytes per parameter with AdamW) or
            ``"16-true"``. See `memopt.precision`.
        dtype: the parameters' dtype. Alone it means its "-true" precision (``"bfloat16"``: "bf16-true"); with
            `precision` it must be that precision's parameter dtype (else ValueError naming both). Neither: the
            config's ``torch_dtype`` (a builder's: its parameters' dtype) as "-true", else "32-true".
        device: ``"cuda"`` (512-byte allocation blocks, foreach AdamW) or ``"cpu"``.
        world_size: FSDP2 ranks; the estimate is per rank (see notes for the model of sharding used).
        mode: ``"train"`` (a steady-state step: forward, backward, optimizer step with its state present) or
            ``"generate"`` (weights, the KV cache of ``seq_len`` tokens for ``batch_size`` sequences, the prefill).
        checkpoint, attention, quant, lora, loss, blocks: as `memopt.apply` (``loss="chunked"``: the head and loss
            chunk by chunk, the logits never whole).
        kv_cache: ``mode="generate"``: ``"dynamic"`` (default), ``"static"``, ``"fp8"``, ``"int4"``, ``"int2"``,
            ``"paged"``, ``"offloaded"`` or a `memopt.KVCacheConfig` (group size, residual window, page size).
        new_tokens: ``mode="generate"``: tokens generated per sequence (of ``seq_len``; default 1: a prompt of
            ``seq_len - 1`` tokens, the largest prefill).
        requests: ``mode="generate"``: ``[(prompt tokens, new tokens), ...]`` instead of one ``seq_len`` (paged:
            the blocks they use; other caches: a batch padded to the longest).
        max_concurrent_sequences: ``mode="generate"``: sequences in memory at once (default ``batch_size``, or
            every request).
        kv_heads: as `memopt.apply`: the model converted to this many key/value heads (GQA/MQA) first (smaller
            key/value projections; with ``mode="generate"`` the KV cache is sized from the converted config).

    Cost: one fake step (the optimizer's state is created by a step of the optimizer alone, without a forward):
    seconds for small models, ~5-10 s for a 7-8B config on 2 CPU cores, a few hundred MB of RAM.

    Raises:
        FileNotFoundError: the config path does not exist. ValueError: an option has an unknown value, or dtype and
        precision disagree.
    """
    if mode == "generate":  # generation, its KV cache: memopt/estimation/generate.py
        from .generate import estimate_generate

        if precision is not None:  # generation keeps no master weights: the parameters' dtype is the precision
            p, _ = resolve_precision(precision, dtype)
            if p.mixed:
                raise ValueError(f"precision={p.name!r} with mode='generate': mixed precision's float32 master "
                                 f"weights are for training; generation runs in one dtype: use "
                                 f"precision={p.name.replace('-mixed', '-true')!r}")
            dtype = p.param_dtype
        return estimate_generate(model, batch_size=batch_size, seq_len=seq_len, inputs=inputs, dtype=dtype,
                                 device=device, attention=attention, quant=quant, lora=lora, kv_cache=kv_cache,
                                 new_tokens=new_tokens, requests=requests,
                                 max_concurrent_sequences=max_concurrent_sequences, kv_heads=kv_heads)
    if any(v is not None for v in (kv_cache, new_tokens, requests, max_concurrent_sequences)):
        raise ValueError("kv_cache=, new_tokens=, requests=, max_concurrent_sequences= are for mode='generate'")
    started = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..config import quant_config

    spec = optimizer_spec(optimizer)
    for flag, value in (("in_backward", in_backward), ("cpu_offload", cpu_offload)):
        if not isinstance(value, bool):
            raise TypeError(f"estimate({flag}={value!r}) must be True or False")
    if cpu_offload and device != "cuda":
        raise ValueError("estimate(cpu_offload=True) moves the optimizer state from a CUDA device to host memory; with "
                         "device='cpu' the state is in host memory already: drop cpu_offload=True (or use "
                         "device='cuda')")
    if cpu_offload and spec.cuda_only:
        raise ValueError(f"cpu_offload=True with optimizer={optimizer!r}: it already pages its state to the host; use "
                         "'adamw8bit' or 'adamw' with cpu_offload=True")
    job = make_job(model, batch_size=batch_size, seq_len=seq_len, inputs=inputs, loss_fn=loss_fn,
                   precision=precision, dtype=dtype, device=device, world_size=world_size, mode=mode)
    if spec.cuda_only and device != "cuda" and mode == "train":
        raise ValueError(f"optimizer={optimizer!r} needs CUDA (its state lives in CUDA unified memory); with "
                         "device='cpu' use 'adamw8bit'")
    quant_config(quant)  # a bad value raises before anything is built
    options = {k: v for k, v in dict(kv_heads=kv_heads, quant=quant, checkpoint=checkpoint, attention=attention,
                                     lora=lora, loss=loss, blocks=blocks, offload=offload).items()
               if v not in (None, False) or k == "attention"}

    with FakeTensorMode(allow_non_fake_inputs=True):
        net, notes = fake_model(job, options)
        net.train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameter: nothing to estimate a training step for")
        # the state exists in the tracked step, as in every step after the first; where the real optimizer cannot
        # run on fake tensors it is added from the layout below, and the step itself updates in place
        opt, real = fake_optimizer(spec, trainable, device, in_backward, cpu_offload)
        with track(net, opt, round_to=job.round_to) as tracker:
            train_step(net, job, opt, notes)
        report = tracker.report()
        if in_backward:
            opt.remove()
        # the layout's state is in the stand-in's `state`, counted by the tracker: `added` only says how much
        added = 0 if real else device_state_bytes(spec, trainable, job.round_to or 1, in_backward, cpu_offload)
        blocks_ = block_names(net)
        depth = _block_depth(net)

    peak, breakdown, phase = report.peak_bytes, dict(report.peak_breakdown), report.peak_at.get("phase", "")
    if in_backward and phase == "optimizer":  # an update in backward
        phase = "backward"
    block_params = [sum(layer.param_bytes for layer in report.layers
                        if layer.name == b or layer.name.startswith(b + ".")) for b in blocks_]
    kept = sum(r.activation_bytes for r in report.rows() if r.name in set(blocks_))
    ckpt_offload = _is_offload(checkpoint)
    peak, breakdown, more = finish(
        peak, breakdown, phase, job=job, optimizer=optimizer,
        added_state=added, offload=ckpt_offload, block_param_bytes=max(block_params, default=0),
        root_param_bytes=report.total("param_bytes") - sum(block_params), kept_block_bytes=kept,
        in_backward=in_backward, cpu_offload=cpu_offload)
    notes += more
    report.device = f"{device} (estimate)"
    return Estimate(peak, breakdown, report, options, optimizer, device, dtype_name(job.precision.param_dtype),
                    batch_size, seq_len, world_size, mode, report.total("param_bytes"), None, None,
                    time.perf_counter() - started, notes, depth, job.precision.name,
                    assumptions(job, optimizer, in_backward, cpu_offload),
                    not_counted(device, world_size, ckpt_offload, optimizer, cpu_offload,
                                device == "cuda" and offload not in (None, False)),
                    in_backward, cpu_offload)
