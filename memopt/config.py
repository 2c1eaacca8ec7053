"""Dataclass configs: the truth behind the string shorthands accepted by `memopt.apply`.

Every shorthand is normalised here, once, at the boundary; the transforms only ever see configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

CHECKPOINT_POLICIES = ("full", "selective")


def _normalise(name: str, value: Any, config_type: type, shorthand: Callable[[Any], Any], allowed: str) -> Any:
    """One `apply` argument to its config: None/False -> None (do nothing), a config as is, a shorthand through
    `shorthand` (which returns None for values it does not know), anything else a ValueError naming `allowed`."""
    if value is None or value is False:
        return None
    if isinstance(value, config_type):
        return value
    config = shorthand(value)
    if config is None:
        raise ValueError(f"{name}={value!r} is not supported; use {allowed}")
    return config


@dataclass(frozen=True)
class CheckpointConfig:
    """Activation checkpointing of the model's repeated blocks.

    Only a checkpointed block's inputs stay alive between forward and backward; everything it computes inside is
    recomputed when backward reaches it.

    Args:
        policy: ``"full"`` keeps only the block inputs: activation memory of a block falls to its input
            (``batch x seq x hidden``), at the price of one extra forward of the block in backward (~+33% compute
            for transformer blocks). ``"selective"`` also keeps the outputs of the expensive ops (matmuls, convolutions,
            attention kernels; see ``save_ops``) and recomputes only the cheap ones (norms, activations, dropout,
            residual adds): less memory saved than ``"full"``, but the recompute costs only elementwise work.
        every: checkpoint every ``every``-th block (blocks 0, N, 2N, ...); ``1`` checkpoints all of them. Larger
            values keep more activations in exchange for less recompute.
        blocks: which modules are blocks; ``None`` finds the repeated layers automatically. FQN strings (glob patterns
            such as ``"model.layers.*"`` allowed), module classes, or a predicate ``fn(name, module) -> bool``.
        offload: also move the kept block inputs to pinned CPU memory during the step (CUDA only). Frees
            ``layers x batch x seq x hidden`` bytes of GPU memory for a host-to-device copy per block in backward.
            On a CPU model it behaves as ``offload=False`` (and says so once).
        preserve_rng_state: restore the RNG state before recomputing, so dropout draws the same masks and gradients
            match an uncheckpointed run exactly. Costs one RNG-state copy per block call.
        determinism_check: passed to ``torch.utils.checkpoint``: ``"default"`` checks recomputed tensors' shapes,
            dtypes and devices; ``"none"`` skips the check.
        save_ops: for ``policy="selective"``, the ATen op names whose outputs are kept (default: mm, addmm, bmm,
            baddbmm, convolution and the SDPA kernels).
    """

    policy: str = "full"
    every: int = 1
    blocks: Any = None
    offload: bool = False
    preserve_rng_state: bool = True
    determinism_check: str = "default"
    save_ops: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.policy not in CHECKPOINT_POLICIES:
            raise ValueError(
                f"CheckpointConfig(policy={self.policy!r}) is not supported; use one of {CHECKPOINT_POLICIES}"
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(
                f"CheckpointConfig(every={self.every!r}) must be a positive int (1 = every block, 2 = every other block)"
            )
        if self.determinism_check not in ("default", "none"):
            raise ValueError(
                f"CheckpointConfig(determinism_check={self.determinism_check!r}) must be 'default' or 'none'"
            )
        if self.save_ops is not None and self.policy != "selective":
            raise ValueError("CheckpointConfig(save_ops=...) only applies to policy='selective'")

    @property
    def name(self) -> str:
        """Short human name, as `memopt.applied` prints it."""
        parts = [self.policy]
        if self.every != 1:
            parts.append(f"every={self.every}")
        if self.offload:
            parts.append("offload")
        return ",".join(parts)


@dataclass(frozen=True)
class AttentionConfig:
    """Attention through `torch.nn.functional.scaled_dot_product_attention`: no (batch, heads, seq, seq) matrix kept
    for backward, so attention's activation memory grows linearly with sequence length instead of quadratically.
    Same results as eager attention (fp32 rounding apart); with fused kernels usually faster too.

    Args:
        transformers: switch transformers models to their own SDPA implementation where the architecture has one.
        multihead: call `nn.MultiheadAttention` with `need_weights=False` (its SDPA path; weights come back None).
        handwritten: watch modules whose forward calls softmax and run `softmax(q @ k^T ...) @ v` as one SDPA call.
            Costs a Python-level check per tensor op inside those modules.
        report_backend: record which SDPA kernel ran over the first two forwards (and warn once about a fall-back to
            the math kernel). Costs nothing after those forwards.
    """

    transformers: bool = True
    multihead: bool = True
    handwritten: bool = True
    report_backend: bool = True

    @property
    def name(self) -> str:
        return "sdpa"


@dataclass(frozen=True)
class QuantConfig:
    """Weights in 4 or 8 bits with bitsandbytes; the strings ``"4bit"``, ``"nf4"``, ``"fp4"``, ``"8bit"`` are
    shorthands for it. The defaults are the QLoRA recipe, not bitsandbytes' (fp4, no double quantization, fp32
    compute).

    Args:
        bits: 4 (`bnb.nn.Linear4bit`) or 8 (`bnb.nn.Linear8bitLt`, LLM.int8). Weight memory: ~4.127 bits per weight
            for NF4 with double quantization (0.5 more without it), ~8 bits plus one fp32 scale per row for 8-bit,
            against 16/32 for bf16/fp32. Matmuls dequantize on the fly: slower than a plain Linear, most of all
            on CPU.
        quant_type: 4-bit format: ``"nf4"`` (normal-float, best for normally distributed weights) or ``"fp4"``.
        double_quant: also quantize the per-block absmax statistics (8-bit, second-level block 256): 0.127 instead
            of 0.5 extra bits per weight.
        compute_dtype: dtype the 4-bit weights are dequantized to for the matmul: ``torch.float16``,
            ``torch.bfloat16`` or ``torch.float32`` (or its name, ``"bfloat16"``, as transformers'
            ``BitsAndBytesConfig`` takes it); None = the layer's own float dtype (fp32 stays fp32, bf16 stays bf16).
            4-bit only: 8-bit layers compute in their input's dtype.
        blocksize: 4-bit quantization block (weights sharing one absmax): an int power of two from 32 to 4096.
        threshold: 8-bit outlier threshold: input features above it are multiplied in 16 bits (LLM.int8); 0 turns
            the outlier path off.
        skip: FQNs or glob patterns of layers never quantized (a string or a list of strings). A pattern that matches
            no Linear layer is an error.
        skip_head: keep the output head (``lm_head``, the output embedding, weights tied to the input embedding) in
            full precision: the logits are where quantization error hurts most, and a tied weight is shared.
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    threshold: float = 6.0
    skip: tuple[str, ...] = ()
    skip_head: bool = True

    def __post_init__(self) -> None:
        # Checked here, not deep inside bitsandbytes: a float blocksize or a string dtype would fail there mid-apply.
        if not _is_int(self.bits) or self.bits not in (4, 8):
            raise ValueError(f"QuantConfig(bits={self.bits!r}) is not supported; use 4 or 8")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"QuantConfig(quant_type={self.quant_type!r}) is not supported; use 'nf4' or 'fp4'")
        if not _is_int(self.blocksize) or self.blocksize not in _BLOCKSIZES:
            raise ValueError(f"QuantConfig(blocksize={self.blocksize!r}) must be a power of two from 32 to 4096, as "
                             f"an int: one of {_BLOCKSIZES}")
        object.__setattr__(self, "compute_dtype", _compute_dtype(self.compute_dtype))
        if self.compute_dtype is not None and self.bits == 8:
            raise ValueError(f"QuantConfig(bits=8, compute_dtype={self.compute_dtype}): compute_dtype only applies to "
                             "bits=4 (8-bit layers compute in their input's dtype); leave it None")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise ValueError(f"QuantConfig(threshold={self.threshold!r}) must be a non-negative number (LLM.int8's "
                             "outlier threshold, 6.0 by default; 0 turns the outlier path off)")
        for key in ("double_quant", "skip_head"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"QuantConfig({key}={getattr(self, key)!r}) must be True or False")
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in skip):
            raise TypeError(f"QuantConfig(skip={self.skip!r}) must be a layer name or glob pattern, or a list of them "
                            "(e.g. skip=['lm_head', '*.mlp.*'])")
        object.__setattr__(self, "skip", tuple(skip))

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "8bit"
        return self.quant_type + ("+dq" if self.double_quant else "")


