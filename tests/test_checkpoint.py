"""Activation checkpointing: same numbers as the unmodified model, less memory, proven recompute."""

from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
import torch.nn as nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

import memopt
from memopt.transforms.checkpoint import checkpointed
from models import ALL_MODELS, EXPECTED_BLOCKS, HF_MODELS, VOCAB, ResBlock, nanogpt, train_step

# Checkpointing alone, attention left as built, so every comparison isolates what checkpointing does
# (attention="sdpa" and its composition with checkpointing are tested in test_attention.py).
apply_ckpt = functools.partial(memopt.apply, attention=None)

POLICIES = {
    "full": True,
    "selective": "selective",
    "every2": 2,
    "offload": "offload",  # CPU: behaves as full
}


def _pair(name: str, dropout: float = 0.1):
    torch.manual_seed(0)
    model, batch, loss_fn = ALL_MODELS[name](dropout=dropout)
    return model, copy.deepcopy(model), batch, loss_fn




def _assert_same_step(ref, model, batch, loss_fn):
    ref_loss, ref_grads = train_step(ref, batch, loss_fn)
    loss, grads = train_step(model, batch, loss_fn)
    # The forward runs the same ops in the same order: bit-identical loss (dropout included, RNG state preserved).
    assert torch.equal(loss, ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        # Backward accumulates a tensor's gradient contributions (residual stream, tied weights) in the order the
        # autograd engine meets them, and the recompute changes that order: fp32 rounding, nothing more. (Bitwise
        # equality with transformers' own checkpointing is tested separately.)
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_same_loss_and_gradients(name, policy):
    model, ref, batch, loss_fn = _pair(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # offload on CPU says it behaves as full
        apply_ckpt(model, checkpoint=POLICIES[policy])
    _assert_same_step(ref, model, batch(0), loss_fn)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bert", "mixtral"])
def test_bitwise_equal_to_transformers_own_checkpointing(name):
    model, hf, batch, loss_fn = _pair(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_ckpt(model, checkpoint=True)
    hf_loss, hf_grads = train_step(hf, batch(0), loss_fn)
    loss, grads = train_step(model, batch(0), loss_fn)
    assert torch.equal(loss, hf_loss)
    for n in grads:
        assert torch.equal(grads[n], hf_grads[n]), n


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_blocks_found(name):
    model, *_ = ALL_MODELS[name]()
    apply_ckpt(model, checkpoint=True)
    blocks = memopt.applied(model).touched("checkpoint")
    assert len(blocks) == EXPECTED_BLOCKS[name]
    types = {type(model.get_submodule(fqn)) for fqn in blocks}
    assert len(types) <= 2, types  # T5: encoder and decoder blocks share one class; others one class
    if name in HF_MODELS:
        from transformers.modeling_layers import GradientCheckpointingLayer

        hf = {n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}
        assert set(blocks) == hf
    if name == "t5":
        assert any(b.startswith("encoder.") for b in blocks) and any(b.startswith("decoder.") for b in blocks)
    if name == "mixtral":  # the decoder layers, not the experts inside them
        assert all(fqn.startswith("model.layers.") and fqn.count(".") == 2 for fqn in blocks)


def test_nested_stacks_pick_the_inner_blocks_of_each_stage():
    # A stage list whose stages hold a ResBlock stack: containers are searched through, blocks are the ResBlocks.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(ResBlock(8), ResBlock(8)),
        nn.Sequential(ResBlock(8), ResBlock(8), ResBlock(8)),
        nn.Flatten(), nn.LazyLinear(4) if False else nn.Identity(),
    )
    apply_ckpt(model, checkpoint=True)
    assert list(memopt.applied(model).touched("checkpoint")) == ["1.0", "1.1", "2.0", "2.1", "2.2"]


class MutatingBlock(nn.Module):
    """Mutates matmul outputs in place (as ConvBERT and Funnel do), which selective checkpointing caches."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        h = self.a(x)
        h += 1.0
        h.mul_(0.5)
        return x + self.b(torch.tanh(h))


def test_selective_recomputes_outputs_mutated_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(*[MutatingBlock() for _ in range(3)])
    ref = copy.deepcopy(model)
    apply_ckpt(model, checkpoint="selective")
    x = torch.randn(4, 16)
    _assert_same_step(ref, model, {"x": x}, lambda m, b: m(b["x"]).pow(2).sum())


class Matmul3dInPlace(nn.Module):
    """Writes in place into a view of a kept matmul output (torch.matmul on batched inputs returns a view of a bmm
    result that has its own version counter), as Nystromformer does: PyTorch's own check cannot see it."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d)

    def forward(self, x):  # (B, T, d)
        ctx = torch.matmul(self.q(x), x.transpose(-1, -2)) @ x  # (B, T, d), a view of a bmm output
        ctx += x
        return self.out(torch.tanh(ctx))


def test_selective_recomputes_views_of_kept_outputs_written_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(Matmul3dInPlace(), Matmul3dInPlace())
    ref = copy.deepcopy(model)
    apply_ckpt(model, checkpoint="selective")
    _assert_same_step(ref, model, {"x": torch.randn(2, 5, 8)}, lambda m, b: m(b["x"]).square().mean())


@pytest.mark.parametrize("policy", [True, "selective"])
def test_buffers_updated_in_forward_are_updated_once(policy):
    # BatchNorm's running statistics: the recompute must neither update them again nor see them updated.
    model, ref, batch, loss_fn = _pair("resnet")
    apply_ckpt(model, checkpoint=policy)
    for _ in range(2):
        _assert_same_step(ref, model, batch(0), loss_fn)
        for (n, a), b in zip(ref.named_buffers(), model.buffers()):
            assert torch.equal(a, b), n


class RangeTracker(nn.Module):
    """Reassigns a buffer in forward and reads it (I-BERT's activation-range tracking)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("x_max", torch.ones(()))

    def forward(self, x):
        self.x_max = self.x_max * 0.5 + x.detach().abs().max() * 0.5  # running range, momentum 0.5
        return x + self.lin(x / self.x_max)


@pytest.mark.parametrize("policy", [True, "selective"])
def test_buffers_reassigned_in_forward_are_seen_by_the_recompute_as_by_the_forward(policy):
    torch.manual_seed(0)
    model = nn.Sequential(RangeTracker(), RangeTracker())
    ref = copy.deepcopy(model)
    apply_ckpt(model, checkpoint=policy)
    for seed in range(2):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)) * (seed + 2)
        _assert_same_step(ref, model, {"x": x}, lambda m, b: m(b["x"]).square().mean())
        for (n, a), b in zip(ref.named_buffers(), model.buffers()):
            assert torch.equal(a, b), n


class XlmStyleCache(nn.Module):
    """A stack whose layers get a transformers Cache object they write to, with no use_cache switch (XLM)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.attn = nn.ModuleList([KvLayer() for _ in range(2)])

    def forward(self, x):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, layer in enumerate(self.attn):
            x = layer(x, i, cache=cache)
        return x.square().mean()


class KvLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Linear(8, 8)

    def forward(self, x, i, cache=None):  # x: (B, T, 8)
        k = self.k(x).unsqueeze(1)  # (B, 1, T, 8)
        if cache is not None:
            k, _ = cache.update(k, k, i)
        return x + torch.softmax(x.unsqueeze(1) @ k.transpose(-1, -2), -1).squeeze(1) @ x


def test_cache_objects_are_not_written_twice_by_the_recompute():
    torch.manual_seed(0)
    model = XlmStyleCache()
    ref = copy.deepcopy(model)
    apply_ckpt(model, checkpoint=True, blocks="attn.*")
    model.train()
    loss = model(torch.randn(2, 4, 8))
    loss.backward()  # with the cache written twice, the recompute's keys would be 8 long, not 4: an error
    assert all(p.grad is not None for p in model.attn.parameters())
    assert ref  # the reference keeps its cache: eval/no-grad and unmodified models are not touched


def test_albert_shared_layer_is_checkpointed():
    import transformers

    config = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(config)
    ref = copy.deepcopy(model)
    apply_ckpt(model, checkpoint=True)
    assert list(memopt.applied(model).touched("checkpoint")) == ["albert.encoder.albert_layer_groups.0"]
    ids = torch.randint(0, VOCAB, (2, 16))
    _assert_same_step(ref, model, {"input_ids": ids, "labels": ids}, lambda m, b: m(**b).loss)


def test_every_n_checkpoints_blocks_0_n_2n():
    model, *_ = ALL_MODELS["llama"]()
    apply_ckpt(model, checkpoint=2)
    record = memopt.applied(model)
    assert list(record.touched("checkpoint")) == ["model.layers.0", "model.layers.2"]
    assert list(record.skipped("checkpoint")) == ["model.layers.1"]
    assert "every=2" in record.skipped("checkpoint")["model.layers.1"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "nanogpt"])
def test_state_dict_and_fqns_unchanged(name):
    model, ref, batch, loss_fn = _pair(name)
    modules_before = [n for n, _ in model.named_modules()]
    keys_before = list(model.state_dict())
    apply_ckpt(model, checkpoint=True)
    assert [n for n, _ in model.named_modules()] == modules_before
    assert list(model.state_dict()) == keys_before
    # A checkpointed model's state_dict loads into an unmodified one, and back, strictly.
    train_step(model, batch(0), loss_fn)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ref.load_state_dict(model.state_dict(), strict=True)
    fresh, *_ = ALL_MODELS[name]()
    apply_ckpt(fresh, checkpoint=True)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "nanogpt"])
