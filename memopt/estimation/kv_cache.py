"""The KV cache of generation: its size from a model's config."""

from __future__ import annotations

import torch


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int | None:
    """2 x layers x kv_heads x head_dim x seq_len x batch_size x bytes per element (GQA/MQA models with their own
    number of key/value heads); None when the config does not say its sizes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * seq_len * batch_size * torch.empty((), dtype=dtype).element_size()
