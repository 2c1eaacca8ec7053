"""The KV cache objects of generation, as the tracker (and the estimator) read them: which object is a cache, and
which tensors each of its layers holds.

transformers keeps a model's keys and values in a `Cache` (`DynamicCache`, `StaticCache`, `QuantizedCache`,
`EncoderDecoderCache`: a list of layers, each with its own tensors) or, for continuous batching, a
`PagedAttentionCache` (one flat byte tensor shared by every layer's pages). Attention modules receive it as the
``cache`` keyword (``past_key_values`` before transformers 5) and call ``cache.update(k, v, self.layer_idx)``.
Nothing here imports transformers: objects are recognised by their class names.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_CACHE_CLASSES = ("Cache", "PagedAttentionCache")
_SKIP = ("device", "config", "dtype")  # attributes that never hold the cache's tensors


def is_cache(obj: Any) -> bool:
    """A transformers KV cache (`Cache` and its subclasses, or continuous batching's `PagedAttentionCache`)."""
    return obj is not None and any(c.__name__ in _CACHE_CLASSES and c.__module__.startswith("transformers")
                                   for c in type(obj).__mro__)


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache among a forward's keyword arguments, or None."""
    for key in CACHE_KWARGS:
        value = kwargs.get(key)
        if is_cache(value):
            return value
    return None


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a cache layer's attributes: plain tensors, tensor subclasses (quanto's packed tensors), and
    tensors inside tuples, lists and dicts (fp8's ``(data, scale)``, hqq's ``(packed, {"scale", "zero"})``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


def _sub_caches(cache: Any) -> list[Any]:
    subs = [getattr(cache, n, None) for n in ("self_attention_cache", "cross_attention_cache")]
    return [s for s in subs if s is not None]


def layer_tensors(cache: Any, layer_idx: int | None) -> list[torch.Tensor]:
    """The tensors of one layer of `cache` (every layer's for a paged cache: it is one flat tensor)."""
    if hasattr(cache, "cache_tensor"):  # PagedAttentionCache: every layer's pages live in one tensor
        return [cache.cache_tensor] if isinstance(cache.cache_tensor, torch.Tensor) else []
    subs = _sub_caches(cache)
    if subs:
        return [t for s in subs for t in layer_tensors(s, layer_idx)]
    layers = getattr(cache, "layers", None) or []
    if layer_idx is None or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        return []
    layer = layers[layer_idx]
    state = getattr(layer, "__dict__", {})
    return [t for k, v in state.items() if k not in _SKIP for t in _tensors(v)]


def num_layers(cache: Any) -> int:
    if hasattr(cache, "cache_tensor"):
        return sum(len(getattr(a, "layer_indices", ())) for a in getattr(cache, "cache_allocators", {}).values()) or 1
    subs = _sub_caches(cache)
    if subs:
        return max(num_layers(s) for s in subs)
    return len(getattr(cache, "layers", None) or [])


def all_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor `cache` holds."""
    if hasattr(cache, "cache_tensor"):
        return layer_tensors(cache, None)
    return [t for i in range(num_layers(cache)) for t in layer_tensors(cache, i)]


def is_shared(cache: Any) -> bool:
    """One storage for all layers (the paged cache): a layer's share is the storage over the number of layers."""
    return hasattr(cache, "cache_tensor")


def cache_bytes(cache: Any) -> int:
    """Bytes of the distinct storages behind `cache`'s tensors (what it holds in memory)."""
    from .tracking import sum_storage_bytes

    return sum_storage_bytes(all_tensors(cache))


def offloading_without_cuda(cache: Any) -> bool:
    """An offloaded cache (``DynamicCache(offloading=True)``, ``cache_implementation="offloaded"``) on a torch build
    without CUDA: transformers' `Cache.update` calls ``torch.cuda.default_stream`` and fails with a bare
    "Torch not compiled with CUDA enabled" assertion."""
    caches = [cache] + _sub_caches(cache)
    return any(getattr(c, "offloading", False) for c in caches) and not torch.cuda.is_available()


OFFLOAD_ERROR = (
    "memopt: an offloaded KV cache (cache_implementation='offloaded', DynamicCache(offloading=True) or "
    "StaticCache(offloading=True)) needs CUDA: transformers moves each layer between the GPU and host memory on CUDA "
    "streams, and this torch build has no CUDA. On CPU the cache already lives in host memory: use the default "
    "dynamic cache (no cache_implementation), or run on a CUDA device."
)
