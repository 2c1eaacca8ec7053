"""Problems found while writing the examples, kept as expected failures until memopt handles them.

Each test is what should hold; the xfail reason says what happens instead. Remove the mark when it passes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memopt


def _avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


@pytest.mark.skipif(not _avx512bf16(), reason="bitsandbytes repacks 4-bit weights for inference only on AVX512-BF16 CPUs")
@pytest.mark.xfail(strict=True, reason=(
    "bitsandbytes 0.50 Linear4bit.forward, in eval() without grad on an AVX512-BF16 CPU, repacks the weight in place "
    "(packing_format_for_cpu) and from then on matmul_4bit runs gemv_4bit, which has no autograd kernel: after one "
    "evaluation the gradient through every 4-bit base layer is silently dropped (no bias) or the forward raises "
    "(bias). memopt could set support_avx512bf16_for_cpu = False on the layers it quantizes; the examples do it "
    "themselves (examples/finetune_causal_lm.py: no_inference_repack)."))
def test_4bit_lora_gradients_unchanged_by_an_evaluation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.ReLU(), nn.Linear(256, 256, bias=False), nn.ReLU(),
                          nn.Linear(256, 128, bias=False))
    memopt.apply(model, quant="4bit", lora=4, attention=None)
    x = torch.randn(16, 256)

    def grads() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(x)
    after = grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.xfail(strict=True, reason=(
    "memopt's head detection knows lm_head, the output embedding and tied weights, not a task head: "
    "BertForSequenceClassification.classifier (new, untrained, 384 -> num_labels) is quantized and gets LoRA. "
    "transformers' bitsandbytes integration keeps it (get_keys_to_not_convert: the last module) and peft's SEQ_CLS "
    "trains it in full (modules_to_save); bitsandbytes' CPU inference repack also asserts on its few outputs. "
    "examples/finetune_minilm_classifier.py passes QuantConfig(skip=('classifier',)) and LoRA targets without it."))
def test_sequence_classification_head_is_not_quantized():
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    memopt.apply(model, quant="4bit")
    assert "classifier" in memopt.applied(model).skipped("quant")


@pytest.mark.xfail(strict=True, reason=(
    "memopt.track counts the storage of an op's output the first time it sees it, so a view of a tensor made "
    "before tracking (a batch sliced out of an in-memory dataset on CPU) is counted as a new allocation of the "
    "whole storage, live until the tracker stops. Outputs of view ops (func.is_view / aliasing an input) should "
    "only be counted when their base is. The examples gather their batches instead of slicing them."))
def test_a_view_of_untracked_data_allocates_nothing():
    data = torch.zeros(250_000)  # 1,000,000 bytes, made before tracking
    model = nn.Linear(4, 4)
    with memopt.track(model) as tracker:
        start = tracker.live_bytes
        window = data[:4]
        assert tracker.live_bytes == start, f"{tracker.live_bytes - start} bytes counted for a view"
    del window