_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what bitsandbytes' 4-bit matmul computes in


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compute_dtype(value: Any) -> torch.dtype | None:
    """QuantConfig's compute_dtype: None, one of `_COMPUTE_DTYPES`, or its name ("bfloat16", "torch.float16")."""
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if value is None or dtype in _COMPUTE_DTYPES:
        return dtype
    allowed = ", ".join(str(d) for d in _COMPUTE_DTYPES)
    raise ValueError(f"QuantConfig(compute_dtype={value!r}) is not supported; use {allowed} (or its name, e.g. "
                     "'bfloat16'), or None for the layer's own dtype")


_QUANT_SHORTHANDS: dict[str, Callable[[], QuantConfig]] = {
    "4bit": QuantConfig,
    "nf4": QuantConfig,
    "fp4": lambda: QuantConfig(quant_type="fp4"),
    "8bit": lambda: QuantConfig(bits=8),
}


def quant_config(value: Any) -> QuantConfig | None:
    """Normalise the ``quant=`` argument of `memopt.apply`."""
    return _normalise(
        "quant", value, QuantConfig,
        lambda v: _QUANT_SHORTHANDS[v]() if isinstance(v, str) and v in _QUANT_SHORTHANDS else None,
        "'4bit', 'nf4', 'fp4', '8bit', None or memopt.QuantConfig(...)",
    )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters with PEFT (`lora=r` or `lora=peft.LoraConfig(...)` are shorthands for it).

    Args:
        r: adapter rank. Trainable parameters per adapted (out x in) layer: r * (in + out), in float32, plus their
            gradients and optimizer state (~16 bytes each with AdamW); the frozen base needs no gradient or state.
        alpha: scaling numerator (update = B A x * alpha / r); None = 2 * r.
        dropout: dropout on the adapter input.
        target_modules: which layers get adapters (names or FQN suffixes, as PEFT takes them); "all-linear" = every
            Linear-like layer (nn.Linear, Conv1D, quantized ones) except the output head, weights tied to another
            parameter, and nn.MultiheadAttention's projections, decided by memopt for any model.
        peft_config: a `peft.LoraConfig` used as is (the fields above are ignored; ``head_in_float32`` is not).
        head_in_float32: whether a bf16/fp16 output head that is not tied to the input embedding is upcast to float32
            (in place; the head is frozen). None (default): upcast unless ``loss="chunked"`` computes the head (in
            the same `apply` call or an earlier one). A float32 head costs 2 more bytes per head weight
            (vocab x hidden) and saves the half logits kept beside their float32 copy (batch x seq x vocab x 2
            bytes) in a plain loss; the chunked loss keeps no full logits, so there it is only the cost. True: always
            upcast; False: keep the head in the model's dtype.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    peft_config: Any = None
    head_in_float32: bool | None = None

    def __post_init__(self) -> None:
        if self.head_in_float32 is not None and not isinstance(self.head_in_float32, bool):
            raise TypeError(f"LoraSettings(head_in_float32={self.head_in_float32!r}) must be True, False or None "
                            "(None: float32 unless loss='chunked' computes the head)")
        if self.peft_config is not None:
            return
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora={self.r!r} is not supported; use a positive int rank (e.g. lora=16), a "
                             "peft.LoraConfig(...) or None")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoraSettings(alpha={self.alpha!r}) must be positive (None = 2 * r)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSettings(dropout={self.dropout!r}) must be in [0, 1)")


