"""The fake-tensor step: a model built from its config on no memory, bitsandbytes' layers and 8-bit optimizer state
stood in by tensors of their exact layout, and one training step's loss, as `memopt.estimate` runs them.

Fake tensors live on the CPU device whatever device is estimated (PyTorch cannot run CUDA fake tensors without a
CUDA build). Where the real thing cannot run on fake tensors, these stand in for it: bitsandbytes' quantized
parameters are tensor subclasses fake tensors cannot wrap, so each layer memopt would quantize becomes a stand-in
holding exactly bitsandbytes' storage (packed weight, absmax, nested statistics and code tables for 4-bit; int8
weight and row scales for 8-bit) whose matmul dequantizes to a temporary as bitsandbytes does (the 8-bit
optimizers' state layouts are in optimizers.py).
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


# -- building the model on fake tensors ------------------------------------------------------------------------------
def load_config(model: Any):
    """A transformers config from a `PretrainedConfig` (as is), a local JSON file (whatever its name:
    ``path/bench.json`` is read, not the ``config.json`` beside it) or a folder holding a ``config.json``. No download.

    Raises:
        FileNotFoundError: the path does not exist (or a folder has no config.json). ValueError: the file is not a
        transformers config, or its values are refused by transformers (naming the file and the reason).
    """
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        return model
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {model}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"config file not found: {path / 'config.json'} (the folder {model} has none; name "
                                "the JSON file itself)")
    try:  # a file path is read as that file; a folder as its config.json
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read a transformers config from {model}: {_first_line(exc)}") from None
    except Exception as exc:  # transformers' strict config validation (huggingface_hub's StrictDataclassError)
        if type(exc).__module__.startswith(("huggingface_hub", "transformers")):
            raise ValueError(f"could not read a transformers config from {model}: {_first_line(exc)}") from None
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    cause = exc.__cause__
    if cause is not None and str(cause).strip():  # transformers' validation errors say the reason in their cause
        text = str(cause).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def with_layers(config, layers: int):
    """A copy of `config` with `layers` decoder layers (`num_hidden_layers` of its text config; a uniform
    ``layer_types`` list cut to match), or None when the config does not say its depth that way."""
    config = config.__class__.from_dict(config.to_dict())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not isinstance(getattr(text, "num_hidden_layers", None), int):
        return None
    types = getattr(text, "layer_types", None)
    if types is not None:
        if len(set(types)) > 1:
            return None
        text.layer_types = list(types[:1]) * layers
    text.num_hidden_layers = layers
    return config


def build_model(config, device: Any = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The model `config` describes (causal LM, else seq2seq, else the bare model), on `device`; eager attention
    unless the config names one (`memopt.apply` switches it). The config is copied: apply() changes its settings.

    Raises ValueError naming the config's class when no transformers class builds from it, or when building fails
    on the config's values (a negative size, say)."""
    import transformers

    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device(device):
        for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel):
            try:
                return cls.from_config(config, **kwargs)
            except ValueError as exc:
                if "Unrecognized configuration class" in str(exc):
                    continue
                raise ValueError(f"could not build a model from {type(config).__name__}: {_first_line(exc)}") from None
            except (RuntimeError, TypeError, IndexError, ZeroDivisionError) as exc:  # e.g. a negative size
                raise ValueError(f"could not build {cls.__name__} from {type(config).__name__}: {_first_line(exc)} "
                                 "(check the config's sizes)") from None
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
    as bitsandbytes' MatMul8bitLt/MatMul8bitFp do: the weight is frozen, its gradient never computed).

    Under autocast the two differ as bitsandbytes does: 4-bit's matmul is the custom op ``bitsandbytes::gemm_4bit``,
    which autocast does not enter (it computes in its input's dtype, the layer's compute dtype); 8-bit's dequantize
    and ``F.linear`` are plain ops inside an autograd Function, which autocast casts."""

    @staticmethod
    def forward(ctx, x, packed, out_features, in_features, autocast_inner, blocks):
        with torch.autocast("cpu", enabled=autocast_inner and torch.is_autocast_enabled("cpu")):
            w = torch.empty(out_features, in_features, dtype=x.dtype)  # (out, in) dequantized, freed after the matmul
            y = F.linear(x, w)
        ctx.save_for_backward(packed)
        ctx.shape, ctx.blocks = (out_features, in_features), blocks
        return y

    @staticmethod
    def backward(ctx, grad):
        absmax = torch.empty(ctx.blocks, dtype=torch.float32) if ctx.blocks else None  # nested absmax, dequantized
        w = torch.empty(*ctx.shape, dtype=grad.dtype)
        del absmax
        return grad @ w, None, None, None, None, None


class _FakeQuantLinear(nn.Linear):
    """A frozen Linear holding exactly the storage bitsandbytes would (see `quantized_layout`)."""

    def __init__(self, old: nn.Linear, bits: int, double_quant: bool, blocksize: int, transposed: bool,
                 compute_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        out_f, in_f = old.weight.shape[::-1] if transposed else old.weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.bits = bits
        # Linear4bit computes in this dtype (memopt: the layer's own float dtype unless QuantConfig says)
        self.compute_dtype = compute_dtype or (old.weight.dtype if old.weight.is_floating_point() else torch.float32)
        self.nested_blocks = -(-(out_f * in_f) // blocksize) if bits == 4 and double_quant else 0
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
        if self.bits == 8:  # memopt's Linear8bitLt: bnb.matmul(x, ...), its input not kept
            y = _DequantMatmul.apply(x, self.weight, self.out_features, self.in_features, True, 0)
            return y if self.bias is None else y + self.bias
        # Linear4bit: x to its compute dtype, matmul_4bit(...) with the bias, back to the input's dtype
        inp = x.dtype
        y = _DequantMatmul.apply(x.to(self.compute_dtype), self.weight, self.out_features, self.in_features, False,
                                 self.nested_blocks)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(inp)


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
                _FakeQuantLinear(target.module, config.bits, config.double_quant, config.blocksize, target.transposed,
                                 config.compute_dtype))
    return len(plan.targets), len(plan.skipped)


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
def find_loss(out: Any) -> tuple[torch.Tensor, str | None]:
    """A training step's loss from a model's output, the way the model returns it: ``(loss, None)``, or a stand-in
    and a note saying so.

    The loss is the output's ``.loss`` (transformers' outputs given labels), a ``"loss"`` entry of a dict, a scalar
    output, or the one scalar floating tensor in a tuple/list (nanoGPT's ``(logits, loss)``, memopt's chunked
    ``(None, loss)``). Without one (a bare model, no labels) the stand-in is the mean square of the first output
    tensor, so backward still runs through the whole model; pass ``loss_fn=`` to `memopt.estimate` to count the loss
    your training loop computes.

    Raises ValueError when a tuple holds several scalars (which one is the loss?) or the output holds no tensor."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss, None
    if isinstance(out, torch.Tensor):
        if out.dim() == 0:
            return out, None
        return out.float().pow(2).mean(), _STANDIN_NOTE
    if isinstance(out, dict):
        if isinstance(out.get("loss"), torch.Tensor):
            return out["loss"], None
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
        scalars = [v for v in values if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()]
        if len(scalars) == 1:
            return scalars[0], None
        if len(scalars) > 1:
            raise ValueError(f"the model returned {len(scalars)} scalar tensors in a {type(out).__name__}: which is the "
                             "loss? pass loss_fn=lambda model, batch: ... returning it")
    else:
        values = [getattr(out, k) for k in vars(out)] if hasattr(out, "__dict__") else []
    first = next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if first is None:
        raise ValueError(f"the model's output ({type(out).__name__}) holds no loss and no floating tensor to stand "
                         "one in on; pass loss_fn=lambda model, batch: ... returning the loss")
    return first.float().pow(2).mean(), _STANDIN_NOTE


