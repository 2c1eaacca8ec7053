"""The KV cache of generation: its kinds (`KVCacheConfig`), its size from a model's config, the transformers cache
object each kind is, and the keyword arguments that ask `model.generate` / `generate_batch` for it.

Memory per token of one sequence, for a model with ``L`` layers, ``kv_heads`` key/value heads of ``head_dim``:

    dynamic, static   2 x L x kv_heads x head_dim x bytes of the model's dtype (static reserves ``max_len`` tokens
                      per sequence up front, written or not)
    fp8               1 byte per value (e4m3) + one float32 scale per layer's keys and values
    int4, int2        nbits per value + a scale and a zero point in the model's dtype per ``group_size`` values
                      (hqq; quanto likewise), and the newest ``residual_length`` tokens kept in the model's dtype
    paged             as dynamic, in ``page_size``-token blocks reserved as a sequence reaches them (waste: under one
                      block per sequence), in one tensor sized up front (``num_blocks``)
    offloaded         as dynamic, but on the GPU only the layer being computed and the one being prefetched; the rest
                      in host memory (CUDA only)
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

KINDS = ("dynamic", "static", "fp8", "int4", "int2", "paged", "offloaded")
QUANT_BACKENDS = ("hqq", "quanto")
EXTRA = "memopt[kvcache]"


@dataclass(frozen=True)
class KVCacheConfig:
    """Which KV cache generation uses, with its settings (``kv_cache="int4"`` is ``KVCacheConfig("int4")``).

    Args:
        kind: ``"dynamic"`` (transformers' default: grows by concatenation, each layer's keys briefly twice while a
            token is appended), ``"static"`` (``max_len`` tokens per sequence allocated at the first token: no
            growth, no fragmentation, all of it reserved), ``"fp8"`` (float8 e4m3 values, per-tensor scale: half the
            bytes of bf16; transformers' pure-torch layer), ``"int4"``/``"int2"`` (group-wise integer values,
            KIVI-style residual window in full precision; the hqq or quanto backend: ``pip install memopt[kvcache]``;
            each decode step dequantizes the layer's cache to a temporary, and the window is re-quantized when it
            fills: slower decoding), ``"paged"`` (continuous batching's `PagedAttentionCache`: ``page_size``-token
            blocks taken as sequences grow, requests of any length in one batch; `generate_batch`), ``"offloaded"``
            (layers in host memory, prefetched one ahead: GPU memory of two layers, a host copy per layer per step;
            CUDA only).
        backend: for int4/int2: ``"hqq"`` or ``"quanto"`` (default: whichever is installed, hqq first).
        group_size: values per scale/zero point (transformers' ``q_group_size``, default 64).
        residual_length: newest tokens kept in the model's dtype before they are quantized (default 128).
        page_size: tokens per block of the paged cache (transformers' default 256; vLLM's 16). Smaller pages waste
            less of a sequence's last block and cost more block-table entries.
        num_blocks: paged: blocks in the cache tensor (default: what the requests need, or sized from a budget by
            `memopt.plan`).
        max_batch_tokens: paged: tokens per forward of continuous batching (transformers sizes its attention mask,
            (max_batch_tokens x (readable tokens + max_batch_tokens)) in the model's dtype, and its input buffers from
            it: the working memory of each step; default here 256).
    """

    kind: str = "dynamic"
    backend: str | None = None
    group_size: int = 64
    residual_length: int = 128
    page_size: int = 256
    num_blocks: int | None = None
    max_batch_tokens: int | None = 256

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kv_cache={self.kind!r} is not supported; use one of {KINDS} or memopt.KVCacheConfig(...)")
        if self.backend is not None and self.backend not in QUANT_BACKENDS + ("fp8",):
            raise ValueError(f"KVCacheConfig(backend={self.backend!r}) is not supported; use one of {QUANT_BACKENDS}")
        for name in ("group_size", "residual_length", "page_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCacheConfig({name}={v!r}) must be a positive int")
        for name in ("num_blocks", "max_batch_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"KVCacheConfig({name}={v!r}) must be a positive int or None")

    @property
    def nbits(self) -> int | None:
        return {"int4": 4, "int2": 2}.get(self.kind)

    @property
    def quantized(self) -> bool:
        return self.kind in ("fp8", "int4", "int2")

    def resolved_backend(self) -> str | None:
        """The quantization backend this config runs with (raises naming the extra when none is installed)."""
        if self.kind == "fp8":
            return "fp8"
        if self.nbits is None:
            return None
        if self.backend is not None:
            if not _installed(self.backend):
                raise ImportError(f"kv_cache={self.kind!r} with backend={self.backend!r} needs "
                                  f"{_PACKAGES[self.backend]}: pip install '{EXTRA}'")
            return self.backend
        for backend in QUANT_BACKENDS:
            if _installed(backend):
                return backend
        raise ImportError(f"kv_cache={self.kind!r} needs a quantization backend (hqq or optimum-quanto): "
                          f"pip install '{EXTRA}'")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `model.generate` that ask transformers for this cache (paged: those of
        `model.generate_batch`, with a `ContinuousBatchingConfig`)."""
        if self.kind == "dynamic":
            return {}
        if self.kind in ("static", "offloaded"):
            return {"cache_implementation": self.kind}
        if self.kind == "fp8":
            return {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}}
        if self.quantized:
            return {"cache_implementation": "quantized",
                    "cache_config": {"backend": self.resolved_backend(), "nbits": self.nbits,
                                     "q_group_size": self.group_size, "residual_length": self.residual_length}}
        from transformers.generation import ContinuousBatchingConfig

        kwargs = {"page_size": self.page_size, "num_blocks": self.num_blocks, "max_batch_tokens": self.max_batch_tokens}
        return {"continuous_batching_config": ContinuousBatchingConfig(**{k: v for k, v in kwargs.items()
                                                                          if v is not None})}

    def vllm(self, dtype: torch.dtype) -> dict[str, Any]:
        """The vLLM settings that correspond, where they map (vLLM always pages: ``block_size``; its
        ``kv_cache_dtype`` has fp8 but no int4/int2)."""
        out: dict[str, Any] = {"block_size": self.page_size if self.kind == "paged" else 16}
        if self.kind == "fp8":
            out["kv_cache_dtype"] = "fp8"
        elif self.kind in ("int4", "int2"):
            out["kv_cache_dtype"] = None  # no vLLM equivalent
            out["note"] = f"vLLM has no {self.kind} KV cache (kv_cache_dtype: auto, fp8, fp8_e4m3, fp8_e5m2)"
        else:
            out["kv_cache_dtype"] = "auto"
        if self.kind == "offloaded":
            out["note"] = "vLLM's nearest setting is swap_space / cpu_offload_gb (host memory for preempted blocks)"
        return out


