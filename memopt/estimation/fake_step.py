"""The fake-tensor step: a model built from its config on no memory, bitsandbytes' layers and 8-bit optimizer state
stood in by tensors of their exact layout, and one training step's loss, as `memopt.estimate` runs them.

Fake tensors live on the CPU device whatever device is estimated (PyTorch cannot run CUDA fake tensors without a
CUDA build). Where the real thing cannot run on fake tensors, these stand in for it: bitsandbytes' quantized
parameters are tensor subclasses fake tensors cannot wrap, so each layer memopt would quantize becomes a stand-in
holding exactly bitsandbytes' storage (packed weight, absmax, nested statistics and code tables for 4-bit; int8
weight and row scales for 8-bit) whose matmul dequantizes to a temporary as bitsandbytes does; the 8-bit
optimizers' state is sized from bitsandbytes' layout (1 byte per value and one float32 absmax per 256 for tensors of
at least 4096 elements, float32 below).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 state
_8BIT_BLOCK = 256


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
    """The memory pattern of the quantized matmuls memopt runs: dequantize to a temporary, matmul, dequantize again
    in backward, keeping only the packed weight (MatMul4Bit; and memopt's 8-bit layers, which do not keep their input
    as bitsandbytes' MatMul8bitLt/MatMul8bitFp do: the weight is frozen, its gradient never computed)."""

    @staticmethod
    def forward(ctx, x, packed, out_features, in_features):
        w = torch.empty(out_features, in_features, dtype=x.dtype)  # (out, in) dequantized, freed after the matmul
        ctx.save_for_backward(packed)
        ctx.shape = (out_features, in_features)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        w = torch.empty(*ctx.shape, dtype=grad.dtype)
        return grad @ w, None, None, None


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
        y = _DequantMatmul.apply(x, self.weight, self.out_features, self.in_features)
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
    from .._modules import get_submodule
    from ..transforms.quant import _plan

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