def _lora_shorthand(value: Any) -> LoraSettings | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return LoraSettings(r=value)
    if type(value).__name__ == "LoraConfig" and type(value).__module__.startswith("peft"):
        return LoraSettings(peft_config=value)
    return None


def lora_config(value: Any) -> LoraSettings | None:
    """Normalise the ``lora=`` argument of `memopt.apply`."""
    allowed = "a positive int rank (e.g. lora=16), a peft.LoraConfig(...) or None"
    return _normalise("lora", value, LoraSettings, _lora_shorthand, allowed)


def attention_config(value: Any) -> AttentionConfig | None:
    """Normalise the ``attention=`` argument of `memopt.apply`."""
    return _normalise(
        "attention", value, AttentionConfig, lambda v: AttentionConfig() if v == "sdpa" else None,
        "'sdpa', None or memopt.AttentionConfig(...)",
    )


@dataclass(frozen=True)
class LossConfig:
    """The output head and cross-entropy computed chunk by chunk over tokens (`loss="chunked"` is a shorthand for
    `LossConfig()`): the (tokens x vocab) logits never exist in full, only one chunk's.

    Memory: the logits of a training step (tokens x vocab in float32, with their softmax and gradient: about
    3 x 4 x tokens x vocab bytes in a plain step) become one chunk's (a few x 4 x chunk_size x vocab bytes), plus the
    head's gradients, which are computed in the forward and kept until backward (tokens x hidden for the hidden
    states, vocab x hidden in float32 for a trainable head weight). Time: the same three matmuls as the plain head
    (the gradient ones run in the forward, so backward does not pay a second head forward), in chunks.

    Args:
        chunk_size: tokens per chunk. Smaller chunks need less memory and run more, smaller matmuls. None: one chunk's
            float32 logits about the size of the hidden states (Liger-Kernel's rule), at least 256 tokens.
        head: FQN of the output head (an `nn.Linear` whose weight is (vocab, hidden)). None: a transformers causal
            LM's output embedding, or a module named ``lm_head``.
        labels: name of the forward argument that carries the labels. None: ``"labels"`` for transformers causal
            LMs; for other models, every training forward (the model's own F.cross_entropy on the head's logits
            runs chunked, labels or not); a name limits it to forwards given that argument.
        shift, ignore_index, label_smoothing, softcap: the loss memopt computes for a transformers causal LM (which
            it runs with labels=None). A hand-written model (nanoGPT) computes its own loss and memopt follows its
            F.cross_entropy call with that call's ignore_index, reduction and label_smoothing, so setting these for
            it raises.
        shift: whether position t predicts label t + 1. None: True (transformers causal LMs shift inside their loss).
        ignore_index: label value that does not count (its token adds no loss and no gradient).
        label_smoothing: as in `torch.nn.functional.cross_entropy` (transformers' Trainer with label_smoothing_factor
            removes the labels: give it here).
        softcap: logits soft-capping, ``cap * tanh(logits / cap)``, as Gemma 2 applies after its head. None: the
            model config's ``final_logit_softcapping``.
    """

    chunk_size: int | None = None
    head: str | None = None
    labels: str | None = None
    shift: bool | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"LossConfig(chunk_size={self.chunk_size!r}) must be a positive int (tokens per chunk) "
                             "or None (chosen from the hidden and vocabulary sizes)")
        for key in ("head", "labels"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"LossConfig({key}={value!r}) must be a string (an FQN / argument name) or None")
        if self.shift not in (None, True, False):
            raise TypeError(f"LossConfig(shift={self.shift!r}) must be True, False or None")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"LossConfig(ignore_index={self.ignore_index!r}) must be an int (usually -100)")
        if not (isinstance(self.label_smoothing, (int, float)) and 0.0 <= self.label_smoothing <= 1.0):
            raise ValueError(f"LossConfig(label_smoothing={self.label_smoothing!r}) must be a float in [0, 1]")
        if self.softcap is not None and not (isinstance(self.softcap, (int, float)) and self.softcap > 0):
            raise ValueError(f"LossConfig(softcap={self.softcap!r}) must be a positive float (e.g. 30.0) or None")

    @property
    def name(self) -> str:
        parts = ["chunked"]
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        return ",".join(parts)


