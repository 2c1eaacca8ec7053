"""`memopt.estimate(..., mode="generate")`: the peak memory of generation with a given KV cache, on fake tensors.

What runs (the real model under `FakeTensorMode`, through the same `memopt.apply` and `memopt.track` as a measured
run, with the real transformers cache object of the kind asked for):

    prefill    ``batch`` prompts of ``prompt`` tokens into an empty cache, the logits of the last position only
               (as `generate` asks for them), their float32 copy and the next token
    decode     the cache grown (untracked) to ``prompt + new_tokens - 2`` tokens, then the last decode step: one
               token per sequence appended, every layer's keys and values read

The peak is the larger of the two; ``kv_cache_bytes`` the bytes of the cache object's tensors after the last step
(``prompt + new_tokens - 1`` tokens: the last token is never fed back), exactly what the tracker files as
``kv_cache`` at the end of ``model.generate``. The paged cache (continuous batching) is transformers'
`PagedAttentionCache` built on the meta device for the blocks the requests use, plus the static input/output
buffers and attention mask continuous batching allocates for ``max_batch_tokens``, plus the larger of one prefill
forward of ``max_batch_tokens`` tokens and one decode step reading every active sequence.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .._units import format_bytes, parse_bytes
from ..tracker import sum_storage_bytes, track
from ..tracker.kv_cache import OFFLOAD_ERROR, all_tensors
from .estimator import DEVICES, Estimate, _block_depth, dtype_from_name
from .fake_step import _adapters_stay_put, _call, _fake_like_meta, _fake_quantize, build_model, load_config
from .kv_cache import KVCacheConfig, blocks_needed, cache_shape, kv_cache_config, make_cache, paged_cache, with_blocks
from .profile import _cast_floating, check_positive_ints


@dataclass
class GenerateEstimate(Estimate):
    """`memopt.estimate(..., mode="generate")`'s result: an `Estimate` (``peak_bytes``, ``breakdown``, ``report``,
    ``weights_bytes``, ``kv_cache_bytes``, ``per_sequence_bytes``) with the generation's details.

    Attributes:
        kv_cache: the `KVCacheConfig` it ran with (paged: with the ``num_blocks`` used).
        prompt_len, new_tokens: per sequence (the longest of the requests for padded kinds).
        requests: the ``(prompt, new tokens)`` pairs given, else None.
        concurrent: sequences in memory at once.
        prefill_peak_bytes, decode_peak_bytes: the two peaks (``peak_bytes`` is the larger).
        cache: the cache's numbers: ``bytes`` (= ``kv_cache_bytes``), ``tokens`` it holds, ``bytes_per_token``,
            ``written_bytes`` (the bytes of those tokens in the model's dtype, or in the quantized layout),
            ``reserved_bytes`` and ``waste`` (reserved but never written: static's ``max_len`` per sequence, a
            paged sequence's last block), and for paged ``num_blocks``, ``page_size``, ``max_batch_tokens``.
        generate_kwargs: the keyword arguments of `model.generate` (paged: `model.generate_batch`) for this cache.
        vllm: the corresponding vLLM settings, where they map.
    """

    kv_cache: KVCacheConfig | None = None
    prompt_len: int = 0
    new_tokens: int = 0
    requests: list[tuple[int, int]] | None = None
    concurrent: int = 0
    prefill_peak_bytes: int = 0
    decode_peak_bytes: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    vllm: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["kv_cache"] = None if self.kv_cache is None else dict(self.kv_cache.__dict__)
        d["generate_kwargs"] = {k: _jsonable(v) for k, v in self.generate_kwargs.items()}
        return d

    def __str__(self) -> str:
        if self.kv_cache is None:  # a hand-written model: one forward, no transformers cache
            lines = [f"estimated peak: {format_bytes(self.peak_bytes)} (generate, one forward of {self.batch_size} x "
                     f"{self.seq_len} tokens, {self.device}, {self.dtype})"]
            lines += [f"  {cat:<12}{format_bytes(v):>12}" for cat, v in self.breakdown.items()]
            lines.append(f"  weights {format_bytes(self.weights_bytes)}; {format_bytes(self.per_sequence_bytes or 0)} "
                         "per sequence besides them; KV cache not told apart")
            return "\n".join(lines + [f"  note: {n}" for n in self.notes])
        kind = self.kv_cache.kind
        what = (f"{len(self.requests)} requests, {self.concurrent} at a time" if self.requests else
                f"{self.concurrent} x ({self.prompt_len} prompt + {self.new_tokens} new tokens)")
        lines = [f"estimated peak: {format_bytes(self.peak_bytes)} (generate, {kind} KV cache, {self.device}, "
                 f"{self.dtype}, {what})",
                 f"  prefill peak {format_bytes(self.prefill_peak_bytes)}, last decode step "
                 f"{format_bytes(self.decode_peak_bytes)}"]
        lines += [f"  {cat:<12}{format_bytes(v):>12}" for cat, v in self.breakdown.items()]
        c = self.cache
        lines.append(f"  weights {format_bytes(self.weights_bytes)}; KV cache {format_bytes(self.kv_cache_bytes or 0)}"
                     f" for {c.get('tokens', 0):,} tokens ({c.get('bytes_per_token', 0):,.1f} B/token)"
                     f", {format_bytes(self.per_sequence_bytes or 0)} per concurrent sequence")
        if c.get("reserved_bytes"):
            lines.append(f"  reserved {format_bytes(c['reserved_bytes'])}, written {format_bytes(c['written_bytes'])}"
                         f": {100 * c['waste']:.1f}% never written")
        opts = ", ".join(f"{k}={_short(v)}" for k, v in self.generate_kwargs.items()) or "defaults"
        lines.append(f"  model.{'generate_batch' if kind == 'paged' else 'generate'}({opts})")
        lines.append(f"  vLLM: {self.vllm}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _short(v: Any) -> str:
    """A generate keyword's value as code; a ContinuousBatchingConfig with only what memopt set."""
    if type(v).__name__ == "ContinuousBatchingConfig":
        set_ = {k: getattr(v, k) for k in ("page_size", "num_blocks", "max_batch_tokens")}
        return "ContinuousBatchingConfig(" + ", ".join(f"{k}={x}" for k, x in set_.items() if x is not None) + ")"
    return repr(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "to_dict"):
        return {k: x for k, x in v.to_dict().items() if isinstance(x, (int, float, str, bool, type(None)))}
    return repr(v)


def _requests(requests: Any) -> list[tuple[int, int]]:
    out = []
    try:
        for r in requests:
            p, n = r
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in (p, n)):
                raise ValueError
            out.append((p, n))
    except (TypeError, ValueError):
        raise ValueError(f"requests={requests!r} must be a list of (prompt tokens, new tokens) pairs of positive "
                         "ints") from None
    if not out:
        raise ValueError("requests=[] has no request; give at least one (prompt tokens, new tokens) pair")
    return out


def _apply_takes_kv_heads() -> bool:
    from .. import apply

    return "kv_heads" in inspect.signature(apply).parameters


def _with_kv_heads(config, kv_heads: int):
    """The config of the model converted to `kv_heads` key/value heads (the GQA conversion's shapes)."""
    heads = getattr(config, "num_attention_heads", None)
    k = 1 if kv_heads == "mqa" else kv_heads
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not heads or heads % k:
        raise ValueError(f"kv_heads={kv_heads!r} must be a positive int dividing num_attention_heads={heads}")
    config = config.__class__.from_dict(config.to_dict())
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // heads
    config.num_key_value_heads = k
    return config


def _standin_quantized_cache(kv: KVCacheConfig, config):
    """int4/int2 on fake tensors: hqq and quanto search their scales with data-dependent loops fake tensors cannot
    run, so each layer is transformers' own `QuantizedLayer` (residual window, flushes) whose quantized states hold
    exactly the backends' storage: ``numel x nbits / 8`` packed bytes and a scale and a zero point per
    ``group_size`` values in the cache's dtype; dequantizing makes the full-precision temporary."""
    from transformers.cache_utils import Cache, QuantizedLayer

    from .kv_cache import _text

    class StandIn(QuantizedLayer):
        def _quantize(self, tensor, axis):
            n = tensor.numel()
            groups = -(-n // self.q_group_size)
            meta = {"scale": torch.empty(groups, 1, dtype=tensor.dtype), "zero": torch.empty(groups, 1, dtype=tensor.dtype),
                    "shape": tuple(tensor.shape)}
            return torch.empty(-(-n * self.nbits // 8), dtype=torch.uint8), meta

        def _dequantize(self, q):
            _, meta = q
            return torch.empty(meta["shape"], dtype=meta["scale"].dtype)

    layers = [StandIn(nbits=kv.nbits, q_group_size=kv.group_size, residual_length=kv.residual_length)
              for _ in range(_text(config).num_hidden_layers)]
    return Cache(layers=layers)


def _step(net: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward as `generate` makes it: the last position's logits, their float32 copy, the greedy token."""
    out = net(input_ids=ids, attention_mask=mask, cache=cache, use_cache=cache is not None, logits_to_keep=1)
    logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
    return logits.argmax(-1)


def _paged_buffers(kv: KVCacheConfig, config, dtype: torch.dtype, reqs: list[tuple[int, int]]) -> tuple[Any, int]:
    """transformers' paged cache (meta) and the bytes of the static buffers continuous batching allocates beside it
    (inputs, outputs, cache indices, the attention mask), built by its own code on the meta device."""
    from transformers.generation import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList
    from transformers.generation.continuous_batching.distributed import DistributedHelper
    from transformers.generation.continuous_batching.initialization import (resolve_continuous_batching_config,
                                                                            update_cb_config_after_cache_creation)
    from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
    from transformers.generation.continuous_batching.utils import WorkloadHints
    from transformers.generation.logits_process import LogitsProcessorList

    from .kv_cache import _any_memory, _text

    text = _text(config)
    meta = torch.device("meta")
    cb = ContinuousBatchingConfig(page_size=kv.page_size, num_blocks=kv.num_blocks, max_batch_tokens=kv.max_batch_tokens)
    try:
        hints = WorkloadHints(max_prompt_length=max(p for p, _ in reqs), max_generated_length=max(n for _, n in reqs),
                              num_requests=len(reqs))
        cb = resolve_continuous_batching_config(text, cb, hints, has_logit_processors=False, device=meta)
        with _any_memory():
            cache = PagedAttentionCache(text, cb, meta, DistributedHelper(None, None), dtype=dtype)
        update_cb_config_after_cache_creation(cb, cache.num_blocks, cache.max_batch_tokens)
        ios = ContinuousBatchingIOs(cache, text, cb, meta, dtype, ContinuousBatchingLogitsProcessorList(
            LogitsProcessorList()))
        tensors = [v for v in vars(ios).values() if isinstance(v, torch.Tensor)]
        tensors += [t for v in vars(ios).values() if isinstance(v, dict) for t in v.values()
                    if isinstance(t, torch.Tensor)]
        return cache, sum_storage_bytes(tensors)
    except Exception:  # another transformers version: the cache alone, and its mask as transformers sizes it
        cache = paged_cache(kv, config, dtype)
        m = cache.max_batch_tokens
        return cache, m * (cache.max_tokens_read + m) * dtype.itemsize


def estimate_generate(
    model: Any,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    inputs: Callable[[], Any] | None = None,
    dtype: Any = None,
    device: str = "cuda",
    attention: Any = "sdpa",
    quant: Any = None,
    lora: Any = None,
    kv_cache: Any = None,
    new_tokens: int | None = None,
    requests: Any = None,
    max_concurrent_sequences: int | None = None,
    kv_heads: Any = None,
) -> GenerateEstimate:
    """`memopt.estimate(..., mode="generate")`; see `memopt.estimate` for the arguments."""
    started = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .. import apply as memopt_apply
    from ..config import quant_config

    kv = kv_cache_config(kv_cache)
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; use 'cuda' or 'cpu'")
    if kv.kind == "offloaded" and device != "cuda":
        raise ValueError(f"kv_cache='offloaded' with device={device!r}: {OFFLOAD_ERROR.removeprefix('memopt: ')}")
    kv.resolved_backend()  # a missing backend raises here, naming the extra
    check_positive_ints(batch_size=batch_size, seq_len=seq_len)
    check_positive_ints(True, new_tokens=new_tokens, max_concurrent_sequences=max_concurrent_sequences)
    reqs = _requests(requests) if requests is not None else None
    if kv.kind == "paged" and reqs is None:  # one batch of equal sequences, as a list of requests
        n = new_tokens or 1
        reqs = [(max(1, seq_len - n), n)] * (max_concurrent_sequences or batch_size)
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    qconfig = quant_config(quant)
    notes: list[str] = []

    if callable(model) and not isinstance(model, (str, Path)) and not hasattr(model, "to_dict"):
        builder, config = model, None
    else:
        builder, config = None, load_config(model)
        if dtype is None:
            dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
            dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    converted_by_apply = kv_heads is not None and _apply_takes_kv_heads()
    if kv_heads is not None and not converted_by_apply:
        if config is None:
            raise ValueError("kv_heads= with a model callable needs memopt.apply(kv_heads=...); pass a config")
        config = _with_kv_heads(config, kv_heads)
        notes.append(f"kv_heads={kv_heads}: the model built from its config with num_key_value_heads="
                     f"{config.num_key_value_heads} (the shapes of the GQA conversion)")

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        if builder is not None:
            net = builder()
            if not isinstance(net, nn.Module):
                raise TypeError(f"estimate(model=<callable>) must build an nn.Module, got {type(net).__name__}")
            if dtype is not None:  # Module.to cannot swap fake parameters: cast copies, ties kept
                _cast_floating(net, dtype)
            config = getattr(net, "config", None)
        else:
            net = build_model(config, "meta", dtype)
            _fake_like_meta(net)
        dtype = dtype or next(net.parameters()).dtype
        if converted_by_apply:  # first, as memopt.apply orders it: before the quantization stand-ins
            memopt_apply(net, kv_heads=kv_heads, attention=None)
            config = net.config
        if qconfig is not None:
            done, skipped = _fake_quantize(net, qconfig)
            notes.append(f"quant={qconfig.name!r}: {done} layers stood in by bitsandbytes' exact storage layout "
                         f"({skipped} skipped); matmuls dequantize to a temporary")
        options = {k: v for k, v in dict(attention=attention, lora=lora).items() if v is not None or k == "attention"}
        with _adapters_stay_put(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memopt_apply(net, **options)
        if qconfig is not None:
            options = {"quant": quant, **options}
        if kv_heads is not None:
            options = {"kv_heads": kv_heads, **options}
        net.eval()
        round_to = 512 if device == "cuda" else None
        shape = cache_shape(config) if config is not None else None
        if shape is None or not hasattr(net, "generate"):
            return _prefill_only(net, inputs, batch_size, seq_len, round_to, options, device, dtype, notes, started)

        vocab = getattr(config, "vocab_size", None) or 1000
        if kv.kind == "paged":
            est = _paged(net, config, kv, reqs, max_concurrent_sequences, dtype, vocab, round_to, notes)
        else:
            if reqs is not None:  # a padded batch: every sequence as long as the longest
                batch = max_concurrent_sequences or len(reqs)
                prompt, new = max(p for p, _ in reqs), max(n for _, n in reqs)
                written = sum(p + n - 1 for p, n in reqs[:batch])
                notes.append(f"{len(reqs)} requests padded to {prompt} prompt + {new} new tokens, {batch} at a time")
            else:
                batch = max_concurrent_sequences or batch_size
                new = new_tokens or 1
                prompt = max(1, seq_len - new)
                written = batch * (prompt + new - 1)
            est = _contiguous(net, config, kv, batch, prompt, new, written, dtype, vocab, round_to, notes, device)
    est.update(options=options, device="cuda" if device == "cuda" else "cpu", dtype=str(dtype).replace("torch.", ""),
               seq_len=seq_len if reqs is None else max(p + n for p, n in reqs), notes=notes,
               seconds=time.perf_counter() - started, table_depth=_block_depth(net), requests=reqs,
               generate_kwargs=est["kv_cache"].generate_kwargs(), vllm=est["kv_cache"].vllm(dtype))
    est["report"].device = f"{device} (estimate)"
    if device == "cuda":
        notes.append("CUDA: storages counted in 512-byte allocator blocks; the CUDA context (~0.5 GiB) and "
                     "fragmentation come on top")
    return GenerateEstimate(**est)


def _batch_shape(batch: Any) -> tuple[int, int] | None:
    """(batch, tokens) of the first tensor of at least two dimensions in an inputs batch (a tensor, a tuple/list or a
    dict of them), None when there is none."""
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for t in items:
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0]), int(t.shape[1])
    return None


def _prefill_only(net, inputs, batch_size, seq_len, round_to, options, device, dtype, notes, started):
    """A model without a transformers cache (a hand-written nn.Module): one forward of the batch `inputs()` returns
    (its own cache, if any, inside); batch and length are read from that batch."""
    if inputs is None:
        raise ValueError("estimate(mode='generate') of a model without a transformers config needs inputs=<callable "
                         "returning the prompt batch>")
    batch = inputs()
    shape = _batch_shape(batch)
    if shape is not None:
        batch_size, seq_len = shape
    with torch.no_grad(), track(net, round_to=round_to) as tracker:
        _call(net, batch)
    report = tracker.report()
    weights = report.total("param_bytes")
    notes.append("not a transformers model: one forward of the batch inputs() returns (a model without a KV cache, "
                 "as nanoGPT's generate, peaks at its longest context: pass prompt + new tokens); a KV cache of its "
                 "own, if any, is not told apart")
    per_seq = max(1, (report.peak_bytes - weights) // batch_size)
    report.device = f"{device} (estimate)"
    return GenerateEstimate(peak_bytes=report.peak_bytes, breakdown=dict(report.peak_breakdown), report=report,
                            options=options, optimizer="none", device="cuda" if device == "cuda" else "cpu",
                            dtype=str(dtype).replace("torch.", ""), batch_size=batch_size, seq_len=seq_len,
                            mode="generate", weights_bytes=weights, kv_cache_bytes=None, per_sequence_bytes=per_seq,
                            seconds=time.perf_counter() - started, notes=notes, concurrent=batch_size,
                            prompt_len=seq_len, prefill_peak_bytes=report.peak_bytes, table_depth=_block_depth(net))


def _ids(batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, vocab, (batch, length)), torch.ones(batch, length, dtype=torch.long)


def _contiguous(net, config, kv: KVCacheConfig, batch: int, prompt: int, new: int, written_tokens: int,
                dtype: torch.dtype, vocab: int, round_to, notes: list[str], device: str) -> dict[str, Any]:
    """dynamic, static, quantized (and offloaded, from dynamic): the prefill and the last decode step, tracked."""
    # generate sizes a static cache for max_length - 1 tokens: the last one is never fed back
    cache = (_standin_quantized_cache(kv, config) if kv.kind in ("int4", "int2")
             else make_cache(kv, config, max_len=prompt + new - 1))
    with torch.no_grad():
        with track(net, round_to=round_to) as tracker:
            ids, mask = _ids(batch, prompt, vocab)
            _step(net, ids, mask, cache)
        prefill = tracker.report()
        length = prompt
        grow = new - 2  # decode steps before the last, appended here in chunks the cache ends in the same layout
        if grow > 0:
            residual = grow % kv.residual_length if kv.kind in ("int4", "int2") else 0
            for chunk in (grow - residual, residual):
                if chunk:
                    ids, _ = _ids(batch, chunk, vocab)
                    _step(net, ids, torch.ones(batch, length + chunk, dtype=torch.long), cache)
                    length += chunk
        if new > 1:
            with track(net, round_to=round_to) as tracker:
                full = torch.ones(batch, length + 1, dtype=torch.long)  # generate's attention mask and input ids
                ids = torch.zeros(batch, length + 1, dtype=torch.long)
                _step(net, ids[:, -1:], full, cache)
            decode = tracker.report()
        else:
            decode = prefill
    kv_bytes = sum_storage_bytes(all_tensors(cache))
    report = decode if decode.peak_bytes >= prefill.peak_bytes else prefill
    peak, breakdown = report.peak_bytes, dict(report.peak_breakdown)
    layers, kv_heads, head_dim = cache_shape(config)
    tokens = batch * (prompt + new - 1)
    full_bytes = 2 * layers * kv_heads * head_dim * dtype.itemsize  # one token in the model's dtype
    if kv.kind == "static":
        cache_info = {"reserved_bytes": kv_bytes, "written_bytes": written_tokens * full_bytes}
    elif kv.kind in ("dynamic", "offloaded") and written_tokens < tokens:  # a padded batch
        cache_info = {"reserved_bytes": kv_bytes, "written_bytes": written_tokens * full_bytes}
    else:
        cache_info = {"reserved_bytes": 0, "written_bytes": kv_bytes}
    if kv.kind == "offloaded":  # on the GPU: the layer computed and the one prefetched (transformers' Cache.update)
        on_host = kv_bytes - 2 * kv_bytes // layers
        if report is decode:
            peak -= on_host
            breakdown["kv_cache"] -= on_host
        notes.append(f"offloaded: {format_bytes(on_host)} of the KV cache in host memory, two layers "
                     f"({format_bytes(2 * kv_bytes // layers)}) on the GPU at a time (modelled: the fake step ran "
                     "the dynamic cache)")
    if kv.kind in ("int4", "int2"):
        notes.append(f"{kv.kind}: each layer's quantized states stood in by {kv.resolved_backend()}'s storage layout "
                     f"(packed values, a scale and a zero point per {kv.group_size} values) in transformers' "
                     "QuantizedLayer (hqq and quanto search their scales in data-dependent loops)")
    if kv.quantized:
        notes.append(f"{kv.kind} KV cache ({kv.resolved_backend()}"
                     + ("" if kv.kind == "fp8" else f", group {kv.group_size}, residual {kv.residual_length} tokens in "
                        f"{str(dtype).replace('torch.', '')}") + f"): {kv_bytes / tokens:,.1f} B/token against "
                     f"{full_bytes:,} in {str(dtype).replace('torch.', '')}")
    reserved = cache_info["reserved_bytes"]
    return dict(peak_bytes=peak, breakdown=breakdown, report=report, options={}, optimizer="none", device=device,
                dtype="", batch_size=batch, seq_len=prompt + new, mode="generate",
                weights_bytes=report.total("param_bytes"), kv_cache_bytes=kv_bytes,
                per_sequence_bytes=max(1, kv_bytes // batch), kv_cache=kv, prompt_len=prompt, new_tokens=new,
                concurrent=batch, prefill_peak_bytes=prefill.peak_bytes, decode_peak_bytes=decode.peak_bytes,
                cache=dict(bytes=kv_bytes, tokens=tokens, bytes_per_token=kv_bytes / tokens,
                           written_bytes=cache_info["written_bytes"], reserved_bytes=reserved,
                           waste=(1 - cache_info["written_bytes"] / reserved) if reserved else 0.0))


def _paged(net, config, kv: KVCacheConfig, reqs: list[tuple[int, int]], concurrent: int | None,
           dtype: torch.dtype, vocab: int, round_to, notes: list[str]) -> dict[str, Any]:
    """continuous batching: the paged cache and its buffers as transformers sizes them, and the larger of a prefill
    forward of max_batch_tokens tokens and a decode step reading every active sequence."""
    c = min(concurrent or len(reqs), len(reqs))
    used = blocks_needed(reqs, kv.page_size, c)
    kv = with_blocks(kv, kv.num_blocks or used)
    cache, buffers = _paged_buffers(kv, config, dtype, reqs)
    reserved = cache.cache_tensor.numel() * cache.cache_tensor.element_size()
    m = cache.max_batch_tokens
    active = reqs[:c]
    with torch.no_grad():
        with track(net, round_to=round_to) as tracker:  # a prefill batch: the prompts packed into one row
            ids, mask = _ids(1, max(1, min(m, sum(p for p, _ in active))), vocab)
            _step(net, ids, mask, None)
        prefill = tracker.report()
        prompts = sum(p for p, _ in active)
        # a step reading the prompts in (up to max_batch_tokens of them, beside a token of each decoding sequence)
        # against the prompts cached so far, and a decode step (a token per sequence) against every active
        # sequence's cache; the keys and values read back: a dynamic cache stands in, not counted
        work = []
        for query, read in ((min(m, prompts + c), min(prompts, cache.max_tokens_read)),
                            (min(m, c), min(sum(p + n - 2 for p, n in active), cache.max_tokens_read))):
            dyn = make_cache(KVCacheConfig("dynamic"), config)
            if read > 0:
                ids, mask = _ids(1, read, vocab)
                _step(net, ids, mask, dyn)
            with track(net, round_to=round_to) as tracker:
                ids, mask = _ids(1, max(1, query), vocab)
                _step(net, ids, torch.ones(1, read + ids.shape[1], dtype=torch.long), dyn)
            r = tracker.report()
            work.append((r.peak_bytes - r.total("param_bytes") - sum_storage_bytes(all_tensors(dyn)), r))
        work_decode, decode = max(work, key=lambda w: w[0])
    weights = prefill.total("param_bytes")
    work_prefill = prefill.peak_bytes - weights
    report = prefill if work_prefill >= work_decode else decode
    peak = weights + reserved + buffers + max(work_prefill, work_decode)
    breakdown = dict.fromkeys(report.peak_breakdown, 0)
    breakdown.update(params=weights, kv_cache=reserved)
    breakdown["other"] = peak - weights - reserved  # the buffers and the step's working memory
    layers, kv_heads, head_dim = cache_shape(config)
    full_bytes = 2 * layers * kv_heads * head_dim * dtype.itemsize
    tokens = sum(p + n - 1 for p, n in active)
    written = tokens * full_bytes
    blocks_bytes = kv.num_blocks * kv.page_size * full_bytes
    notes.append(f"paged: {len(reqs)} requests, {c} at a time, use at most {used} blocks of {kv.page_size} tokens; "
                 f"the cache tensor ({kv.num_blocks} blocks, {format_bytes(reserved)} with transformers' sector "
                 f"alignment and two trash sectors) and continuous batching's buffers for max_batch_tokens={m} "
                 f"({format_bytes(buffers)}: inputs, outputs, indices, a {m} x {cache.max_tokens_read + m} attention "
                 f"mask) are allocated up front")
    return dict(peak_bytes=peak, breakdown=breakdown, report=report, options={}, optimizer="none", device="",
                dtype="", batch_size=c, seq_len=max(p + n for p, n in reqs), mode="generate",
                weights_bytes=weights, kv_cache_bytes=reserved,
                per_sequence_bytes=max(1, math.ceil(blocks_bytes / max(1, c))), kv_cache=kv,
                prompt_len=max(p for p, _ in reqs), new_tokens=max(n for _, n in reqs), concurrent=c,
                prefill_peak_bytes=prefill.peak_bytes + reserved + buffers,
                decode_peak_bytes=weights + work_decode + reserved + buffers,
                cache=dict(bytes=reserved, tokens=tokens, bytes_per_token=reserved / max(1, tokens),
                           written_bytes=written, reserved_bytes=reserved, waste=1 - written / reserved,
                           num_blocks=kv.num_blocks, blocks_used=used, page_size=kv.page_size,
                           max_batch_tokens=m, buffers_bytes=buffers))


def max_concurrent(est: GenerateEstimate, budget: Any) -> int:
    """Sequences of the estimate's length that fit `budget`: the weights, the working memory of the estimate's
    step, then one sequence's cache each (paged: its blocks)."""
    return est.max_concurrent_sequences(parse_bytes(budget))


# -- memopt.plan(..., mode="generate") ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Option:
    name: str
    kv_cache: str
    quant: str | None = None
    kv_heads: Any = None
    lossless: bool = True  # the model's outputs unchanged (up to rounding)
    cuda_only: bool = False


# In order of cost: what changes the outputs least, and runs fastest, first. Quantized caches dequantize every
# layer at every decode step (slower decoding); weight quantization changes the model; kv_heads changes it for good.
OPTIONS = (
    _Option("dynamic cache", "dynamic"),
    _Option("paged cache (continuous batching)", "paged"),
    _Option("offloaded cache (layers in host memory)", "offloaded", cuda_only=True),
    _Option("fp8 cache", "fp8", lossless=False),
    _Option("int4 cache", "int4", lossless=False),
    _Option("int2 cache", "int2", lossless=False),
    _Option("8-bit weights + int4 cache", "int4", quant="8bit", lossless=False),
    _Option("4-bit weights + int4 cache", "int4", quant="4bit", lossless=False),
    _Option("4-bit weights + int2 cache", "int2", quant="4bit", lossless=False),
)


@dataclass
class GeneratePlan:
    """What `memopt.plan(..., mode="generate")` chose: how many sequences of ``seq_len`` fit the budget at once, and
    how. ``memopt.apply(model, **plan.options)`` (weight quantization, kv_heads) then
    ``model.generate(..., **plan.generate_kwargs)`` (paged: ``model.generate_batch(prompts, **plan.generate_kwargs)``)
    with ``plan.sequences`` sequences at a time.

    Attributes:
        fits: at least one sequence fits (and ``sequences >= target`` when a target was given).
        name, kv_cache (`KVCacheConfig`; paged with ``num_blocks`` sized from the budget), options, sequences,
        estimate (the `GenerateEstimate` at ``sequences``), generate_kwargs, vllm (the vLLM engine arguments that
        correspond: ``block_size``, ``gpu_memory_utilization``, ``kv_cache_dtype``, ``max_num_seqs``,
        ``max_model_len``, ``num_gpu_blocks_override``, ``quantization``), tried: ``[(name, sequences)]``.
    """

    fits: bool
    budget_bytes: int
    name: str
    kv_cache: KVCacheConfig
    options: dict[str, Any]
    sequences: int
    seq_len: int
    new_tokens: int
    target: int | None
    estimate: GenerateEstimate | None
    generate_kwargs: dict[str, Any]
    vllm: dict[str, Any]
    tried: list[tuple[str, int]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "budget_bytes": self.budget_bytes, "name": self.name,
                "kv_cache": dict(self.kv_cache.__dict__), "options": {k: _jsonable(v) for k, v in self.options.items()},
                "sequences": self.sequences, "seq_len": self.seq_len, "new_tokens": self.new_tokens,
                "target": self.target, "generate_kwargs": {k: _jsonable(v) for k, v in self.generate_kwargs.items()},
                "vllm": self.vllm, "tried": self.tried, "notes": self.notes,
                "estimate": None if self.estimate is None else
                {k: v for k, v in self.estimate.to_dict().items() if k != "report"}}

    def __str__(self) -> str:
        lines = [f"budget {format_bytes(self.budget_bytes)}, sequences of {self.seq_len} tokens "
                 f"({self.new_tokens} generated){f', target {self.target} at once' if self.target else ''}:"]
        lines += [f"  {n:>6} at once  {name}" for name, n in self.tried]
        if not self.fits:
            lines.append(f"nothing fits {'the target' if self.target and self.sequences else 'one sequence'}: the most "
                         f"is {self.sequences} ({self.name}); lower seq_len, or a bigger budget")
            return "\n".join(lines)
        e = self.estimate
        lines.append(f"plan: {self.name}: {self.sequences} sequences at once, peak {format_bytes(e.peak_bytes)} "
                     f"(weights {format_bytes(e.weights_bytes)}, KV cache {format_bytes(e.kv_cache_bytes or 0)})")
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if opts:
            lines.append(f"  memopt.apply(model, {opts})")
        call = "generate_batch(prompts, " if self.kv_cache.kind == "paged" else \
            f"generate(input_ids (batch {self.sequences}), "
        gk = ", ".join(f"{k}={_short(v)}" for k, v in self.generate_kwargs.items())
        lines.append(f"  model.{call}max_new_tokens={self.new_tokens}{', ' + gk if gk else ''})")
        lines.append("  vLLM: " + ", ".join(f"{k}={v!r}" for k, v in self.vllm.items()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fits(model, kv: KVCacheConfig, quant, kv_heads, n: int, seq_len: int, new: int, budget: int,
          kwargs: dict) -> GenerateEstimate:
    requests = [(max(1, seq_len - new), new)] * n if kv.kind == "paged" else None
    return estimate_generate(model, batch_size=n, seq_len=seq_len, new_tokens=new, requests=requests, kv_cache=kv,
                             quant=quant, kv_heads=kv_heads, **kwargs)


def _most(model, opt: _Option, kv: KVCacheConfig, seq_len: int, new: int, budget: int, kwargs: dict,
          cap: int) -> tuple[int, GenerateEstimate | None]:
    """The most sequences of this option under `budget`: two estimates give the fixed part and the cost of one more
    sequence, then the estimate at that count is checked (and stepped down while over)."""
    one = _fits(model, kv, opt.quant, opt.kv_heads, 1, seq_len, new, budget, kwargs)
    if one.peak_bytes > budget:
        return 0, one
    two = _fits(model, kv, opt.quant, opt.kv_heads, 2, seq_len, new, budget, kwargs)
    marginal = max(1, two.peak_bytes - one.peak_bytes)
    n = max(1, min(cap, 1 + (budget - one.peak_bytes) // marginal))
    est = two if n == 2 else one if n == 1 else _fits(model, kv, opt.quant, opt.kv_heads, n, seq_len, new, budget,
                                                       kwargs)
    while n > 1 and est.peak_bytes > budget:
        n = max(1, int(n * budget / est.peak_bytes))
        est = _fits(model, kv, opt.quant, opt.kv_heads, n, seq_len, new, budget, kwargs)
    return n, est


def plan_generate(model: Any, budget: Any = "24GiB", *, seq_len: int = 2048, new_tokens: int | None = None,
                  sequences: int | None = None, device: str = "cuda", kv_caches: Any = None, allow_quant: bool = True,
                  kv_heads: Any = None, page_size: int = 16, device_memory: Any = None, max_sequences: int = 4096,
                  **kwargs: Any) -> GeneratePlan:
    """`memopt.plan(model, budget, mode="generate", ...)`: how many sequences of `seq_len` tokens fit `budget` at
    once, and how.

    Without `sequences`: the most sequences with a cache that leaves the outputs as they are (dynamic, paged,
    offloaded on CUDA), the others listed beside it. With `sequences` (a target): the first option in order of cost
    (`OPTIONS`: lossless caches, fp8, int4, int2, then 8-/4-bit weights) that fits that many.

    Args:
        seq_len: tokens per sequence (prompt + generated); new_tokens: generated (default seq_len // 4).
        kv_caches: the cache kinds to consider (default all that run on `device` except ``"offloaded"``, which
            trades decoding speed and host memory for sequences: name it to have it considered).
        allow_quant: also consider 8-/4-bit weights (they change the model's outputs).
        kv_heads: an int (or list of ints) of key/value heads the model may be converted to (`memopt.apply(
            kv_heads=)`: changes the model for good, needs uptraining); tried after the rest.
        page_size: the paged cache's block size (vLLM's default 16).
        device_memory: the device's memory, for vLLM's ``gpu_memory_utilization`` (default: the budget).
        **kwargs: dtype, attention, as `memopt.estimate`.

    Cost: two to four `memopt.estimate` calls per option tried.
    """
    budget_bytes = parse_bytes(budget)
    new = new_tokens or max(1, seq_len // 4)
    if new >= seq_len:
        raise ValueError(f"new_tokens={new} must be below seq_len={seq_len} (the prompt needs a token)")
    kinds = None if kv_caches is None else {kv_cache_config(k).kind for k in
                                           ([kv_caches] if isinstance(kv_caches, (str, KVCacheConfig)) else kv_caches)}
    # offloading trades decoding speed (a host copy of every layer at every step) and host memory for sequences:
    # considered only when asked for
    options = [o for o in OPTIONS if (not o.cuda_only or device == "cuda") and (allow_quant or o.quant is None)
               and (o.kv_cache in kinds if kinds is not None else o.kv_cache != "offloaded")]
    for k in ([] if kv_heads is None else [kv_heads] if not isinstance(kv_heads, (list, tuple)) else kv_heads):
        options.append(_Option(f"kv_heads={k} + dynamic cache", "dynamic", kv_heads=k, lossless=False))
        options.append(_Option(f"kv_heads={k} + int4 cache", "int4", kv_heads=k, lossless=False))
    tried: list[tuple[str, int]] = []
    results: list[tuple[_Option, KVCacheConfig, int, GenerateEstimate | None]] = []
    kwargs = {"device": device, **kwargs}
    for opt in options:
        kv = KVCacheConfig(opt.kv_cache, page_size=page_size) if opt.kv_cache == "paged" else KVCacheConfig(opt.kv_cache)
        try:
            n, est = _most(model, opt, kv, seq_len, new, budget_bytes, kwargs, max_sequences)
        except ImportError as exc:  # a quantization backend not installed: say so, try the rest
            tried.append((f"{opt.name} (skipped: {exc})", 0))
            continue
        tried.append((opt.name, n))
        results.append((opt, kv, n, est))
        if sequences is not None and n >= sequences:
            break
    if not results:
        raise ValueError("no option could be estimated: " + "; ".join(name for name, _ in tried))
    if sequences is not None:
        chosen = next((r for r in results if r[2] >= sequences), max(results, key=lambda r: r[2]))
        fits = chosen[2] >= sequences
    else:
        lossless = [r for r in results if r[0].lossless] or results
        chosen = max(lossless, key=lambda r: r[2])
        fits = chosen[2] >= 1
    opt, kv, n, est = chosen
    if sequences is not None and fits and n > sequences:  # the target, not more: the estimate at the target
        n = sequences
        est = _fits(model, kv, opt.quant, opt.kv_heads, n, seq_len, new, budget_bytes, kwargs)
    notes: list[str] = []
    if kv.kind == "paged" and est is not None:  # the cache sized from the budget, not from free memory
        block = est.cache["reserved_bytes"] / max(1, est.cache["num_blocks"])
        spare = budget_bytes - est.peak_bytes
        kv = with_blocks(kv, est.cache["num_blocks"] + max(0, int(spare // block)))
        notes.append(f"paged: num_blocks={kv.num_blocks} fills the budget ({format_bytes(block)} per block of "
                     f"{kv.page_size} tokens); {n} sequences of {seq_len} tokens use {est.cache['blocks_used']}")
    memopt_options = {k: v for k, v in (("quant", opt.quant), ("kv_heads", opt.kv_heads)) if v is not None}
    generate_kwargs = kv.generate_kwargs() if est is not None else {}
    vllm = _vllm(kv, est, budget_bytes, device_memory, n, seq_len, opt.quant)
    if opt.kv_heads is not None:
        notes.append("kv_heads changes the model (pooled key/value heads): uptrain it before use")
    return GeneratePlan(fits, budget_bytes, opt.name, kv, memopt_options, n, seq_len, new, sequences, est,
                        generate_kwargs, vllm, tried, notes)


def _vllm(kv: KVCacheConfig, est: GenerateEstimate | None, budget: int, device_memory: Any, n: int, seq_len: int,
          quant: str | None) -> dict[str, Any]:
    """vLLM's engine arguments for the same job: it always pages (16-token blocks by default) and takes
    ``gpu_memory_utilization`` of the device for weights, activations and cache blocks."""
    total = parse_bytes(device_memory) if device_memory is not None else budget
    out: dict[str, Any] = kv.vllm(torch.float16)
    out["block_size"] = kv.page_size if kv.kind == "paged" else 16
    out["gpu_memory_utilization"] = round(min(0.95, budget / total), 3)  # vLLM's fraction of the whole device
    out["max_num_seqs"] = n
    out["max_model_len"] = seq_len
    if est is not None and est.cache.get("tokens") and kv.kind not in ("static", "offloaded"):
        per_token = est.cache["bytes"] / est.cache["tokens"]  # in the cache's own format (fp8: 1 byte a value)
        working = est.peak_bytes - est.weights_bytes - (est.kv_cache_bytes or 0)
        out["num_gpu_blocks_override"] = max(1, int((budget - est.weights_bytes - working)
                                                    // (per_token * out["block_size"])))
    if quant is not None:
        out["quantization"] = "bitsandbytes"
    return out
