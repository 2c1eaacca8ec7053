"""attention="sdpa": same numbers as eager attention, no (seq, seq) tensor kept for backward, linear memory."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

import memopt
from memopt.transforms.attention import sdpa_converted
from models import ALL_MODELS, SEQ, VOCAB, CausalSelfAttention, _ids, nanogpt, train_step


class DirectMHA(nn.Module):
    """Calls nn.MultiheadAttention directly with its default need_weights=True (materialises the weights)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids, targets, padding=None):
        x = self.embed(ids)
        out, weights = self.mha(x, x, x, key_padding_mask=padding)
        self.last_weights = weights
        return F.cross_entropy(self.head(out).flatten(0, 1), targets.flatten())


def direct_mha(dropout: float = 0.0):
    model = DirectMHA()

    def batch(seed=0, pad=True):
        padding = torch.zeros(2, SEQ, dtype=torch.bool)
        if pad:
            padding[1, -5:] = True
        return {"ids": _ids(seed), "targets": _ids(seed + 1), "padding": padding}

    return model, batch, lambda m, b: m(**b)


MODELS = {**ALL_MODELS, "direct_mha": direct_mha}
MODELS.pop("resnet")
ATTENTION_MODELS = list(MODELS)


def _pair(name):
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[name](dropout=0.0)
    return model, copy.deepcopy(model), batch, loss_fn




def _assert_close_to_eager(ref, model, batch, loss_fn):
    ref_loss, ref_grads = train_step(ref, batch, loss_fn)
    loss, grads = train_step(model, batch, loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    # Relative to the largest gradient: some gradients are exactly zero in exact arithmetic (a key bias shifts every
    # score of a query alike, and softmax ignores that), so both sides hold only rounding noise there.
    scale = max(g.abs().max() for g in ref_grads.values())
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5 * float(scale), msg=n)


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_same_loss_and_gradients_as_eager_with_padding(name):
    model, ref, batch, loss_fn = _pair(name)
    memopt.apply(model, attention="sdpa")
    _assert_close_to_eager(ref, model, batch(0), loss_fn)


def _saved_square(model, batch, loss_fn, seq: int) -> list[torch.Tensor]:
    """Tensors of shape (..., seq, seq) that autograd keeps for backward during a training forward."""
    saved = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-2:] == (seq, seq):
            saved.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, batch)
    loss.backward()
    return saved


def _unpadded(name, batch):
    b = batch(0)
    for key in ("attention_mask",):
        if key in b:
            b[key] = torch.ones_like(b[key])
    if "labels" in b and name != "t5":
        b["labels"] = b["input_ids"]
    if "padding" in b:
        b["padding"] = None
    if "mask" in b:
        b["mask"] = torch.zeros_like(b["mask"])
    return b


NO_SQUARE = ["llama", "mistral", "gpt2", "gpt_neox", "opt", "bert", "transformer_encoder", "direct_mha", "nanogpt"]


@pytest.mark.parametrize("name", NO_SQUARE)
def test_no_seq_by_seq_tensor_saved_for_backward(name):
    model, ref, batch, loss_fn = _pair(name)
    b = _unpadded(name, batch)
    if name != "transformer_encoder":  # nn.TransformerEncoderLayer already calls its attention with need_weights=False
        assert _saved_square(ref, b, loss_fn, SEQ), "eager attention should keep (seq, seq) tensors: the test is blind"
    memopt.apply(model, attention="sdpa")
    assert _saved_square(model, b, loss_fn, SEQ) == []