def test_frozen_embeddings_and_frozen_inputs(name):
    model, ref, batch, loss_fn = _pair(name, dropout=0.0)
    for m in (model, ref):
        for n, p in m.named_parameters():
            if "wte" in n or "embed" in n or "word_embeddings" in n or "lm_head" in n:
                p.requires_grad_(False)
    apply_ckpt(model, checkpoint=True)
    _assert_same_step(ref, model, batch(0), loss_fn)
    _, grads = train_step(model, batch(0), loss_fn)
    first_block = next(iter(memopt.applied(model).touched("checkpoint")))
    # The first block's input comes from a frozen embedding (no requires_grad): its weights still get gradients.
    assert any(n.startswith(first_block + ".") for n in grads)


def test_frozen_block_inputs_with_lora_style_training():
    # Only a part inside the blocks trains (as with LoRA): gradients must still reach it through checkpointing.
    model, ref, batch, loss_fn = _pair("llama", dropout=0.0)
    for m in (model, ref):
        for n, p in m.named_parameters():
            p.requires_grad_("v_proj" in n)
    apply_ckpt(model, checkpoint=True)
    _assert_same_step(ref, model, batch(0), loss_fn)


def test_use_cache_off_in_training_and_back_for_generate():
    model, ref, batch, loss_fn = _pair("llama", dropout=0.0)
    model.config.use_cache = True
    apply_ckpt(model, checkpoint=True)
    b = batch(0)
    model.train()
    out = model(**b)
    assert out.past_key_values is None  # no cache kept alive (or written twice) in a checkpointed training step
    with pytest.warns(UserWarning, match="use_cache=True while training"):
        out = model(**b, use_cache=True)
    assert out.past_key_values is None
    model.eval()
    ref.eval()
    assert model(**b).past_key_values is not None  # eval keeps it
    ids = b["input_ids"][:1, :5]
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref_gen = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref_gen)
    model.train()
    with torch.no_grad():  # generating from a model left in train mode: no grad, so the cache is kept
        assert model(**b).past_key_values is not None