_PACKAGES = {"hqq": "hqq", "quanto": "optimum-quanto"}


def _installed(backend: str) -> bool:
    module = "optimum.quanto" if backend == "quanto" else backend
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


_SHORTHANDS = {kind: (lambda kind=kind: KVCacheConfig(kind)) for kind in KINDS}
_SHORTHANDS.update({None: KVCacheConfig, "quantized": lambda: KVCacheConfig("int4")})


def kv_cache_config(value: Any) -> KVCacheConfig:
    """Normalise ``kv_cache=``: a kind name, None (dynamic) or a `KVCacheConfig`."""
    if isinstance(value, KVCacheConfig):
        return value
    if isinstance(value, str) or value is None:
        make = _SHORTHANDS.get(value)
        if make is not None:
            return make()
    raise ValueError(f"kv_cache={value!r} is not supported; use one of {KINDS}, None (= 'dynamic') or "
                     "memopt.KVCacheConfig(...)")


def _text(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def cache_shape(config) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) from a model config; None when it does not say its sizes."""
    text = _text(config)
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int | None:
    """2 x layers x kv_heads x head_dim x seq_len x batch_size x bytes per element (GQA/MQA models with their own
    number of key/value heads); None when the config does not say its sizes."""
    shape = cache_shape(config)
    if shape is None:
        return None
    layers, kv_heads, head_dim = shape
    return 2 * layers * kv_heads * head_dim * seq_len * batch_size * torch.empty((), dtype=dtype).element_size()


def make_cache(cfg: KVCacheConfig, config, *, max_len: int | None = None):
    """The transformers cache object for `cfg` (not paged: see `paged_cache`), as `generate` would build it."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    text = _text(config)
    if cfg.kind in ("dynamic", "offloaded"):
        return DynamicCache(config=text)
    if cfg.kind == "static":
        return StaticCache(config=text, max_cache_len=max_len)
    if cfg.kind == "fp8":
        return QuantizedCache("fp8", text)
    if cfg.quantized:
        return QuantizedCache(cfg.resolved_backend(), text, nbits=cfg.nbits, q_group_size=cfg.group_size,
                              residual_length=cfg.residual_length)
    raise ValueError(f"make_cache: kv_cache={cfg.kind!r} is built by continuous batching (paged_cache)")


@contextlib.contextmanager
def _any_memory():
    """transformers checks a paged cache's footprint against this machine's free memory; an estimate is for
    another machine."""
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    orig = PagedAttentionMemoryHandler.get_available_memory
    PagedAttentionMemoryHandler.get_available_memory = lambda self: 1 << 62
    try:
        yield
    finally:
        PagedAttentionMemoryHandler.get_available_memory = orig


def paged_cache(cfg: KVCacheConfig, config, dtype: torch.dtype, device: Any = "meta"):
    """continuous batching's `PagedAttentionCache` for `cfg` (``num_blocks`` required), built by transformers'
    own code on `device` (meta: sizes only)."""
    from transformers.generation import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.distributed import DistributedHelper

    if cfg.num_blocks is None:
        raise ValueError("paged_cache needs KVCacheConfig(num_blocks=...)")
    cb = ContinuousBatchingConfig(page_size=cfg.page_size, num_blocks=cfg.num_blocks,
                                  max_batch_tokens=cfg.max_batch_tokens)
    with _any_memory():
        return PagedAttentionCache(_text(config), cb, torch.device(device), DistributedHelper(None, None),
                                   dtype=dtype)


def blocks_needed(requests: list[tuple[int, int]], page_size: int, concurrent: int | None = None) -> int:
    """The most blocks in use at once when `requests` ``(prompt tokens, new tokens)`` run `concurrent` at a time
    in order (all at once by default): a request writes prompt + new - 1 tokens (the last token is never fed
    back), in ``ceil(tokens / page_size)`` blocks."""
    per = [math.ceil(max(1, p + n - 1) / page_size) for p, n in requests]
    c = len(per) if concurrent is None else max(1, min(concurrent, len(per)))
    return max(sum(per[i:i + c]) for i in range(0, len(per) - c + 1)) if per else 0


def with_blocks(cfg: KVCacheConfig, num_blocks: int) -> KVCacheConfig:
    return replace(cfg, num_blocks=num_blocks)