@pytest.mark.parametrize("name", ["llama", "bert", "direct_mha"])
def test_padded_batch_keeps_only_the_mask(name):
    # With padding the (batch, 1, seq, seq) mask is an input of the kernel: one tensor, shared by every layer,
    # not one probability matrix per layer. (From the second padded forward on: the first checks that the layers
    # hand the bool mask to SDPA unchanged.)
    model, ref, batch, loss_fn = _pair(name)
    memopt.apply(model, attention="sdpa")
    loss_fn(model, batch(0))
    eager = {t.untyped_storage().data_ptr() for t in _saved_square(ref, batch(0), loss_fn, SEQ)}
    square = _saved_square(model, batch(0), loss_fn, SEQ)
    kept = {t.untyped_storage().data_ptr() for t in square}
    assert len(kept) <= 1 and len(kept) < len(eager), (len(kept), len(eager))
    assert all(not t.requires_grad for t in square)


def test_alternating_masks_are_each_converted_once():
    # Gemma 3 alternates sliding-window and full-attention layers: two masks, each shared by its layers.
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config)
    ref = copy.deepcopy(model)
    ids = _ids(0, seq=32)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    memopt.apply(model)
    model(**b)  # the first padded forward checks that the masks reach SDPA unchanged
    square = _saved_square(model, b, lambda m, x: m(**x).loss, 32)
    assert len({t.untyped_storage().data_ptr() for t in square}) == 2
    _assert_close_to_eager(ref, model, b, lambda m, x: m(**x).loss)


def _tiny_llama(attn: str):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=2048)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _peak(model, seq):
    ids = torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(0))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    return next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]


def test_peak_memory_grows_linearly_not_quadratically():
    lengths = (256, 512, 1024)
    growth = {}
    for attn in ("eager", "sdpa"):
        model = _tiny_llama(attn)
        if attn == "sdpa":
            model = _tiny_llama("eager")
            memopt.apply(model, attention="sdpa")
        peaks = [_peak(model, s) for s in lengths]
        # Doubling the length: a linear cost doubles its increment, a quadratic one quadruples it.
        growth[attn] = (peaks[2] - peaks[1]) / (peaks[1] - peaks[0])
    assert growth["sdpa"] < 2.3, growth
    assert growth["eager"] > 3.0, growth


@pytest.mark.parametrize("order", ["attention_first", "checkpoint_first", "together"])
def test_composes_with_checkpointing_in_either_order(order):
    # Blocks = the attention modules themselves, so both patches sit on the same module.
    model, ref, batch, loss_fn = _pair("nanogpt")
    if order == "attention_first":
        memopt.apply(model, attention="sdpa")
        memopt.apply(model, attention=None, checkpoint=True, blocks=CausalSelfAttention)
    elif order == "checkpoint_first":
        memopt.apply(model, attention=None, checkpoint=True, blocks=CausalSelfAttention)
        memopt.apply(model, attention="sdpa")
    else:
        memopt.apply(model, attention="sdpa", checkpoint=True, blocks=CausalSelfAttention)
    _assert_close_to_eager(ref, model, batch(0), loss_fn)
    record = memopt.applied(model)
    attn = [f"transformer.h.{i}.attn" for i in range(3)]
    assert list(record.touched("checkpoint")) == attn
    assert all("-> SDPA" in record.touched("attention")[n] for n in attn)
    # And with whole blocks checkpointed around converted attention: no (seq, seq) tensor even in the recompute.
    model, ref, batch, loss_fn = _pair("nanogpt")
    memopt.apply(model, attention="sdpa", checkpoint=True)
    recomputed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: recomputed.append(t.shape) or t, lambda t: t):
        loss_fn(model, _unpadded("nanogpt", batch)).backward()
    assert not any(s[-2:] == (SEQ, SEQ) for s in recomputed)


def test_multihead_attention_returns_none_weights_and_same_output():
    model, ref, batch, loss_fn = _pair("direct_mha")
    memopt.apply(model)
    b = batch(0)
    loss_fn(ref, b)
    loss_fn(model, b)
    assert ref.last_weights is not None and model.last_weights is None
    x = torch.randn(2, SEQ, 32)
    out, w = model.mha(x, x, x, None, True)  # need_weights passed positionally
    torch.testing.assert_close(out, ref.mha(x, x, x)[0])
    assert w is None


