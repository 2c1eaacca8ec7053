"""`apply`, `applied`, `remove`: normalise the arguments to configs, check them all, then run the transforms in order.

The fixed order (lower first) and why:
    kv_heads (5) -> quantize (10) -> LoRA (20) -> attention (30) -> loss (35) -> checkpoint (40) -> offload (50)
Converting to fewer key/value heads pools float weights: before quantization (nothing to pool after it) and LoRA
(adapters sized for the old heads); `apply(kv_heads=)` after either is refused.
Quantization swaps Linear layers, so LoRA must see the quantized layers to wrap them; attention is rerouted inside
blocks whose identity does not change; the chunked loss patches the forward of the module that takes the labels
(the model, outside the blocks) and finds the output head after quantization and LoRA have had their say on it (a
head that either would change in the same call is refused when the plans are checked, before anything changes);
checkpointing comes after them because it only wraps the blocks' `forward` and must see their final contents;
activation offloading wraps the whole model's forward, outside everything, so it sees every tensor saved outside the
checkpointed regions (the chunked loss's included). Separate
`apply` calls give the same model in any order, except that quantization must come before (or with) LoRA:
quantizing after LoRA is refused, since it would quantize the adapters; and a head quantized or given adapters
after `loss="chunked"` makes the next training forward raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from . import transforms as _transforms  # noqa: F401  (registers the transforms)
from ._modules import uncompiled
from ._record import Applied, record_of
from ._registry import transform_for, transforms
from .config import (attention_config, checkpoint_config, kv_heads_config, lora_config, loss_config, offload_config,
                     quant_config,
                     with_blocks)


def apply(
    model: nn.Module,
    *,
    checkpoint: Any = False,
    attention: Any = "sdpa",
    quant: Any = None,
    lora: Any = None,
    loss: Any = None,
    blocks: Any = None,
    offload: Any = None,
    kv_heads: Any = None,
) -> nn.Module:
    """Make `model` train in less memory. Changes it in place and returns the same object.

    Args:
        model: any `nn.Module` (transformers or hand-written).
        checkpoint: activation checkpointing of the repeated blocks. ``False``/``None``: leave as is. ``True`` or
            ``"full"``: keep only each block's input, recompute the rest in backward (activation memory of the
            blocks falls to ``layers x batch x seq x hidden``; ~1 extra forward of compute). ``"selective"``: keep
            matmul/attention outputs, recompute norms/activations/dropout (less saving, recompute almost free). An int
            ``N``: checkpoint every N-th block. ``"offload"``: full, with the kept inputs in pinned CPU memory (CUDA).
            Or a `memopt.CheckpointConfig`.
        attention: ``"sdpa"`` (default) routes every attention through `scaled_dot_product_attention`, so no
            (batch, heads, seq, seq) matrix is kept for backward (O(seq) instead of O(seq^2) memory, same results):
            transformers models switch to their SDPA implementation, `nn.MultiheadAttention` takes its SDPA path,
            hand-written ``softmax(q @ k^T) @ v`` is recognised at runtime. ``None`` leaves attention alone. Or a
            `memopt.AttentionConfig`.
        quant: weights in 4 or 8 bits with bitsandbytes: ``"4bit"``/``"nf4"`` (NF4 + double quantization, compute in
            the model's dtype: ~4.13 bits per weight), ``"fp4"``, ``"8bit"`` (LLM.int8), or a `memopt.QuantConfig`.
            Quantized weights are frozen; the output head stays in full precision.
        lora: LoRA adapters with PEFT on every Linear-like layer (quantized ones included) but the output head, tied
            weights and nn.MultiheadAttention's projections: an int rank, or a `peft.LoraConfig`. Only the adapters train (float32), so gradients and optimizer state shrink to the
            adapters' size; base `state_dict` keys do not change.
        loss: ``"chunked"`` computes the output head and the cross-entropy chunk by chunk over tokens in training
            forwards given labels, so the (batch x seq x vocab) float32 logits, their softmax and their gradient
            never exist in full: peak memory falls by about 3 x 4 x tokens x vocab bytes, to one chunk's logits plus
            the head's gradients (kept from the forward, where they are computed, to backward). Same three head
            matmuls as the plain step, in chunks (no second head forward in backward). The outputs' ``logits`` are
            None in those forwards; without labels, in ``eval()`` or under ``no_grad`` the model is unchanged.
            transformers causal LMs are recognised; other models name their head and labels argument with a
            `memopt.LossConfig` (or `memopt.register_loss`), or call `memopt.chunked_cross_entropy` themselves.
        blocks: which modules are the blocks (FQN strings or globs, classes, or a predicate ``fn(name, module)``);
            default: found automatically.
        offload: ``True`` (or a `memopt.OffloadConfig`): in training forwards on CUDA, what autograd saves for
            backward outside checkpointed regions (with ``checkpoint=``: the blocks' inputs) waits in pinned host
            memory, copied on side streams that overlap compute. GPU memory loses those activations; each costs a
            copy each way. On a CPU-only machine it does nothing and warns once.
        kv_heads: convert the attention to this many key/value heads (GQA; ``1`` or ``"mqa"``: multi-query), in
            place and for good: each group of ``heads / kv_heads`` contiguous key/value projection heads is
            mean-pooled into one (or a `memopt.KVHeadsConfig` with ``pooling="first"``). The KV cache of generation
            and the key/value projections shrink to ``kv_heads / heads`` of multi-head attention's; the outputs
            change, so uptrain (a few % of the pre-training steps) before use. transformers models whose attention
            reads ``config.num_key_value_heads`` (the config is updated: the model saves and loads as a plain GQA
            checkpoint), or attention taught with `memopt.register_kv_heads`. Runs first, before quantization.

    Returns:
        `model`, changed in place. `memopt.applied(model)` says what was done to which layer. A model already
        compiled with ``torch.compile(model)`` is changed inside (its ``_orig_mod``); compile before or after,
        the compiled step traces every technique (see the ``:compile`` rows of `memopt.applied`).

    Raises:
        TypeError: `model` is not an `nn.Module`.
        ValueError: an option has an unknown value, or `blocks=` matched nothing, or no blocks were found, or
            `loss=` found no head it can use, or `kv_heads=` does not divide the heads or the model's attention
            cannot be converted. The model is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.apply expects an nn.Module, got {type(model).__name__}")
    target = uncompiled(model)
    _apply(target, checkpoint=checkpoint, attention=attention, quant=quant, lora=lora, loss=loss, blocks=blocks,
           offload=offload, kv_heads=kv_heads)
    return model


def _apply(model: nn.Module, *, checkpoint: Any, attention: Any, quant: Any, lora: Any, loss: Any,
           blocks: Any, offload: Any, kv_heads: Any) -> None:
    ckpt = checkpoint_config(checkpoint)
    if ckpt is None and blocks is not None:
        raise ValueError("blocks= was given but checkpoint= is off; pass checkpoint=True (or a policy) to use it")
    configs = [
        c
        for c in (
            kv_heads_config(kv_heads),
            quant_config(quant),
            lora_config(lora),
            attention_config(attention),
            loss_config(loss),
            None if ckpt is None else with_blocks(ckpt, blocks),
            offload_config(offload),
        )
        if c is not None
    ]

    # Check everything before changing anything: a bad option leaves the model untouched.
    plans = []
    for config in configs:
        transform = transform_for(config)
        plans.append((transform, config, transform.plan(model, config)))
    for transform, config, plan in plans:
        if transform.check is not None:
            transform.check(model, config, plan, [(c, p) for _, c, p in plans if c is not config])
    record = record_of(model, create=True)
    for transform, config, plan in sorted(plans, key=lambda tcp: tcp[0].order):
        entries = transform.apply(model, config, plan)
        if callable(getattr(config, "blocks", None)) and not isinstance(config.blocks, type):
            # a predicate would make the model unpicklable: keep the blocks it chose instead
            config = dataclasses.replace(config, blocks=tuple(e.fqn for e in entries if e.technique == transform.technique))
        record.replace(transform.technique, entries, config)


def applied(model: nn.Module) -> Applied:
    """What memopt did to `model`: every module touched and every module skipped, with the reason; the
    ``<technique>:compile`` rows say what each technique does under torch.compile."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.applied expects an nn.Module, got {type(model).__name__}")
    return record_of(uncompiled(model))


def remove(model: nn.Module) -> nn.Module:
    """Undo what can be undone (checkpointing, attention rerouting, the chunked loss); returns the model. Parameters are never
    touched: quantization and LoRA stay."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.remove expects an nn.Module, got {type(model).__name__}")
    target = uncompiled(model)
    record = record_of(target)
    for transform in transforms():
        if transform.remove is not None:
            transform.remove(target)
            record.replace(transform.technique, [], None)
    return model