def _backward_flops(model, batch, loss_fn, train=True):
    model.train(train)
    loss = loss_fn(model, batch)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def _forward_flops(model, batch, loss_fn, train=True):
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch)
    return counter.get_total_flops()


def test_recompute_proven_by_flops():
    base, _, batch, loss_fn = _pair("llama", dropout=0.0)
    b = batch(0)
    results = {}
    for policy in ("none", "full", "selective", "every2"):
        model = copy.deepcopy(base)
        if policy != "none":
            apply_ckpt(model, checkpoint={"full": True, "selective": "selective", "every2": 2}[policy])
        results[policy] = (_forward_flops(model, b, loss_fn), _backward_flops(model, b, loss_fn))
    fwd, bwd = results["none"]
    assert all(f == fwd for f, _ in results.values())  # forward does the same work under every policy
    cfg, tokens = base.config, b["input_ids"].numel()
    head = 2 * tokens * cfg.hidden_size * cfg.vocab_size  # lm_head; embeddings and norms count 0 FLOPs
    down_proj = 2 * tokens * cfg.intermediate_size * cfg.hidden_size
    block_fwd = (fwd - head) // cfg.num_hidden_layers
    # Full: backward re-runs each block's forward, up to the last op backward needs: non-reentrant checkpointing
    # stops early and skips the final down_proj, whose output no backward formula uses.
    assert results["full"][1] == bwd + 3 * (block_fwd - down_proj)
    # Every 2nd of 3 blocks: blocks 0 and 2 are re-run.
    assert results["every2"][1] == bwd + 2 * (block_fwd - down_proj)
    # Selective keeps every matmul output: the recompute is elementwise only, no matmul FLOPs.
    assert results["selective"][1] == bwd


