"""`memopt.estimate` and `memopt.plan`: will it fit? Answered before renting the GPU, without allocating.

The estimate runs the real training step (forward, backward, optimizer step, with the optimizer state already there)
of the real model under `FakeTensorMode`: every op computes shapes and dtypes, none touches memory. The model goes
through the same `memopt.apply` and the same tracker as a measured run, so `Estimate.report` is a `MemoryReport` like
a measured one. Fake tensors live on the CPU device whatever `device=` says (PyTorch cannot run CUDA fake tensors
without a CUDA build); ``device="cuda"`` counts each storage as the CUDA caching allocator does (512-byte blocks) and
steps AdamW the way it runs on CUDA (``foreach``).

Where the real thing cannot run on fake tensors, the estimate stands in for it and says so in `Estimate.notes`:
bitsandbytes' quantized parameters are tensor subclasses fake tensors cannot wrap, so each layer memopt would quantize
becomes a stand-in holding exactly bitsandbytes' storage (packed weight, absmax, nested statistics and code tables
for 4-bit; int8 weight and row scales for 8-bit) whose matmul dequantizes to a temporary as bitsandbytes does; the
8-bit optimizers' state is sized from bitsandbytes' layout (1 byte per value and one float32 absmax per 256 for
tensors of at least 4096 elements, float32 below) and added to a step without optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .._units import format_bytes, parse_bytes
from ..tracker import CATEGORIES, MemoryReport, track
from .fake_step import (_adapters_stay_put, _call, _fake_like_meta, _fake_quantize, _hf_batch, adamw8bit_state_bytes,
                        build_model, load_config, step_loss)
from .kv_cache import kv_cache_bytes

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
MODES = ("train", "generate")
DEVICES = ("cuda", "cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, ``"float32"``/``"fp32"`` -> the torch dtype."""
    key = str(name).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; use 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[key]