class EinsumAttention(nn.Module):
    """Attention written with einsum: not recognised automatically."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).unbind(2)  # (B, T, nh, hs) each
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(C // self.heads)  # (B, nh, T, T)
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v)
        return self.out(y.reshape(B, T, C))


def einsum_sdpa(module, x):
    B, T, C = x.shape
    q, k, v = module.qkv(x).view(B, T, 3, module.heads, C // module.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v)
    return module.out(y.transpose(1, 2).reshape(B, T, C))


class Stack(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = nn.ModuleList([layer() for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x.pow(2).mean()


def test_unrecognised_attention_is_listed_with_reason_and_register_attention_converts_it():
    torch.manual_seed(0)
    model = Stack(EinsumAttention)
    ref = copy.deepcopy(model)
    memopt.apply(model)
    x = torch.randn(2, SEQ, 32)
    model(x)
    skipped = memopt.applied(model).skipped("attention")
    assert set(skipped) == {"layers.0", "layers.1"}
    assert "no softmax(q @ k.transpose(-2, -1)) @ v pattern ran" in skipped["layers.0"]

    memopt.register_attention(EinsumAttention, einsum_sdpa)
    try:
        model = copy.deepcopy(ref)
        memopt.apply(model)
        assert set(memopt.applied(model).touched("attention")) == {"layers.0", "layers.1"}
        assert "registered: einsum_sdpa" in memopt.applied(model).touched("attention")["layers.0"]
        assert _saved_square(model, {"x": x}, lambda m, b: m(**b), SEQ) == []
        torch.testing.assert_close(model(x), ref(x))
    finally:
        from memopt.transforms import attention

        attention._REGISTERED.pop(EinsumAttention)


class ReturnsWeights(CausalSelfAttention):
    def forward(self, x):
        q, k, v = self.heads(x)
        att = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)), dim=-1)  # (B, nh, T, T)
        return self.merge(att @ v), att


class KeepsWeights(CausalSelfAttention):
    """Keeps its probabilities for an attention-distillation loss (issue 13, item 1)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        att = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)), dim=-1)  # (B, nh, T, T)
        self.last_att = att
        return self.merge(att @ v)


@dataclasses.dataclass
class AttentionOut:
    out: torch.Tensor
    probs: torch.Tensor


class ReturnsDataclass(CausalSelfAttention):
    def forward(self, x):
        q, k, v = self.heads(x)
        att = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)), dim=-1)  # (B, nh, T, T)
        return AttentionOut(self.merge(att @ v), att)


def _out_and_probs(model, x):
    out = model(x)
    if isinstance(out, tuple):
        return out
    if isinstance(out, AttentionOut):
        return out.out, out.probs
    return out, model.last_att


@pytest.mark.parametrize("cls", [ReturnsWeights, KeepsWeights, ReturnsDataclass])
def test_scores_kept_past_the_forward_are_computed_as_written_with_grad(cls):
    torch.manual_seed(0)
    model = cls(32, 4, 0.0)
    ref = copy.deepcopy(model)
    memopt.apply(model)
    target = torch.rand(2, 4, SEQ, SEQ)
    for step in range(2):  # the first call converts and computes the kept scores when used; later calls as written
        x = torch.randn(2, SEQ, 32)
        grads = []
        for m in (ref, model):
            m.zero_grad()
            out, probs = _out_and_probs(m, x)
            loss = out.pow(2).mean() + (probs - target).pow(2).sum()  # the scores' loss term needs their gradient
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
            if m is ref:
                ref_loss = loss.detach()
        torch.testing.assert_close(loss.detach(), ref_loss)
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    assert "used after its forward returns" in memopt.applied(model).skipped("attention")[""]