def test_eval_and_no_grad_pay_no_recompute():
    base, _, batch, loss_fn = _pair("llama", dropout=0.0)
    model = copy.deepcopy(base)
    apply_ckpt(model, checkpoint=True)
    b = batch(0)
    # eval() with grad (e.g. saliency maps): backward does not recompute.
    assert _backward_flops(model, b, loss_fn, train=False) == _backward_flops(base, b, loss_fn, train=False)
    with torch.no_grad():
        assert _forward_flops(model, b, loss_fn) == _forward_flops(base, b, loss_fn)


def _peak_bytes(model, batch, loss_fn) -> dict:
    """Peak of a forward+backward on CPU, by PyTorch's MemTracker, by category."""
    model.train()
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss_fn(model, batch).backward()
    peak = tracker.get_tracker_snapshot("peak")
    snapshot = next(iter(peak.values()))
    return {str(k).split(".")[-1]: v for k, v in snapshot.items()}


def _bench_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (2, 256))
    return model, {"input_ids": ids, "labels": ids}, lambda m, b: m(**b).loss


def test_peak_memory_falls_measured_by_memtracker():
    base, b, loss_fn = _bench_llama()
    peaks = {}
    for policy in (None, True, "selective", 2):
        model = copy.deepcopy(base)
        if policy is not None:
            apply_ckpt(model, checkpoint=policy)
        peaks[policy] = _peak_bytes(model, b, loss_fn)
    total = {k: v["Total"] for k, v in peaks.items()}
    act = {k: v["ACT"] for k, v in peaks.items()}
    assert total[True] < 0.6 * total[None], total
    assert total["selective"] < 0.85 * total[None], total
    assert total[True] < total[2] < total[None], total
    assert act[True] < 0.25 * act[None], act


def test_apply_twice_is_harmless_and_remove_undoes():
    base, _, batch, loss_fn = _pair("llama", dropout=0.0)
    b = batch(0)
    once = copy.deepcopy(base)
    apply_ckpt(once, checkpoint=True)
    twice = copy.deepcopy(base)
    apply_ckpt(twice, checkpoint=True)
    apply_ckpt(twice, checkpoint=True)
    assert _backward_flops(twice, b, loss_fn) == _backward_flops(once, b, loss_fn)  # not nested
    assert memopt.applied(twice).touched("checkpoint") == memopt.applied(once).touched("checkpoint")
    # A second apply with another policy replaces the first.
    apply_ckpt(twice, checkpoint="selective")
    assert all("selective" in d for d in memopt.applied(twice).touched("checkpoint").values())
    assert _backward_flops(twice, b, loss_fn) == _backward_flops(base, b, loss_fn)
    # apply(checkpoint=False) leaves existing checkpointing alone; remove() undoes it.
    apply_ckpt(twice, checkpoint=False)
    assert checkpointed(twice.model.layers[0])
    memopt.remove(twice)
    assert not any(checkpointed(m) for m in twice.modules())
    assert "forward" not in twice.model.layers[0].__dict__
    assert not memopt.applied(twice).touched()
    twice.train()
    assert twice(**b).past_key_values is not None  # the use_cache hook is gone too
    assert _backward_flops(twice, b, loss_fn) == _backward_flops(base, b, loss_fn)


def test_blocks_by_fqn_glob_class_and_predicate():
    model, *_ = nanogpt()
    apply_ckpt(model, checkpoint=True, blocks="transformer.h.*")
    assert list(memopt.applied(model).touched("checkpoint")) == [f"transformer.h.{i}" for i in range(3)]
    model, *_ = nanogpt()
    apply_ckpt(model, checkpoint=True, blocks=["transformer.h.0", "transformer.h.2"])
    assert list(memopt.applied(model).touched("checkpoint")) == ["transformer.h.0", "transformer.h.2"]
    model, *_ = nanogpt()
    from models import CausalSelfAttention

    apply_ckpt(model, checkpoint=True, blocks=CausalSelfAttention)
    assert list(memopt.applied(model).touched("checkpoint")) == [f"transformer.h.{i}.attn" for i in range(3)]
    model, *_ = nanogpt()
    apply_ckpt(model, checkpoint=memopt.CheckpointConfig(blocks=lambda name, m: name.endswith(".mlp")))
    assert list(memopt.applied(model).touched("checkpoint")) == [f"transformer.h.{i}.mlp" for i in range(3)]


