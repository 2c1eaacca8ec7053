"""Problems found while writing the examples, fixed in memopt; each test is what must keep holding.

- bitsandbytes 0.50 repacks a 4-bit weight in place at its first eval() forward without grad on an AVX512-BF16 CPU,
  after which its matmul has no backward: LoRA's gradients through the layer were silently dropped. memopt turns
  the repack off on the layers it quantizes.
- a transformers task head (BertForSequenceClassification.classifier: new, untrained) was quantized and got LoRA;
  it is now a head: kept in full precision and, with LoRA, trained in full.
- memopt.track counted a view of a tensor made before tracking (a batch sliced out of an in-memory corpus) as a new
  allocation of its whole storage; gradients sharing one storage (FSDP2) were counted once per parameter.
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


def test_sequence_classification_head_is_not_quantized():
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    memopt.apply(model, quant="4bit")
    assert "classifier" in memopt.applied(model).skipped("quant")


def test_a_view_of_untracked_data_allocates_nothing():
    data = torch.zeros(250_000)  # 1,000,000 bytes, made before tracking
    model = nn.Linear(4, 4)
    with memopt.track(model) as tracker:
        start = tracker.live_bytes
        window = data[:4]
        assert tracker.live_bytes == start, f"{tracker.live_bytes - start} bytes counted for a view"
    del window


def test_gradients_sharing_one_storage_count_once():
    model = nn.Linear(4, 4)
    buf = torch.zeros(20)  # as FSDP2's reduce-scatter output: every gradient of a block views one buffer
    model.weight.grad = buf[:16].view(4, 4)
    model.bias.grad = buf[16:]
    with memopt.track(model) as tracker:
        pass
    assert tracker.report().layer("").grad_bytes == 80


def test_classifier_trains_in_full_with_lora():
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3)
    model = transformers.BertForSequenceClassification(config).to(torch.bfloat16)
    memopt.apply(model, quant="4bit", lora=4)
    assert "classifier" in memopt.applied(model).touched("lora:head")
    out = model(input_ids=torch.randint(0, 128, (2, 8)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.classifier.weight.dtype == torch.float32 and model.classifier.weight.grad is not None