def test_scores_returned_but_dropped_cost_nothing():
    # Bloom, GPT-Neo and MPT return their probabilities, which the caller drops: they are never computed.
    torch.manual_seed(0)
    model = ReturnsWeights(32, 4, 0.0)
    memopt.apply(model)
    x = torch.randn(2, SEQ, 32, requires_grad=True)
    for _ in range(2):
        saved = _saved_square(model, {"x": x}, lambda m, b: m(**b)[0].sum(), SEQ)
        assert saved == []
    assert "-> SDPA" in memopt.applied(model).touched("attention")[""]


class FiniteMask(CausalSelfAttention):
    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.heads(x)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, -1e9)  # finite fill: not exactly SDPA's -inf
        return self.merge(F.softmax(att, dim=-1) @ v)


def test_attention_kept_as_written_when_the_pattern_does_not_fit():
    torch.manual_seed(0)
    model = FiniteMask(32, 4, 0.0)
    ref = copy.deepcopy(model)
    memopt.apply(model)
    x = torch.randn(2, SEQ, 32, requires_grad=True)
    torch.testing.assert_close(model(x), ref(x))  # exactly as written
    assert "masked_fill was applied" in memopt.applied(model).skipped("attention")[""]


def test_in_place_ops_on_scores_stay_correct():
    class InPlace(CausalSelfAttention):
        def forward(self, x):
            T = x.shape[1]
            q, k, v = self.heads(x)
            att = q @ k.transpose(-2, -1)
            att.mul_(0.5)  # unrecognised in-place op: must act on the real scores
            att.masked_fill_(self.bias[:, :, :T, :T] == 0, float("-inf"))
            return self.merge(att.softmax(-1) @ v)

    torch.manual_seed(0)
    model = InPlace(32, 4, 0.0)
    ref = copy.deepcopy(model)
    memopt.apply(model)
    x = torch.randn(2, SEQ, 32)
    torch.testing.assert_close(model(x), ref(x))


def test_backend_that_ran_is_recorded_after_a_step():
    model, _, batch, loss_fn = _pair("llama")
    memopt.apply(model)
    assert "attention:backend" not in {e.technique for e in memopt.applied(model).entries}
    train_step(model, batch(0), loss_fn)
    backend = memopt.applied(model).touched("attention:backend")[""]
    assert "cpu_flash x3" in backend, backend
    # The probe steps aside after the first forwards: no hook does any work afterwards.
    train_step(model, batch(0), loss_fn)
    train_step(model, batch(0), loss_fn)
    assert memopt.applied(model).touched("attention:backend")[""] == backend.replace("x3", "x6")


def test_math_fallback_is_warned_once_with_the_reason():
    from memopt import _log

    model, *_ = nanogpt(dropout=0.1)
    _log._warned.discard("sdpa-math-NanoGPT")
    memopt.apply(model)
    b = {"idx": _ids(0), "targets": _ids(1)}
    model.train()
    with pytest.warns(UserWarning, match=r"fell back to the math kernel in NanoGPT.*takes no dropout"):
        model(**b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**b)
    assert "math x6" in memopt.applied(model).touched("attention:backend")[""]  # two probed forwards


def _no_sdpa_model(name: str):
    """transformers architectures with no SDPA attention of their own, tiny, dropout off."""
    import transformers

    configs = {
        "bloom": lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "gpt_neo": lambda: transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                                     attention_types=[[["global", "local"], 1]],
                                                     max_position_embeddings=64),
        "mpt": lambda: transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2,
                                              max_seq_len=64),
        "falcon_alibi": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, alibi=True, multi_query=False,
                                                          new_decoder_architecture=False),
        "megatron_bert": lambda: transformers.MegatronBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=64,
                                                                 is_decoder=True),
    }
    config = configs[name]()
    for key in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embed_dropout",
                "attention_probs_dropout_prob", "hidden_dropout_prob"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    if name == "mpt":
        config.attn_config.attn_pdrop = 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


NO_SDPA = ["bloom", "gpt_neo", "mpt", "falcon_alibi", "megatron_bert"]