def test_checkpointed_model_deepcopies_and_pickles():
    model, ref, batch, loss_fn = _pair("gpt2", dropout=0.1)
    apply_ckpt(model, checkpoint=True)
    clone = copy.deepcopy(model)
    assert clone.transformer.h[0].forward.module is clone.transformer.h[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert checkpointed(loaded.transformer.h[0])
    for m in (clone, loaded):
        _assert_same_step(ref, m, batch(0), loss_fn)


def test_offload_on_cpu_behaves_as_full_and_says_so_once():
    from memopt import _log

    _log._warned.discard("offload-cpu")
    model, *_ = nanogpt()
    with pytest.warns(UserWarning, match="behaves as checkpoint='full'") as record:
        apply_ckpt(model, checkpoint="offload")
    assert record[0].filename == __file__  # stacklevel points at the caller's apply()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_ckpt(nanogpt()[0], checkpoint="offload")  # once per process


@pytest.mark.gpu
def test_offload_on_cuda_moves_block_inputs_to_cpu():
    model, ref, batch, loss_fn = _pair("llama", dropout=0.0)
    model, ref = model.cuda(), ref.cuda()
    apply_ckpt(model, checkpoint="offload")
    b = {k: v.cuda() for k, v in batch(0).items()}
    _assert_same_step(ref, model, b, loss_fn)


def test_every_configuration_pickles_after_a_step():
    # selective (its op set), a padded transformers batch (the shared float mask), a blocks= predicate
    cases = [
        ("llama", dict(checkpoint="selective")),
        ("llama", dict(checkpoint=True)),
        ("nanogpt", dict(checkpoint=True, blocks=lambda name, m: name.endswith(".mlp"))),
    ]
    for name, kwargs in cases:
        model, ref, batch, loss_fn = _pair(name, dropout=0.0)
        memopt.apply(model, **kwargs)
        train_step(model, batch(0), loss_fn)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(train_step(loaded, batch(0), loss_fn)[0], train_step(model, batch(0), loss_fn)[0])
    assert memopt.applied(loaded).configs["checkpoint"].blocks == tuple(f"transformer.h.{i}.mlp" for i in range(3))


def test_remove_gives_transformers_own_checkpointing_back():
    model, *_ = ALL_MODELS["llama"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_ckpt(model, checkpoint=True)
    assert model.model.layers[0].gradient_checkpointing is False  # not nested inside memopt's
    memopt.remove(model)
    assert model.model.layers[0].gradient_checkpointing is True


def test_blocks_given_twice_is_an_error():
    model, *_ = nanogpt()
    with pytest.raises(ValueError, match=r"blocks= was given twice"):
        apply_ckpt(model, checkpoint=memopt.CheckpointConfig(blocks="transformer.h.*"), blocks="transformer.h.0")


def test_blocks_swapped_by_quantization_are_the_ones_checkpointed():
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)])
    memopt.apply(model, quant="8bit", checkpoint=True, blocks=nn.Linear, attention=None)
    assert all(checkpointed(model[i]) for i in range(3)) and type(model[0]).__name__ == "Linear8bitLt"


@pytest.mark.parametrize("hook_first", [True, False])
def test_accelerate_hooks_before_or_after_apply(hook_first):
    # device_map / offloading wrap forward in accelerate hooks; memopt's patches sit inside them either way.
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model, ref, batch, loss_fn = _pair("llama")
    layers = list(model.model.layers)
    if hook_first:
        for layer in layers:
            add_hook_to_module(layer, Count())
    apply_ckpt(model, checkpoint=True)
    if not hook_first:
        for layer in layers:
            add_hook_to_module(layer, Count())
    assert all(checkpointed(layer) for layer in layers)
    Count.calls = 0
    _assert_same_step(ref, model, batch(0), loss_fn)
    assert Count.calls == len(layers)  # the hook ran once per layer: outside the checkpoint, not again in recompute
    memopt.remove(model)
    assert not any(checkpointed(layer) for layer in layers)
    _assert_same_step(ref, model, batch(0), loss_fn)  # the accelerate hooks still work
    for layer in layers:
        remove_hook_from_module(layer)
        assert "_old_forward" not in layer.__dict__
    _assert_same_step(ref, model, batch(0), loss_fn)