@dataclass
class Estimate:
    """What `memopt.estimate` returns. Bytes are ints.

    Attributes:
        peak_bytes: the predicted peak of tensor memory on one device (one rank with ``world_size > 1``); the CUDA
            context (~0.5 GiB) and allocator fragmentation come on top.
        breakdown: bytes per category (`memopt.tracker.CATEGORIES`) at that peak.
        report: the `MemoryReport` of the fake step (one device, before any FSDP sharding is applied).
        options: the `memopt.apply` keyword arguments it ran with; ``optimizer`` the optimizer name.
        kv_cache_bytes, weights_bytes: for ``mode="generate"``: 2 x layers x kv_heads x head_dim x seq x batch x
            bytes (GQA/MQA models with their own number of KV heads), and the weights.
        per_sequence_bytes: for ``mode="generate"``: one sequence's KV cache (see `max_concurrent_sequences`).
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

    def fits(self, budget: Any) -> bool:
        """Whether the peak fits `budget` (bytes, or a string such as ``"24GiB"``)."""
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
            f"({self.mode}, {self.device}, {self.dtype}, batch {self.batch_size} x seq {self.seq_len}"
            f"{f', world size {self.world_size}' if self.world_size > 1 else ''})",
            f"  memopt.apply({opts}), optimizer {self.optimizer!r}",
        ]
        lines += [f"  {cat:<12}{format_bytes(self.breakdown.get(cat, 0)):>12}" for cat in CATEGORIES]
        if self.mode == "generate":
            lines.append(f"  weights {format_bytes(self.weights_bytes)}, KV cache {format_bytes(self.kv_cache_bytes or 0)}"
                         f", {format_bytes(self.per_sequence_bytes or 0)} per concurrent sequence")
        lines += [f"  note: {n}" for n in self.notes]
        if self.report is not None and self.mode == "train" and self.world_size == 1:
            lines += ["", self.report.table(depth=self.table_depth)]
        return "\n".join(lines)


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _block_depth(model: nn.Module) -> int | None:
    from .._modules import find_blocks

    try:
        blocks, _ = find_blocks(model)
    except ValueError:
        return None
    return blocks[0][0].count(".") + 1 if blocks else None


def _is_offload(checkpoint: Any) -> bool:
    return checkpoint == "offload" or bool(getattr(checkpoint, "offload", False))


def _fsdp(report: MemoryReport, model: nn.Module, world_size: int) -> tuple[int, dict[str, int], list[str]]:
    """Per-rank memory under FSDP2 (`fully_shard` per block and on the root) from the one-device step: parameters,
    gradients and optimizer state divided by `world_size`; the root's own parameters (embeddings, head) gathered for
    the whole step; in forward a block gathered plus the next one prefetched, in backward also the block's unsharded
    gradients before their reduce-scatter."""
    from .._modules import find_blocks

    blocks, _ = find_blocks(model)
    block_names = [n for n, _ in blocks]

    def param_bytes(prefix_filter: Callable[[str], bool]) -> int:
        return sum(layer.param_bytes for layer in report.layers if prefix_filter(layer.name))

    in_block = lambda name: any(name == b or name.startswith(b + ".") for b in block_names)  # noqa: E731
    per_block = max((param_bytes(lambda n, b=b: n == b or n.startswith(b + ".")) for b in block_names), default=0)
    root = param_bytes(lambda n: not in_block(n))
    phase = report.peak_at.get("phase")
    gathered = {"forward": 2 * per_block, "backward": 3 * per_block}.get(phase, 0)
    shard = 1 - 1 / world_size
    out = dict(report.peak_breakdown)
    for cat in ("params", "grads", "optimizer"):
        out[cat] = int(out[cat] / world_size)
    out["params"] += int(root * shard) if phase != "optimizer" else 0
    out["other"] += gathered
    notes = [f"FSDP2 model: parameters, gradients and optimizer state / {world_size}; root parameters "
             f"({format_bytes(root)}) gathered for the step; {format_bytes(gathered)} of gathered block parameters "
             f"and gradients at the peak ({phase}); communication buffers not counted"]
    return sum(out.values()), out, notes


def estimate(
    model: Any,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    inputs: Callable[[], Any] | None = None,
    optimizer: str = "adamw",
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
    kv_heads: Any = None,
) -> Estimate:
    """Predict the peak memory of a training step (or of generation) without allocating it.

    Args:
        model: a transformers `PretrainedConfig`, a path to a local ``config.json`` (or its folder), or a
            zero-argument callable that builds an `nn.Module` (then `inputs` builds the batch).
        batch_size, seq_len: per device; with a config the batch is random token ids (labels = inputs).
        inputs: for a callable `model`: a zero-argument callable returning the batch (a dict of kwargs, a tuple of
            args or one tensor). The loss is the output's ``.loss``, a scalar output, or a stand-in on the first
            output.
        optimizer: ``"adamw"``, ``"adamw8bit"``, ``"paged_adamw8bit"`` (state in CUDA unified memory: not counted on
            the device) or ``"sgd"`` (no state).
        dtype: the parameters' dtype (``torch.bfloat16`` or ``"bfloat16"``); default the config's, else float32.
        device: ``"cuda"`` (512-byte allocation blocks, foreach AdamW) or ``"cpu"``.
        world_size: FSDP2 ranks; the estimate is per rank (see notes for the model of sharding used).
        mode: ``"train"`` (a steady-state step: forward, backward, optimizer step with its state present) or
            ``"generate"`` (weights, the KV cache of ``seq_len`` tokens for ``batch_size`` sequences, the prefill).
        checkpoint, attention, quant, lora, loss, blocks: as `memopt.apply` (``loss="chunked"``: the head and loss
            chunk by chunk, the logits never whole).
        kv_heads: as `memopt.apply`: the model converted to this many key/value heads first (smaller key/value
            projections; with ``mode="generate"`` the KV cache is sized from the converted config).

    Cost: two fake steps (a warm-up that creates the optimizer state, and the tracked one); seconds for small
    models, ~15 s for a 7B config on 2 CPU cores, a few hundred MB of RAM.

    Raises:
        FileNotFoundError: the config path does not exist. ValueError: an option has an unknown value.
    """
    started = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .. import apply as memopt_apply
    from ..config import quant_config

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use 'train' or 'generate'")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use 'cuda' or 'cpu'")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    qconfig = quant_config(quant)
    notes: list[str] = []
    config = None
    if callable(model) and not isinstance(model, (str, Path)) and not hasattr(model, "to_dict"):
        builder, config = model, None
        if inputs is None:
            raise ValueError("estimate(model=<callable>) needs inputs=<callable returning the batch>")
    else:
        config = load_config(model)
        builder = None
    if config is not None and dtype is None:
        dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = dtype_from_name(dtype)

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        if builder is not None:
            net = builder()
            if not isinstance(net, nn.Module):
                raise TypeError(f"estimate(model=<callable>) must build an nn.Module, got {type(net).__name__}")
            if dtype is not None:
                net = net.to(dtype)
        else:
            net = build_model(config, "meta", dtype)  # no init, no memory: fake tensors replace these
            _fake_like_meta(net)
        if kv_heads is not None and kv_heads is not False:  # first, as in memopt.apply: before the quantization stand-ins
            memopt_apply(net, kv_heads=kv_heads, attention=None)
        if qconfig is not None:
            done, skipped = _fake_quantize(net, qconfig)
            notes.append(f"quant={qconfig.name!r}: {done} layers stood in by bitsandbytes' exact storage layout "
                         f"({skipped} skipped, as memopt.apply would); matmuls dequantize to a temporary")
        options = {k: v for k, v in dict(checkpoint=checkpoint, attention=attention, lora=lora, loss=loss,
                                         blocks=blocks).items()
                   if v not in (None, False) or k == "attention"}
        with _adapters_stay_put(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*offload.*CPU-only model.*")  # fake tensors live on CPU
            memopt_apply(net, **options)
        if qconfig is not None:
            options = {"quant": quant, **options}
        if kv_heads is not None and kv_heads is not False:
            options = {"kv_heads": kv_heads, **options}
        batch_fn = inputs if inputs is not None else lambda: _hf_batch(net, batch_size, seq_len, mode)
        dev_name = "cuda" if device == "cuda" else "cpu"
        round_to = 512 if device == "cuda" else None

        if mode == "generate":
            net.eval()
            batch = batch_fn()
            with torch.no_grad():
                with track(net, round_to=round_to) as tracker:
                    try:  # generate() computes the prefill's logits for the last position only
                        _call(net, {**batch, "logits_to_keep": 1} if isinstance(batch, dict) else batch)
                    except TypeError:
                        _call(net, batch)
            report = tracker.report()
            weights = report.total("param_bytes")
            kv = (kv_cache_bytes(getattr(net, "config", config), batch_size, seq_len, dtype or torch.float32)
                  if config is not None else None)  # the converted config with kv_heads=
            per_seq = max(1, (kv if kv is not None else report.peak_bytes - weights) // batch_size)
            report.device = f"{device} (estimate)"
            return Estimate(report.peak_bytes, dict(report.peak_breakdown), report, options, "none", dev_name,
                            str(dtype).replace("torch.", ""), batch_size, seq_len, world_size, mode, weights, kv,
                            per_seq, time.perf_counter() - started, notes, _block_depth(net))

        net.train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameter: nothing to estimate a training step for")
        if optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, foreach=device == "cuda")
        else:  # the 8-bit state is added from bitsandbytes' layout below; the step itself is in-place
            opt = torch.optim.SGD(trainable, lr=1e-3)

        def step() -> None:
            batch = batch_fn()
            step_loss(_call(net, batch)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: optimizer state exists in the tracked step, as in every step after the first
        with track(net, opt, round_to=round_to) as tracker:
            step()
        report = tracker.report()

    if world_size > 1:
        peak, breakdown, fsdp_notes = _fsdp(report, net, world_size)
        notes += fsdp_notes
    else:
        peak, breakdown = report.peak_bytes, dict(report.peak_breakdown)
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        state = adamw8bit_state_bytes(trainable)
        if optimizer == "adamw8bit":
            peak += state // world_size  # sharded like the rest of the optimizer state
            breakdown["optimizer"] += state // world_size
            notes.append(f"adamw8bit state sized from bitsandbytes' layout: {format_bytes(state)}")
        else:
            notes.append(f"paged_adamw8bit state ({format_bytes(state)}) lives in CUDA unified memory, paged to the "
                         "host under pressure: not counted on the device")
    if _is_offload(checkpoint) and report.peak_at.get("phase") != "optimizer":
        from .._modules import find_blocks

        names = [n for n, _ in find_blocks(net)[0]]
        kept = sum(r.activation_bytes for r in report.rows() if r.name in names)
        peak -= kept
        breakdown["activations"] -= kept
        notes.append(f"checkpoint offload: the blocks' kept inputs ({format_bytes(kept)}) counted in host memory, "
                     "not on the device (the fake step ran them as full checkpointing)")
    if device == "cuda":
        notes.append("CUDA: storages counted in 512-byte allocator blocks; the CUDA context (~0.5 GiB) and "
                     "fragmentation come on top")
    report.device = f"{device} (estimate)"
    return Estimate(peak, breakdown, report, options, optimizer, device, str(dtype or torch.float32).replace("torch.", ""),
                    batch_size, seq_len, world_size, mode, report.total("param_bytes"), None, None,
                    time.perf_counter() - started, notes, _block_depth(net))