@pytest.mark.parametrize("name", NO_SDPA)
def test_transformers_model_without_sdpa_is_converted_through_its_attention_code(name):
    # Issue 13, item 18: architectures transformers keeps eager (ALiBi as a float bias, GPT-Neo's where(mask, s,
    # lowest), Bloom's baddbmm and batch-merged views) run SDPA, with the model's own numbers.
    model = _no_sdpa_model(name)
    ref = copy.deepcopy(model)
    memopt.apply(model)
    ids = _ids(0)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # the first real token would be predicted from a pad position, whose query attends nothing
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}
    loss_fn = lambda m, x: m(**x).loss  # noqa: E731
    _assert_close_to_eager(ref, model, b, loss_fn)
    touched = memopt.applied(model).touched("attention")
    assert any("-> SDPA" in d for d in touched.values()), memopt.applied(model)
    eager = [t for t in _saved_square(ref, b, loss_fn, SEQ) if t.requires_grad]
    assert eager, "eager attention should keep (seq, seq) tensors: the test is blind"
    assert [t.shape for t in _saved_square(model, b, loss_fn, SEQ) if t.requires_grad] == []


def test_transformers_model_without_sdpa_or_pattern_warns_and_stays_correct():
    import transformers

    from memopt import _log

    # Gemma 2 soft-caps its attention logits (tanh): no SDPA form, and its attention is a module-level function
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=64)
    model = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    ref = copy.deepcopy(model)
    _log._warned.discard("no-sdpa-Gemma2ForCausalLM")
    with pytest.warns(UserWarning, match=r"Gemma2ForCausalLM has no SDPA attention in transformers") as rec:
        memopt.apply(model)
    assert rec[0].filename == __file__
    assert "no SDPA implementation" in memopt.applied(model).skipped("attention")[""]
    ids = _ids(0)
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_no_attention_in_model_warns_once():
    from memopt import _log

    _log._warned.discard("no-attention-Sequential")
    model, *_ = ALL_MODELS["resnet"]()
    with pytest.warns(UserWarning, match=r"found no attention in Sequential.*attention=None"):
        memopt.apply(model)


def test_attention_none_leaves_the_model_alone_and_remove_undoes():
    model, ref, batch, loss_fn = _pair("llama")
    memopt.apply(model, attention=None)
    assert model.config._attn_implementation == "eager" and not memopt.applied(model)
    keys = list(model.state_dict())
    memopt.apply(model)
    assert model.config._attn_implementation == "sdpa" and list(model.state_dict()) == keys
    memopt.remove(model)
    assert model.config._attn_implementation == "eager"
    assert not memopt.applied(model).touched("attention")
    assert not model._forward_pre_hooks and not model._forward_hooks

    mha, *_ = direct_mha()
    memopt.apply(mha)
    assert sdpa_converted(mha.mha)
    memopt.remove(mha)
    assert not sdpa_converted(mha.mha) and "forward" not in mha.mha.__dict__


@pytest.mark.gpu
def test_cuda_explicit_mask_reports_kernel_and_matches_eager():
    model, ref, batch, loss_fn = _pair("llama")
    model, ref = model.cuda(), ref.cuda()
    memopt.apply(model)
    b = {k: v.cuda() for k, v in batch(0).items()}
    _assert_close_to_eager(ref, model, b, loss_fn)
    assert "x3" in memopt.applied(model).touched("attention:backend")[""]


def test_softmax_in_another_dtype_is_kept_as_written():
    class HalfSoftmax(CausalSelfAttention):
        def forward(self, x):
            q, k, v = self.heads(x)
            att = (q @ k.transpose(-2, -1)).softmax(-1, torch.float64)  # positional dtype: not SDPA's
            return self.merge(att.to(q.dtype) @ v)

    torch.manual_seed(0)
    model = HalfSoftmax(32, 4, 0.0)
    ref = copy.deepcopy(model)
    memopt.apply(model)
    x = torch.randn(2, SEQ, 32)
    torch.testing.assert_close(model(x), ref(x))
    assert "" in memopt.applied(model).skipped("attention")