def loss_config(value: Any) -> LossConfig | None:
    """Normalise the ``loss=`` argument of `memopt.apply`."""
    return _normalise(
        "loss", value, LossConfig, lambda v: LossConfig() if v == "chunked" else None,
        "'chunked', None or memopt.LossConfig(...)",
    )


KV_POOLING = ("mean", "first")


@dataclass(frozen=True)
class KVHeadsConfig:
    """Multi-head (or grouped-query) attention converted to fewer key/value heads, in place (`kv_heads=K` is a
    shorthand for `KVHeadsConfig(K)`, `kv_heads="mqa"` for `KVHeadsConfig(1)`): GQA/MQA from a multi-head checkpoint
    (Ainslie et al. 2023).

    Memory: the KV cache of generation is 2 x layers x kv_heads x head_dim x tokens x bytes, so it shrinks to
    ``kv_heads / heads`` of multi-head attention's; the key and value projections shrink alike. Cost: one pass over
    the key/value weights at conversion (plus two models built on the meta device to read the architecture's
    layout); the converted model is no slower (its attention reads fewer keys and values). Quality: the conversion
    changes the model's outputs; uptrain it (the paper: ~5% of the pre-training steps) to win most of it back.

    Args:
        kv_heads: key/value heads after conversion. Must divide the number of query heads and the current number of
            key/value heads (GQA-8 -> GQA-2 pools groups of 4); 1 is multi-query attention.
        pooling: how each group of ``current / kv_heads`` contiguous heads (the grouping transformers' ``repeat_kv``
            assumes) becomes one: ``"mean"`` averages their projections (the paper's choice: the best start for
            uptraining), ``"first"`` keeps the first head of each group (the paper's ablation).
    """

    kv_heads: int
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise ValueError(f"kv_heads={self.kv_heads!r} is not supported; use a positive int number of key/value "
                             "heads that divides the model's attention heads (1 = multi-query attention)")
        if self.pooling not in KV_POOLING:
            raise ValueError(f"KVHeadsConfig(pooling={self.pooling!r}) is not supported; use one of {KV_POOLING}")

    @property
    def name(self) -> str:
        return f"{self.kv_heads} ({self.pooling})"


