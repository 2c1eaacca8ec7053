"""8-bit layers keep nothing for backward but their frozen weight: bitsandbytes' MatMul8bitLt / MatMul8bitFp keep
their input as a ctx attribute, which activation checkpointing cannot drop (regression tests for issue 16, part 3)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import memopt
from memopt._patch import uninstall

pytest.importorskip("bitsandbytes")
from memopt.transforms.quant import _Int8NoInput  # noqa: E402


def _llama(hidden: int = 128, layers: int = 2):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _batch(seq: int = 16):
    ids = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _apply(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memopt.apply(model, **kw)


def _bitsandbytes_own(model):
    """The same model running bitsandbytes' own 8-bit forward (what memopt did before)."""
    for module in model.modules():
        uninstall(module, _Int8NoInput)
    return model


def test_loss_and_gradients_are_bitsandbytes_own():
    model = _apply(_llama(), quant="8bit", lora=4, checkpoint=True)
    ref = _bitsandbytes_own(copy.deepcopy(model))
    assert sum(isinstance(m.__dict__.get("forward"), _Int8NoInput) for m in model.modules()) == 14
    out = []
    for m in (model, ref):
        loss = m(**_batch()).loss
        loss.backward()
        out.append((loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys() and out[0][1]
    for name, g in out[0][1].items():
        assert torch.equal(g, out[1][1][name]), name


def test_trainable_bias_and_input_gradients_on_3d_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    _apply(model, quant="8bit")
    x = torch.randn(2, 8, 64, requires_grad=True)
    model(x).square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    dequant = [model[0].state, model[2].state]
    w = [s.CB.float() * s.SCB.float().unsqueeze(1) / 127 for s in dequant]
    with torch.no_grad():
        biases = [model[0].bias.detach().clone().requires_grad_(), model[2].bias.detach().clone().requires_grad_()]
    with torch.enable_grad():
        h = torch.relu(ref_x @ w[0].T + biases[0])
        (h @ w[1].T + biases[1]).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-4)
    assert model[0].bias.grad.shape == (128,)
    torch.testing.assert_close(model[0].bias.grad, biases[0].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[2].bias.grad, biases[1].grad, rtol=1e-4, atol=1e-4)


def test_with_checkpointing_the_8bit_inputs_are_freed():
    """Tracked on a small Llama, 8-bit + LoRA + full checkpointing: each block keeps only its input now, and the
    peak falls by what bitsandbytes kept (the 8-bit layers' inputs, counted once per storage)."""

    def step(model):
        model(**_batch(seq=64)).loss.backward()  # warm-up (LoRA gradients exist from here on, as in training)
        with memopt.track(model) as tracker:
            model(**_batch(seq=64)).loss.backward()
        return tracker.report()

    model = _apply(_llama(), quant="8bit", lora=4, checkpoint=True)
    ref = _bitsandbytes_own(copy.deepcopy(model))
    kept: dict[int, int] = {}  # storages of the 8-bit layers' inputs in one forward
    hooks = [m.register_forward_hook(lambda m, a, o: kept.__setitem__(a[0].untyped_storage()._cdata,
                                                                      a[0].untyped_storage().nbytes()))
             for m in ref.modules() if type(m).__name__ == "Linear8bitLt"]
    ref(**_batch(seq=64))
    for h in hooks:
        h.remove()
    ours, theirs = step(model), step(ref)
    block_input = 2 * 64 * 128 * 4
    for i in range(2):
        assert ours.rows(depth=3)[[r.name for r in ours.rows(depth=3)].index(f"model.layers.{i}")].activation_bytes \
            == block_input
    saved = theirs.peak_bytes - ours.peak_bytes
    assert saved >= 0.9 * (sum(kept.values()) - 2 * block_input), (saved, sum(kept.values()))


def test_eval_no_grad_and_pickling_are_unchanged():
    model = _apply(_llama(), quant="8bit")
    ref = _bitsandbytes_own(copy.deepcopy(model))
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model(**_batch()).logits, ref(**_batch()).logits)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(**_batch()).logits, ref(**_batch()).logits)
