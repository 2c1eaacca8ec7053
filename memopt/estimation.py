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

import contextlib
import dataclasses
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._units import format_bytes
from .tracker import CATEGORIES, MemoryReport, track

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
MODES = ("train", "generate")
DEVICES = ("cuda", "cpu")
_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 state
_8BIT_BLOCK = 256


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
    from ._modules import find_blocks

    try:
        blocks, _ = find_blocks(model)
    except ValueError:
        return None
    return blocks[0][0].count(".") + 1 if blocks else None


# -- building the model on fake tensors ------------------------------------------------------------------------------
def load_config(model: Any):
    """A transformers config from a `PretrainedConfig` (as is) or a local config.json / its folder (no download)."""
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return model
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {model}")
    folder = path.parent if path.is_file() else path
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read a transformers config from {model}: {exc}") from None


def build_model(config, device: Any = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The model `config` describes (causal LM, else seq2seq, else the bare model), on `device`; eager attention
    unless the config names one (`memopt.apply` switches it). The config is copied: apply() changes its settings."""
    import transformers

    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device(device):
        for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel):
            try:
                return cls.from_config(config, **kwargs)
            except ValueError:
                continue
    raise ValueError(f"no transformers model class builds from {type(config).__name__}")


def _fake_like_meta(model: nn.Module) -> None:
    """Replace meta parameters and buffers by fake CPU tensors of the same shapes and dtypes (ties kept)."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


# -- stand-ins for bitsandbytes -------------------------------------------------------------------------------------
class _DequantMatmul(torch.autograd.Function):
    """bitsandbytes' matmul memory pattern: dequantize to a temporary, matmul, dequantize again in backward. For
    backward MatMul4Bit keeps only the packed weight; the 8-bit ones (MatMul8bitLt on CUDA, MatMul8bitFp on CPU)
    also keep their input, as a plain attribute of ctx: activation checkpointing cannot drop it."""

    @staticmethod
    def forward(ctx, x, packed, out_features, in_features, keep_input):
        w = torch.empty(out_features, in_features, dtype=x.dtype)  # (out, in) dequantized, freed after the matmul
        ctx.save_for_backward(packed)
        ctx.x = x if keep_input else None
        ctx.shape = (out_features, in_features)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        w = torch.empty(*ctx.shape, dtype=grad.dtype)
        return grad @ w, None, None, None, None


class _FakeQuantLinear(nn.Linear):
    """A frozen Linear holding exactly the storage bitsandbytes would (see `quantized_layout`)."""

    def __init__(self, old: nn.Linear, bits: int, double_quant: bool, blocksize: int, transposed: bool) -> None:
        nn.Module.__init__(self)
        out_f, in_f = old.weight.shape[::-1] if transposed else old.weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.bits = bits
        t = {name: torch.empty(shape, dtype=dtype)
             for name, (shape, dtype) in quantized_layout(out_f, in_f, bits, double_quant, blocksize).items()}
        self.weight = nn.Parameter(t.pop("weight"), requires_grad=False)
        # where bitsandbytes keeps them (Params4bit.quant_state, Int8Params.SCB), so the tracker counts them alike
        if bits == 8:
            self.weight.SCB = t["SCB"]
        else:
            nested = SimpleNamespace(absmax=t["absmax2"], code=t["code2"]) if "absmax2" in t else None
            self.weight.quant_state = SimpleNamespace(absmax=t["absmax"], code=t["code"], state2=nested,
                                                      offset=t.get("offset"), shape=torch.Size((out_f, in_f)))
        self.bias = None if old.bias is None else nn.Parameter(old.bias.detach(), requires_grad=old.bias.requires_grad)

    def forward(self, x):
        y = _DequantMatmul.apply(x, self.weight, self.out_features, self.in_features, self.bits == 8)
        return y if self.bias is None else y + self.bias


def quantized_layout(out_features: int, in_features: int, bits: int, double_quant: bool = True,
                     blocksize: int = 64) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors bitsandbytes stores for one quantized (out, in) weight: name -> (shape, dtype)."""
    n = out_features * in_features
    if bits == 8:  # LLM.int8: int8 rows and one float32 scale per row
        return {"weight": ((out_features, in_features), torch.int8), "SCB": ((out_features,), torch.float32)}
    blocks = -(-n // blocksize)
    layout = {"weight": ((-(-n // 2), 1), torch.uint8), "code": ((16,), torch.float32)}
    if double_quant:  # absmax quantized to 8 bits in blocks of 256, with their own absmax, code and offset
        layout.update(absmax=((blocks,), torch.uint8), absmax2=((-(-blocks // 256),), torch.float32),
                      code2=((256,), torch.float32), offset=((), torch.float32))
    else:
        layout["absmax"] = ((blocks,), torch.float32)
    return layout


def _fake_quantize(model: nn.Module, config) -> tuple[int, int]:
    from ._modules import get_submodule
    from .transforms.quant import _plan

    plan = _plan(model, config)
    for target in plan.targets:
        parent, _, child = target.fqn.rpartition(".")
        setattr(get_submodule(model, parent), child,
                _FakeQuantLinear(target.module, config.bits, config.double_quant, config.blocksize, target.transposed))
    return len(plan.targets), len(plan.skipped)


def adamw8bit_state_bytes(params: list[torch.Tensor]) -> int:
    """bitsandbytes AdamW8bit's state for `params`: two uint8 states with a float32 absmax per 256 values for
    tensors of at least 4096 elements, two float32 states below, and the two shared 256-entry quantization maps."""
    total = 2 * 256 * 4
    for p in params:
        n = p.numel()
        total += 2 * (n + 4 * -(-n // _8BIT_BLOCK)) if n >= _MIN_8BIT_SIZE else 2 * 4 * n
    return total


@contextlib.contextmanager
def _adapters_stay_put():
    """PEFT moves each new adapter to its base layer's device (and dtype) with `Module.to`, which has to swap fake
    parameters and cannot. On fake CPU tensors the adapters already are where they go, and memopt makes them float32
    anyway: while `apply` runs, a `Module.to` that changes nothing returns at once and PEFT's move is skipped."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        BaseTunerLayer = None
    module_to = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        if dtype is None and memory_format is None and all(device is None or t.device == device for t in tensors):
            return self
        return module_to(self, *args, **kwargs)

    nn.Module.to = to
    if BaseTunerLayer is not None:
        move = BaseTunerLayer._move_adapter_to_device_of_base_layer
        BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        nn.Module.to = module_to
        if BaseTunerLayer is not None:
            BaseTunerLayer._move_adapter_to_device_of_base_layer = move


# -- the step --------------------------------------------------------------------------------------------------------
def step_loss(out: Any) -> torch.Tensor:
    """A training step's loss: the output's own ``.loss`` (labels given), a scalar output, else a stand-in on the
    first output tensor (a bare model without a head)."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.float().pow(2).mean()
    first = out[0] if isinstance(out, (tuple, list)) else next(v for v in out.values() if isinstance(v, torch.Tensor))
    return first if first.dim() == 0 else first.float().pow(2).mean()


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _hf_batch(model: nn.Module, batch_size: int, seq_len: int, mode: str) -> dict:
    vocab = getattr(model.config, "vocab_size", None) or 1000
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    if mode == "generate":
        return {"input_ids": ids, "use_cache": True}
    return {"input_ids": ids, "labels": ids}


def _kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * seq_len * batch_size * torch.empty((), dtype=dtype).element_size()


def _is_offload(checkpoint: Any) -> bool:
    return checkpoint == "offload" or bool(getattr(checkpoint, "offload", False))


def _fsdp(report: MemoryReport, model: nn.Module, world_size: int) -> tuple[int, dict[str, int], list[str]]:
    """Per-rank memory under FSDP2 (`fully_shard` per block and on the root) from the one-device step: parameters,
    gradients and optimizer state divided by `world_size`; the root's own parameters (embeddings, head) gathered for
    the whole step; in forward a block gathered plus the next one prefetched, in backward also the block's unsharded
    gradients before their reduce-scatter."""
    from ._modules import find_blocks

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

    Cost: two fake steps (a warm-up that creates the optimizer state, and the tracked one); seconds for small
    models, ~15 s for a 7B config on 2 CPU cores, a few hundred MB of RAM.

    Raises:
        FileNotFoundError: the config path does not exist. ValueError: an option has an unknown value.
    """
    started = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import apply as memopt_apply
    from .config import quant_config

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
            kv = _kv_cache_bytes(config, batch_size, seq_len, dtype or torch.float32) if config is not None else None
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
        from ._modules import find_blocks

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


# -- plan ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rung:
    name: str
    options: dict[str, Any]
    optimizer: str
    slowdown: float  # predicted step time over plain sdpa training
    source: str  # where the slowdown comes from
    cuda_only: bool = False
    changes_training: bool = False  # LoRA: only adapters train


# Cheapest first. Slowdowns: measured on the bench model with benchmarks/checkpoint.py (selective 1.03x, every-2
# 1.09x, full 1.21x of no checkpointing); the others as published (bitsandbytes' 8-bit optimizers run at AdamW's
# speed; QLoRA-style 4-bit + LoRA about 1.3-1.5x a 16-bit LoRA step on GPUs) and marked as such.
LADDER = (
    _Rung("sdpa", {}, "adamw", 1.00, "baseline"),
    _Rung("selective checkpointing", {"checkpoint": "selective"}, "adamw", 1.03, "measured, benchmarks/checkpoint.py"),
    _Rung("selective checkpointing + 8-bit AdamW", {"checkpoint": "selective"}, "adamw8bit", 1.04,
          "checkpointing measured; 8-bit AdamW ~1.0x (bitsandbytes)"),
    _Rung("every-2 checkpointing + 8-bit AdamW", {"checkpoint": 2}, "adamw8bit", 1.10, "measured + published"),
    _Rung("full checkpointing + 8-bit AdamW", {"checkpoint": "full"}, "adamw8bit", 1.22, "measured + published"),
    _Rung("full checkpointing with CPU offload + 8-bit AdamW", {"checkpoint": "offload"}, "adamw8bit", 1.30,
          "assumed: host copies overlap poorly on small models", cuda_only=True),
    _Rung("8-bit weights + LoRA r16 + full checkpointing", {"checkpoint": "full", "quant": "8bit", "lora": 16},
          "adamw", 1.60, "published (LLM.int8 matmuls are slower than 16-bit ones)", changes_training=True),
    _Rung("4-bit NF4 + LoRA r16 + full checkpointing (QLoRA)", {"checkpoint": "full", "quant": "4bit", "lora": 16},
          "adamw", 1.40, "published (QLoRA)", changes_training=True),
)


@dataclass
class Plan:
    """What `memopt.plan` chose. ``memopt.apply(model, **plan.options)`` and ``memopt.optimizer(model,
    plan.optimizer)`` apply it.

    Attributes:
        fits: whether any rung fit the budget; when not, ``options`` is the rung with the smallest peak and
            ``needed_bytes`` the smallest budget that would do.
        name, options, optimizer, estimate, slowdown (predicted step time over plain SDPA training, with
            ``slowdown_source``), tried: ``[(rung name, peak bytes, fits)]`` in the order searched.
    """

    fits: bool
    budget_bytes: int
    name: str
    options: dict[str, Any]
    optimizer: str
    estimate: Estimate
    slowdown: float
    slowdown_source: str
    needed_bytes: int
    changes_training: bool
    tried: list[tuple[str, int, bool]]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimate"] = {k: v for k, v in self.estimate.to_dict().items() if k != "report"}
        d["options"] = {k: _plain(v) for k, v in self.options.items()}
        return d

    def __str__(self) -> str:
        lines = [f"budget {format_bytes(self.budget_bytes)}:"]
        for name, peak, ok in self.tried:
            lines.append(f"  {'fits ' if ok else 'over '} {format_bytes(peak):>11}  {name}")
        if self.fits:
            opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            lines.append(f"plan: {self.name}: peak {format_bytes(self.estimate.peak_bytes)}, predicted step time "
                         f"{self.slowdown:.2f}x ({self.slowdown_source})")
            lines.append(f"  memopt.apply(model{', ' + opts if opts else ''}); memopt.optimizer(model, "
                         f"{self.optimizer!r})")
            if self.changes_training:
                lines.append("  note: with LoRA only the adapters train (a different fine-tune than a full one)")
        else:
            lines.append(f"nothing fits: the smallest peak is {format_bytes(self.needed_bytes)} ({self.name}); "
                         f"that is the smallest budget that would do, or lower batch_size/seq_len")
        return "\n".join(lines)


def plan(model: Any, budget: Any = "24GiB", *, batch_size: int = 1, seq_len: int = 512, device: str = "cuda",
         allow_lora: bool = True, **kwargs: Any) -> Plan:
    """The cheapest way to make a training step fit `budget`: estimates the rungs of `LADDER` in order of compute
    cost (sdpa; selective checkpointing; 8-bit AdamW; every-2 and full checkpointing; offload (CUDA); 8-bit weights +
    LoRA; 4-bit + LoRA) and returns the first that fits, with its predicted peak and slowdown.

    Args:
        model, batch_size, seq_len, device, **kwargs: as `memopt.estimate` (dtype, world_size, inputs, blocks).
        budget: device memory, e.g. ``"24GiB"``, ``"80GB"`` or bytes.
        allow_lora: also consider the rungs that quantize the weights and train LoRA adapters instead (they change
            what is trained).

    Cost: one `memopt.estimate` per rung tried (it stops at the first that fits).
    """
    budget_bytes = parse_bytes(budget)
    for key in ("checkpoint", "quant", "lora", "optimizer", "mode"):
        if key in kwargs:
            raise ValueError(f"plan(..., {key}=...) is chosen by the plan; pass the other estimate options only")
    tried: list[tuple[str, int, bool]] = []
    best: tuple[_Rung, Estimate] | None = None
    for rung in LADDER:
        if (rung.cuda_only and device != "cuda") or (rung.changes_training and not allow_lora):
            continue
        est = estimate(model, batch_size=batch_size, seq_len=seq_len, device=device, optimizer=rung.optimizer,
                       **rung.options, **kwargs)
        ok = est.peak_bytes <= budget_bytes
        tried.append((rung.name, est.peak_bytes, ok))
        if best is None or est.peak_bytes < best[1].peak_bytes:
            best = (rung, est)
        if ok:
            return Plan(True, budget_bytes, rung.name, dict(rung.options), rung.optimizer, est, rung.slowdown,
                        rung.source, est.peak_bytes, rung.changes_training, tried)
    rung, est = best
    return Plan(False, budget_bytes, rung.name, dict(rung.options), rung.optimizer, est, rung.slowdown, rung.source,
                est.peak_bytes, rung.changes_training, tried)