def _kv_heads_shorthand(value: Any) -> KVHeadsConfig | None:
    if value == "mqa":
        return KVHeadsConfig(1)
    if isinstance(value, int) and not isinstance(value, bool):
        return KVHeadsConfig(value)  # raises for K < 1, naming the value
    return None


def kv_heads_config(value: Any) -> KVHeadsConfig | None:
    """Normalise the ``kv_heads=`` argument of `memopt.apply`."""
    return _normalise("kv_heads", value, KVHeadsConfig, _kv_heads_shorthand,
                      "a positive int (e.g. kv_heads=2), 'mqa' (= 1), None or memopt.KVHeadsConfig(...)")


_CHECKPOINT_SHORTHANDS: dict[Any, Callable[[], CheckpointConfig]] = {
    "full": CheckpointConfig,
    "selective": lambda: CheckpointConfig(policy="selective"),
    "offload": lambda: CheckpointConfig(offload=True),
}
_CHECKPOINT_ALLOWED = "False, None, True, 'full', 'selective', 'offload', a positive int N, or memopt.CheckpointConfig(...)"


def _checkpoint_shorthand(value: Any) -> CheckpointConfig | None:
    if value is True:
        return CheckpointConfig()
    if isinstance(value, int) and not isinstance(value, bool):
        return CheckpointConfig(every=value) if value >= 1 else None
    if isinstance(value, str) and value in _CHECKPOINT_SHORTHANDS:
        return _CHECKPOINT_SHORTHANDS[value]()
    return None


def checkpoint_config(value: Any) -> CheckpointConfig | None:
    """Normalise the ``checkpoint=`` argument of `memopt.apply` to a `CheckpointConfig` (or None: do nothing)."""
    return _normalise("checkpoint", value, CheckpointConfig, _checkpoint_shorthand, _CHECKPOINT_ALLOWED)


def with_blocks(config: CheckpointConfig, blocks: Any) -> CheckpointConfig:
    """`apply(blocks=...)` fills in a config that names no blocks of its own."""
    if blocks is None:
        return config
    if config.blocks is not None:
        raise ValueError(
            "blocks= was given twice, to apply() and in CheckpointConfig(blocks=...); give it in one place"
        )
    return dataclasses.replace(config, blocks=blocks)


@dataclass(frozen=True)
class OffloadConfig:
    """Activation offloading (`offload=True` is a shorthand for `OffloadConfig()`): in a training forward on CUDA,
    every tensor autograd saves for backward outside checkpointed regions goes to pinned host memory, copied on a
    side stream while compute goes on, and comes back, prefetched, when backward needs it (torchtune's
    ``OffloadActivations`` design). With ``checkpoint=`` that is the checkpointed blocks' inputs (what checkpointing
    keeps) plus what runs outside the blocks (embeddings, final norm, head, loss); without it, every activation.

    Memory: the offloaded activations leave the GPU (at most ``max_fwd_stash`` of them wait there for their copy to
    finish, and ``prefetch`` come back early in backward); they take as much pinned host memory. Time: a
    device-to-host copy of each in forward and a host-to-device copy in backward (PCIe/NVLink bandwidth), hidden
    behind compute when the streams overlap; with ``use_streams=False`` the copies block.

    Args:
        min_bytes: tensors smaller than this stay on the device (copies of small tensors cost more than they save).
        pin_memory: host copies in page-locked memory (required for copies that overlap compute).
        use_streams: copy on side streams (device-to-host in forward, host-to-device in backward) instead of the
            compute stream.
        max_fwd_stash: in forward, at most this many offloaded tensors wait on the device for their copy to finish
            before the forward waits for the oldest one.
        prefetch: in backward, when one offloaded tensor is needed, bring back this many of the ones backward will
            need next.
    """

    min_bytes: int = 1024
    pin_memory: bool = True
    use_streams: bool = True
    max_fwd_stash: int = 5
    prefetch: int = 2

    def __post_init__(self) -> None:
        for key in ("min_bytes", "max_fwd_stash", "prefetch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"OffloadConfig({key}={value!r}) must be a non-negative int")
        for key in ("pin_memory", "use_streams"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"OffloadConfig({key}={getattr(self, key)!r}) must be True or False")

    @property
    def name(self) -> str:
        return "activations->host" + ("" if self.use_streams else ",no-streams")


def offload_config(value: Any) -> OffloadConfig | None:
    """Normalise the ``offload=`` argument of `memopt.apply`."""
    return _normalise("offload", value, OffloadConfig, lambda v: OffloadConfig() if v is True else None,
                      "True, False, None or memopt.OffloadConfig(...)")
