"""offload=: saved activations to host memory and back. The memory and speed claims need CUDA (a gpu test and
`python benchmarks/fullft.py --cuda-proof`); on CPU the hooks are checked with the CPU standing in for the device."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.transforms import offload
from memopt.transforms.offload import OffloadActivations, offloading


def _llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _batch():
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _grads(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def cpu_as_device(monkeypatch):
    """Offload CPU tensors too (to fresh CPU copies): the hooks' bookkeeping runs as it would on CUDA."""
    monkeypatch.setattr(offload, "_DEVICES", ("cuda", "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_cpu_only_machine_does_nothing_and_warns_once():
    model = _llama()
    from memopt import _log

    _log._warned.discard("offload-no-cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memopt.apply(model, offload=True)
        memopt.apply(_llama(), offload=True)
    messages = [str(w.message) for w in caught if "offload" in str(w.message)]
    assert messages == ["offload=True does nothing on a machine without CUDA: saved activations already live in "
                        "host memory"]
    assert caught[0].filename == __file__  # stacklevel: the user's apply call
    assert memopt.applied(model).skipped("offload") == {"": "no CUDA device: activations already live in host memory"}
    from memopt._patch import find

    assert find(model, offload._Offloading) is None  # nothing installed (attention's kernel probe may be)


@pytest.mark.parametrize("options", [{}, {"checkpoint": True}, {"checkpoint": "selective"},
                                     {"checkpoint": True, "loss": "chunked"}])
def test_gradients_are_identical_with_offloading(cpu_as_device, options):
    base, batch = _llama(), _batch()
    loss_ref, ref = _grads(memopt.apply(copy.deepcopy(base), **options), batch)
    model = memopt.apply(copy.deepcopy(base), offload=True, **options)
    loss, grads = _grads(model, batch)
    assert torch.equal(loss, loss_ref)
    for name, g in ref.items():
        assert torch.equal(grads[name], g), name
    hooks = offloading(model)
    assert hooks is not None and hooks.offloaded > 0
    assert memopt.applied(model).touched("offload")


def test_with_checkpointing_the_block_inputs_are_what_goes(cpu_as_device):
    """Inside checkpointed blocks checkpoint's own hooks win: only what checkpointing keeps (each block's input)
    and what runs outside the blocks reach the offload hooks."""
    base, batch = _llama(), _batch()
    plain = memopt.apply(copy.deepcopy(base), offload=True)
    _grads(plain, batch)
    ckpt = memopt.apply(copy.deepcopy(base), offload=True, checkpoint=True)
    _grads(ckpt, batch)
    assert offloading(ckpt).offloaded < offloading(plain).offloaded / 3
    hidden = 2 * 16 * 64 * 4  # one block input, (batch, seq, hidden) fp32
    assert offloading(ckpt).offloaded_bytes >= 2 * hidden


def test_hooks_skip_parameters_small_tensors_and_copy_a_tensor_once(cpu_as_device):
    lin = nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    s = torch.ones(1, requires_grad=True)  # 4 bytes: under min_bytes
    with OffloadActivations(memopt.OffloadConfig(min_bytes=1024), keep=lin.parameters()) as hooks:
        h = x * 2  # a product with a constant saves nothing
        y = lin(h) + lin(h)  # h saved by both matmuls: copied once; the weight (a view of it) stays
        z = (y * y).sum() * s  # y saved twice by one op: once; the 4-byte sum and s stay
    assert hooks.offloaded == 2  # h, y
    assert hooks.offloaded_bytes == 2 * 32 * 64 * 4
    z.backward()
    ref_x, ref_s = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref_y = lin(ref_x * 2) + lin(ref_x * 2)
    ((ref_y * ref_y).sum() * ref_s).backward()
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(s.grad, ref_s.grad)


def test_retain_graph_unpacks_twice(cpu_as_device):
    x = torch.randn(64, 64, requires_grad=True)
    with OffloadActivations():
        y = (x.sin() * x.cos()).sum()
    y.backward(retain_graph=True)
    first = x.grad.clone()
    y.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_compiled_blocks_go_through_the_hooks(cpu_as_device):
    base, batch = _llama(), _batch()
    _, ref = _grads(memopt.apply(copy.deepcopy(base)), batch)
    model = memopt.apply(copy.deepcopy(base), offload=True)
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    _, grads = _grads(model, batch)
    assert offloading(model).offloaded > 0
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_and_no_grad_are_untouched_and_remove_undoes_it(cpu_as_device):
    model = memopt.apply(_llama(), offload=True)
    model.eval()
    with torch.no_grad():
        model(**_batch())
    assert offloading(model) is None  # no hooks were needed
    memopt.remove(model)
    assert "forward" not in model.__dict__
    assert not memopt.applied(model).touched("offload")


def test_bad_offload_values():
    model = _llama()
    with pytest.raises(ValueError, match=r"offload='yes' is not supported; use True, False, None or "
                                         r"memopt.OffloadConfig"):
        memopt.apply(model, offload="yes")
    with pytest.raises(ValueError, match=r"OffloadConfig\(min_bytes=-1\) must be a non-negative int"):
        memopt.OffloadConfig(min_bytes=-1)
    assert "forward" not in model.__dict__


@pytest.mark.gpu
def test_cuda_offload_lowers_the_peak_with_identical_gradients():
    base, batch = _llama().cuda(), {k: v.cuda() for k, v in _batch().items()}
    peaks, grads = [], []
    for options in ({}, {"offload": True}):
        model = memopt.apply(copy.deepcopy(base), **options)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _, g = _grads(model, batch)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        grads.append(g)
    assert peaks[1] < peaks[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g)