_STANDIN_NOTE = ("no loss in the model's output: a stand-in loss (the mean square of its first output) drives "
                 "backward; pass loss_fn= to count the loss your training loop computes")


def step_loss(out: Any) -> torch.Tensor:
    """`find_loss` without the note: the loss a training step backpropagates."""
    return find_loss(out)[0]


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


@contextlib.contextmanager
def real_data_answers(batch: Any):
    """Answer the data-dependent questions transformers asks about a batch the way the real batch would, while a fake
    step runs: fake tensors have no values, so a check transformers skips while tracing takes its general branch.

    The one that costs memory: without a cache (``use_cache=False``, which checkpointing forces) and without an
    attention mask, transformers looks at the position ids for packed sequences (`find_packed_sequence_indices`);
    on fake ids it must assume packing and builds a (batch, 1, seq, seq) mask (and memopt's SDPA routing a float copy
    of it) that the real step never builds. A batch without ``position_ids`` gets the model's own positions,
    ``arange(seq)`` for every row: one sequence per row, no packing, as the real step finds. A batch that passes
    ``position_ids`` keeps transformers' answer (its packing cannot be known from fake values)."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    if not hasattr(masking_utils, "find_packed_sequence_indices") or (
            isinstance(batch, dict) and batch.get("position_ids") is not None):
        yield
        return
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


class FakeGradScaler:
    """`torch.amp.GradScaler`'s memory, for a fake step ("16-mixed"): the loss multiplied by a float32 scale, the
    gradients unscaled in place with `torch._amp_foreach_non_finite_check_and_unscale_` (as `unscale_` does), the
    scale updated in place. The real scaler reads ``found_inf`` (``.item()``) to decide whether to step, which fake
    tensors cannot answer: here every step is taken (finite gradients)."""

    def __init__(self) -> None:
        self._scale = torch.full((), 2.0**16, dtype=torch.float32)
        self._growth_tracker = torch.full((), 0, dtype=torch.int32)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale

    def unscale_(self, params: list[torch.Tensor]) -> None:
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32)
        grads: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                grads.setdefault(p.grad.dtype, []).append(p.grad)
        for group in grads.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        self._found_inf = found_inf

    def update(self) -> None:
        torch._amp_update_scale_(self._scale, self._growth_tracker, self._found_inf, 2.0, 0.5, 2000)


# -- activation offloading, as memopt's streams do it on CUDA -------------------------------------------------------
class _Gone:
    """What autograd keeps for an offloaded tensor: its shape, strides and dtype (the host copy is not on the
    device), and the device copy while it is back."""

    __slots__ = ("shape", "stride", "dtype", "index", "loaded")

    def __init__(self, t: torch.Tensor, index: int) -> None:
        self.shape, self.stride, self.dtype, self.index = tuple(t.shape), tuple(t.stride()), t.dtype, index
        self.loaded: torch.Tensor | None = None


class FakeOffload:
    """`memopt.transforms.offload.OffloadActivations` on fake tensors, for a CUDA estimate: the same tensors go (not
    parameters or their views, not under ``min_bytes``, not in backward; a tensor saved twice once), the host copies
    are not counted, and the device keeps what memopt's streams may keep at worst: in forward the last
    ``max_fwd_stash`` offloaded tensors (their copies in flight), in backward each one brought back with the
    ``prefetch`` needed next."""

    def __init__(self, config: Any, keep: list[torch.Tensor]) -> None:
        self.config = config
        self._keep = {t.untyped_storage()._cdata for t in keep}

    @contextlib.contextmanager
    def hooks(self):
        import collections

        order: list[_Gone] = []
        seen: dict[int, tuple[Any, _Gone]] = {}
        stash: collections.deque = collections.deque()
        started = [False]
        import weakref

        def pack(t: torch.Tensor) -> Any:
            if torch._C._current_graph_task_id() != -1 or isinstance(t, nn.Parameter) or \
                    t.untyped_storage().nbytes() < self.config.min_bytes or \
                    t.untyped_storage()._cdata in self._keep:
                return t
            hit = seen.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
            handle = _Gone(t, len(order))
            order.append(handle)
            seen[id(t)] = (weakref.ref(t), handle)
            stash.append(t)
            while len(stash) > self.config.max_fwd_stash:
                stash.popleft()
            return handle

        def load(handle: _Gone) -> None:
            if handle.loaded is None:
                handle.loaded = torch.empty_strided(handle.shape, handle.stride, dtype=handle.dtype)

        def unpack(saved: Any) -> torch.Tensor:
            if not isinstance(saved, _Gone):
                return saved
            if not started[0]:
                started[0] = True
                stash.clear()
            load(saved)
            for ahead in order[max(saved.index - self.config.prefetch, 0):saved.index][::-1]:
                load(ahead)
            out, saved.loaded = saved.loaded, None
            return out

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
