"""loss='chunked' and chunked_cross_entropy: the same loss and gradients as the model's own, without the logits."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
from models import HF_MODELS, SEQ, VOCAB, NanoGPT, _causal_lm, _SMALL, nanogpt, train_step
from test_api import _assert_untouched, _snapshot

CHUNK = 8  # tokens per chunk in the model tests: a batch of 2 x 16 tokens is 4 chunks

MODELS = {
    "llama": HF_MODELS["llama"],
    "gpt2": HF_MODELS["gpt2"],  # lm_head tied to transformer.wte
    "gemma2": _causal_lm("Gemma2Config", **_SMALL, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0),
    "mistral": HF_MODELS["mistral"],
    "qwen2": HF_MODELS["qwen2"],
    "mixtral": _causal_lm("MixtralConfig", **_SMALL, num_key_value_heads=2, num_local_experts=4,
                          num_experts_per_tok=2, output_router_logits=True),  # + the load-balancing loss
}


def _pair(name: str, **loss_kwargs):
    """(reference model, chunked copy with the same weights, make_batch, loss_fn)."""
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[name]()
    ref = copy.deepcopy(model)
    memopt.apply(model, attention=None, loss=memopt.LossConfig(chunk_size=CHUNK, **loss_kwargs))
    return ref, model, batch, loss_fn


def _assert_same_step(ref, model, batch, loss_fn, **tol):
    loss_ref, grads_ref = train_step(ref, batch, loss_fn)
    loss, grads = train_step(model, batch, loss_fn)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# The function


def _reference(h, w, b, y, reduction="mean", num_items_in_batch=None, label_smoothing=0.0, softcap=None):
    z = F.linear(h, w, b).float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    red = "sum" if num_items_in_batch is not None else reduction
    loss = F.cross_entropy(z.view(-1, z.shape[-1]), y.view(-1), reduction=red, label_smoothing=label_smoothing)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss.view(y.shape) if reduction == "none" else loss


def _inputs(bias: bool, dtype=torch.float32, tokens=(5, 9), hidden=16, vocab=50):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, tokens, generator=g)
    y[0] = -100  # 9 tokens...
    y[1, :3] = -100  # ...and 3 more: the first chunk of 8 is all ignored
    return h, w, b, y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(reduction="sum"), dict(reduction="none"), dict(num_items_in_batch=20),
     dict(num_items_in_batch=torch.tensor(7)), dict(label_smoothing=0.1), dict(softcap=3.0),
     dict(label_smoothing=0.2, softcap=2.0)],
    ids=["mean", "sum", "none", "num_items", "num_items_tensor", "smoothing", "softcap", "smoothing_softcap"],
)
def test_function_equals_cross_entropy_over_the_full_logits(bias, kwargs):
    h, w, b, y = _inputs(bias)
    inputs = [t for t in (h, w, b) if t is not None]
    ref = _reference(h, w, b, y, **kwargs)
    grad_out = torch.randn_like(ref) if ref.dim() else torch.tensor(1.7)  # backward scales by the incoming gradient
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    loss = memopt.chunked_cross_entropy(h, w, y, bias=b, chunk_size=8, **kwargs)
    grads = torch.autograd.grad(loss, inputs, grad_out)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_default_chunk_size_and_one_chunk_give_the_same_result():
    h, w, b, y = _inputs(True)
    ref = _reference(h, w, b, y)
    for chunk_size in (None, 1, 45, 1000):
        torch.testing.assert_close(memopt.chunked_cross_entropy(h, w, y, bias=b, chunk_size=chunk_size), ref)
    assert memopt.transforms.loss.default_chunk_size(2048, 512, 32000) == 256  # Liger's rule says 64: raised to the floor
    assert memopt.transforms.loss.default_chunk_size(65536, 4096, 128256) == 2048


def test_bf16_inputs_accumulate_in_float32():
    h, w, _, y = _inputs(False, torch.bfloat16, tokens=(4, 64), hidden=64, vocab=512)
    loss = memopt.chunked_cross_entropy(h, w, y, chunk_size=16)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # transformers' bf16 step: bf16 logits, upcast for the loss, gradients back through the bf16 head.
    ref = F.cross_entropy(F.linear(h, w).float().view(-1, 512), y.view(-1))
    gh_ref, gw_ref = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, gh_ref)  # bf16 tolerances
    # Against float32 throughout, on the same (bf16-rounded) values: the weight's gradient, a sum over every chunk,
    # is no further from it than transformers' bf16 one (a single matmul), and both are within bf16 rounding.
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref32 = F.cross_entropy((h32 @ w32.t()).view(-1, 512), y.view(-1))
    gh32, gw32 = torch.autograd.grad(ref32, [h32, w32])
    err = lambda got, want: ((got.float() - want).norm() / want.norm()).item()  # noqa: E731
    assert err(gw, gw32) <= 1.1 * err(gw_ref, gw32) and err(gw, gw32) < 1e-2
    assert err(gh, gh32) < 1e-2


def test_autocast_runs_the_head_in_its_dtype():
    h, w, b, y = _inputs(True, tokens=(4, 64), hidden=64, vocab=512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = memopt.chunked_cross_entropy(h, w, y, bias=b, chunk_size=16)
        ref = F.cross_entropy(F.linear(h, w, b).float().view(-1, 512), y.view(-1))  # bf16 logits under autocast
    grads = torch.autograd.grad(loss, [h, w, b])
    grads_ref = torch.autograd.grad(ref, [h, w, b])
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.float32  # the parameters' dtype
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


def test_frozen_weight_costs_no_weight_gradient():
    h, w, _, y = _inputs(False)
    w.requires_grad_(False)
    shapes, loss = _saved_shapes(lambda: memopt.chunked_cross_entropy(h, w, y, chunk_size=8))
    assert (45, 16) in shapes and not any(50 in s for s in shapes)  # hidden's gradient (N, H), nothing (V, H)
    (gh,) = torch.autograd.grad(loss, [h])
    torch.testing.assert_close(gh, torch.autograd.grad(_reference(h, w, None, y), [h])[0])
    # And the other way round: a frozen input (hidden from a frozen body), a trainable head.
    h2 = h.detach()
    w.requires_grad_(True)
    shapes, loss = _saved_shapes(lambda: memopt.chunked_cross_entropy(h2, w, y, chunk_size=8))
    assert (50, 16) in shapes and (45, 16) not in shapes
    torch.testing.assert_close(torch.autograd.grad(loss, [w])[0],
                               torch.autograd.grad(_reference(h2, w, None, y), [w])[0])


def test_no_grad_computes_the_loss_only():
    h, w, b, y = _inputs(True)
    with torch.no_grad():
        loss = memopt.chunked_cross_entropy(h, w, y, bias=b, chunk_size=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _reference(h, w, b, y).detach())


def test_second_backward_through_the_kept_gradients_is_refused():
    h, w, _, y = _inputs(False)
    loss = memopt.chunked_cross_entropy(h, w, y, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.zeros(50, 15)), ValueError, r"hidden \(5, 9, 16\) and weight \(50, 15\) do not fit"),
        (dict(labels=torch.zeros(5, 8, dtype=torch.long)), ValueError, r"labels \(5, 8\) must have hidden's shape"),
        (dict(labels=torch.zeros(5, 9)), TypeError, r"labels must be integer class indices, got torch.float32"),
        (dict(bias=torch.zeros(49)), ValueError, r"bias \(49,\) must be \(vocab,\) = \(50,\)"),
        (dict(reduction="avg"), ValueError, r"reduction='avg'\) is not supported; use one of \('mean', 'sum', 'none'\)"),
        (dict(chunk_size=0), ValueError, r"chunk_size=0\) must be a positive int"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing=1.5\) must be in \[0, 1\]"),
        (dict(softcap=0.0), ValueError, r"softcap=0.0\) must be positive"),
        (dict(reduction="none", num_items_in_batch=3), ValueError, r"cannot be combined with reduction='none'"),
    ],
)
def test_function_bad_input(kwargs, error, match):
    h, w, _, y = _inputs(False)
    args = {"hidden": h, "weight": w, "labels": y, **kwargs}
    with pytest.raises(error, match=match):
        memopt.chunked_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


# ----------------------------------------------------------------------------------------------------------------
# transformers causal LMs


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_every_gradient_equal_the_models_own(name):
    ref, model, batch, loss_fn = _pair(name)
    b = batch(0)
    b["labels"][1, :10] = -100  # with the shift, row 1's first chunk of 8 positions has nothing to predict
    _assert_same_step(ref, model, b, loss_fn)
    model.train()
    out = model(**b)
    assert out.logits is None and out.loss is not None


def test_naming_the_head_of_a_causal_lm_keeps_its_semantics():
    ref, model, batch, loss_fn = _pair("llama", head="lm_head", labels="labels")
    assert "shift=True" in memopt.applied(model).touched("loss")[""]
    _assert_same_step(ref, model, batch(0), loss_fn)


def test_gemma2_soft_capping_is_read_from_the_config():
    ref, model, batch, loss_fn = _pair("gemma2")
    assert "softcap=2.0" in memopt.applied(model).touched("loss")[""]
    _assert_same_step(ref, model, batch(0), loss_fn)


def test_tied_head_gradient_reaches_the_embedding():
    ref, model, batch, loss_fn = _pair("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "tied to transformer.wte.weight" in memopt.applied(model).touched("loss")["lm_head"]
    _, grads = train_step(model, batch(0), loss_fn)
    _, grads_ref = train_step(ref, batch(0), loss_fn)
    torch.testing.assert_close(grads["transformer.wte.weight"], grads_ref["transformer.wte.weight"])


def test_num_items_in_batch_and_label_smoothing():
    ref, model, batch, _ = _pair("llama")
    b = {**batch(0), "num_items_in_batch": torch.tensor(11)}
    _assert_same_step(ref, model, b, lambda m, x: m(**x).loss)
    ref, model, batch, _ = _pair("llama", label_smoothing=0.1)
    b = batch(0)

    def smoothed(m, x):  # the reference: transformers' logits, cross-entropy with smoothing, shifted by hand
        logits = m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        labels = F.pad(x["labels"], (0, 1), value=-100)[:, 1:]
        return F.cross_entropy(logits.view(-1, VOCAB).float(), labels.reshape(-1), label_smoothing=0.1)

    loss_ref, grads_ref = train_step(ref, b, smoothed)
    loss, grads = train_step(model, b, lambda m, x: m(**x).loss)
    torch.testing.assert_close(loss, loss_ref)
    for n in grads_ref:
        torch.testing.assert_close(grads[n], grads_ref[n])


def test_logits_to_keep_and_return_dict_false():
    ref, model, batch, loss_fn = _pair("llama")
    b = batch(0)
    b["labels"] = b["labels"][:, -6:]  # labels for the kept positions, as transformers expects them then
    kept = lambda m, x: m(**x, logits_to_keep=6).loss  # noqa: E731
    _assert_same_step(ref, model, b, kept)
    loss_ref, _ = train_step(ref, batch(0), loss_fn)
    model.train()
    out = model(**batch(0), return_dict=False)
    assert isinstance(out, tuple) and not any(o is None for o in out)
    torch.testing.assert_close(out[0], loss_ref)
    assert out[0].dim() == 0 and all(not (isinstance(o, torch.Tensor) and o.shape[-1:] == (2,)) for o in out[1:])


@pytest.mark.filterwarnings("ignore:loss='chunked'")  # a training forward without labels: warned about, tested below
def test_without_labels_or_in_eval_the_model_is_unchanged():
    ref, model, batch, _ = _pair("llama")
    b = batch(0)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        getattr(model, mode)()
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits)
    with torch.no_grad():  # evaluation with labels: loss and logits, for metrics
        out, out_ref = model(**b), ref(**b)
    torch.testing.assert_close(out.logits, out_ref.logits)
    torch.testing.assert_close(out.loss, out_ref.loss)
    generated = model.generate(inputs["input_ids"][:1, -4:], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, ref.generate(inputs["input_ids"][:1, -4:], max_new_tokens=3, do_sample=False))


def test_training_forward_without_labels_warns_once():
    _, model, batch, _ = _pair("qwen2")
    inputs = {k: v for k, v in batch(0).items() if k != "labels"}
    model.train()
    with pytest.warns(UserWarning, match=r"training forward of Qwen2ForCausalLM without labels= computes the full logits") as record:
        model(**inputs)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs)


def test_with_checkpointing_and_lora():
    ref, model, batch, loss_fn = _pair("llama")
    memopt.apply(ref, checkpoint=True)
    memopt.apply(model, checkpoint=True)  # a second apply keeps the loss patch
    assert memopt.applied(model).touched("loss") and memopt.applied(model).touched("checkpoint")
    _assert_same_step(ref, model, batch(0), loss_fn)
    pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MODELS["llama"]()[0]
    ref, model = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    memopt.apply(ref, lora=8, checkpoint=True, attention=None)
    torch.manual_seed(1)
    memopt.apply(model, lora=8, checkpoint=True, attention=None, loss=memopt.LossConfig(chunk_size=CHUNK))
    assert "frozen: no weight gradient" in memopt.applied(model).touched("loss")["lm_head"]
    _assert_same_step(ref, model, batch(0), loss_fn)


def test_with_4bit_quantization_and_lora():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)  # 4-bit CPU: in % 64 == 0
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    ref, model = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    memopt.apply(ref, quant="4bit", lora=8, checkpoint=True)
    torch.manual_seed(1)
    memopt.apply(model, quant="4bit", lora=8, checkpoint=True, loss=memopt.LossConfig(chunk_size=CHUNK))
    assert memopt.applied(model).touched("quant")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    _assert_same_step(ref, model, {"input_ids": ids, "labels": ids}, lambda m, x: m(**x).loss, rtol=1e-4, atol=1e-5)


def test_state_dict_keys_unchanged_remove_deepcopy_and_pickle():
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS["gpt2"]()
    keys = list(model.state_dict())
    memopt.apply(model, loss="chunked")
    assert list(model.state_dict()) == keys
    assert isinstance(memopt.applied(model).configs["loss"], memopt.LossConfig)
    for copied in (copy.deepcopy(model), _pickled(model)):
        copied.train()
        assert copied(**batch(0)).logits is None
        torch.testing.assert_close(loss_fn(copied, batch(0)), loss_fn(model, batch(0)))
    memopt.remove(model)
    assert "forward" not in model.__dict__ and not memopt.applied(model).touched("loss")
    model.train()
    assert model(**batch(0)).logits.shape == (2, SEQ, VOCAB)


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ----------------------------------------------------------------------------------------------------------------
# Hand-written models


def test_handwritten_model_with_loss_config():
    torch.manual_seed(0)
    model, batch, loss_fn = nanogpt()
    ref = copy.deepcopy(model)
    memopt.apply(model, loss=memopt.LossConfig(head="lm_head", labels="targets", chunk_size=CHUNK))
    assert memopt.applied(model).touched("loss").keys() == {"", "lm_head"}
    _assert_same_step(ref, model, batch(0), loss_fn)
    model.eval()
    torch.testing.assert_close(model(batch(0)["idx"]), ref.eval()(batch(0)["idx"]))  # no targets: the logits


class _TupleGPT(NanoGPT):
    """nanoGPT's own contract: forward(idx, targets=None) -> (logits, loss or None)."""

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.transformer.ln_f(self._body(idx)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1)
        return logits, loss

    def _body(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return x


def test_register_loss_and_a_logits_loss_tuple(monkeypatch):
    monkeypatch.setattr(memopt._log, "_warned", set())  # the warning below is once per process
    torch.manual_seed(0)
    model = _TupleGPT()
    ref = copy.deepcopy(model)
    memopt.register_loss(_TupleGPT, head="lm_head", labels="targets")
    memopt.apply(model, loss=memopt.LossConfig(chunk_size=CHUNK))
    _, batch, _ = nanogpt()
    b = batch(0)
    b["targets"][0, :5] = -1
    _assert_same_step(ref, model, b, lambda m, x: m(**x)[1])
    model.train()
    logits, loss = model(**b)
    assert loss.dim() == 0
    # The logits returned beside the chunked loss are a stand-in: their shape, no memory; used, the real ones.
    assert logits.shape == (2, SEQ, VOCAB) and logits.untyped_storage().nbytes() == logits.element_size()
    with pytest.warns(UserWarning, match=r"Tensor.argmax on the logits of the output head 'lm_head' computes "
                                         r"them in full \(\(2, 16, 96\), torch.float32\)"):
        predicted = logits.argmax(-1)
    assert torch.equal(predicted, ref.train()(**b)[0].argmax(-1))


class _CallsTheFunction(NanoGPT):
    """A hand-written model that computes its loss with memopt.chunked_cross_entropy itself (nanoGPT's contract:
    (logits, loss); no logits beside the chunked loss)."""

    def forward(self, idx, targets=None):
        x = self.transformer.ln_f(_TupleGPT._body(self, idx))
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        return None, memopt.chunked_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1, chunk_size=CHUNK)


def test_handwritten_model_calling_the_function():
    torch.manual_seed(0)
    model = _CallsTheFunction()
    ref = NanoGPT()
    ref.load_state_dict(model.state_dict())
    _, batch, loss_fn = nanogpt()
    _assert_same_step(ref, model, batch(0), loss_fn)


def test_a_label_outside_the_vocabulary_names_ignore_index_not_an_index_error():
    """nanoGPT pads its targets with -1; with the default ignore_index=-100 that is a label outside [0, vocab)."""
    torch.manual_seed(0)
    model = _CallsTheFunction()
    model.forward = lambda idx, targets: (None, memopt.chunked_cross_entropy(
        model.transformer.ln_f(_TupleGPT._body(model, idx)), model.lm_head.weight, targets))  # ignore_index left out
    _, batch, _ = nanogpt()
    with pytest.raises(ValueError, match=r"label -1 outside \[0, vocab=96\) that is not ignore_index=-100; pass the "
                                         r"value your padding uses as ignore_index \(nanoGPT pads with -1: "
                                         r"ignore_index=-1; .*memopt.LossConfig\(ignore_index=-1\)\)"):
        model(**batch(0))
    h, w, _, y = _inputs(False)
    y[1, 2] = 50  # = vocab
    with pytest.raises(ValueError, match=r"label 50 outside \[0, vocab=50\)"):
        memopt.chunked_cross_entropy(h, w, y)


def _nanogpt_pair(checkpoint=False, **kwargs):
    torch.manual_seed(0)
    model, batch, loss_fn = nanogpt()
    ref = copy.deepcopy(model)
    memopt.apply(model, checkpoint=checkpoint, loss=memopt.LossConfig(chunk_size=CHUNK, **kwargs))
    return ref, model, batch, loss_fn


def _logits_allocated(fn, vocab=VOCAB, chunk=CHUNK):
    """Run fn(); the (shape, bytes) of every tensor an op allocated (new storage, not a view of its inputs) that is
    vocabulary-wide and covers more than one chunk of tokens: the logits, their softmax or their gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab
                        and t.shape[:-1].numel() > chunk and t.untyped_storage().data_ptr() not in inputs):
                    found.append((tuple(t.shape), t.untyped_storage().nbytes()))
            return out

    with Allocations():
        fn()
    return found


@pytest.mark.parametrize("checkpoint", [False, True])
def test_nanogpt_as_users_write_it(checkpoint, monkeypatch):
    """nanoGPT with loss='chunked' and nothing named (no head, labels or ignore_index): its own F.cross_entropy(..., ignore_index=-1) on the head's
    logits runs chunked, the same loss and gradients as the unmodified model (targets padded with -1), the
    (batch x seq x vocab) logits never allocated in the step; without targets it keeps its last-position head."""
    torch.manual_seed(0)
    _, batch, loss_fn = nanogpt()
    model = NanoGPT(d=48)  # qkv 144 wide: the logits are the step's only vocabulary-wide (96) tensors
    ref = copy.deepcopy(model)
    memopt.apply(model, checkpoint=checkpoint, loss=memopt.LossConfig(chunk_size=CHUNK))  # default: 256 tokens, all
    b = batch(0)
    assert (b["targets"] == -1).any()
    _assert_same_step(ref, model, b, loss_fn)
    assert "F.cross_entropy(ignore_index=-1, reduction='mean') on the head's logits computed chunked" in \
        memopt.applied(model).touched("loss")[""]
    ref.train()
    model.train()
    assert _logits_allocated(lambda: loss_fn(ref, b).backward())  # the check sees the plain step's logits
    assert _logits_allocated(lambda: loss_fn(model, b).backward()) == []
    # Training mode without targets: the last position's logits, (b, 1, vocab), sampled as nanoGPT's generate does.
    probs = lambda m: F.softmax(m(b["idx"])[0][:, -1, :] / 0.8, dim=-1)  # noqa: E731
    monkeypatch.setattr(memopt._log, "_warned", set())  # warned once per process: again for this test
    with pytest.warns(UserWarning, match=r"F.softmax on the logits of the output head 'lm_head' computes them in full "
                                         r"\(\(2, 96\), torch.float32\)") as record:
        torch.testing.assert_close(probs(model), probs(ref))
    assert record[0].filename == __file__  # where the logits were used
    model.eval()
    ref.eval()
    logits, loss = model(b["idx"])
    assert loss is None and type(logits) is torch.Tensor
    torch.testing.assert_close(logits, ref(b["idx"])[0])


def test_nanogpt_trains_with_its_own_optimizer():
    """A few AdamW steps with nanoGPT's configure_optimizers (weight-decay groups): the same losses as unmodified."""
    ref, model, batch, loss_fn = _nanogpt_pair()
    opts = [m.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95)) for m in (ref, model)]
    for step in range(3):
        losses = []
        for m, opt in zip((ref, model), opts):
            m.train()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(m, batch(step))
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0])


def test_nanogpt_under_bf16_autocast():
    """nanoGPT's `ctx = torch.autocast(device_type, dtype=torch.bfloat16)` step: the head's matmuls run in bf16 as
    F.linear's would, the loss in float32 as autocast runs F.cross_entropy; within bf16 rounding of the plain step."""
    ref, model, batch, loss_fn = _nanogpt_pair()
    b = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = train_step(ref, b, loss_fn)
        loss, grads = train_step(model, b, loss_fn)
    assert loss.dtype == loss_ref.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-2)
    for n in grads_ref:
        assert ((grads[n] - grads_ref[n]).norm() / grads_ref[n].norm()).item() < 2e-2, n


class _Variant(NanoGPT):
    """nanoGPT's body with the loss written another way (`tail(self, x, targets)` on the final hidden states)."""

    def __init__(self, tail):
        super().__init__(d=48)  # qkv 144 wide, so that only the logits are vocabulary-wide (96)
        self.tail = tail
        self.vocab_bias = nn.Parameter(torch.randn(VOCAB) * 0.1)

    def forward(self, idx, targets=None):
        return self.tail(self, self.transformer.ln_f(_TupleGPT._body(self, idx)), targets)


def _in_place(m, x, y):
    logits = m.lm_head(x)
    flat = logits.view(-1, VOCAB)  # a view: sees the in-place scaling below, as on real logits
    logits.mul_(0.5)
    return F.cross_entropy(flat, y.view(-1), ignore_index=-1)


VARIANTS = {  # name: (tail, chunked); each a way users write the loss over a head's logits
    "shifted": (lambda m, x, y: F.cross_entropy(m.lm_head(x)[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1),
                                                ignore_index=-1), True),
    "float-scaled-softcapped": (lambda m, x, y: F.cross_entropy(
        (3.0 * torch.tanh(m.lm_head(x).float() / 2.0 / 3.0)).flatten(0, 1), y.flatten(), ignore_index=-1,
        label_smoothing=0.1), True),
    "module-sum": (lambda m, x, y: nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")(
        m.lm_head(x).view(-1, VOCAB), y.view(-1)), True),
    "per-token": (lambda m, x, y: F.cross_entropy(m.lm_head(x).view(-1, VOCAB), y.view(-1), ignore_index=-1,
                                                  reduction="none").view(y.shape).sum(1).mean(), True),
    "masked": (lambda m, x, y: F.cross_entropy(m.lm_head(x)[y != -1], y[y != -1]), True),
    "two-calls": (lambda m, x, y: F.cross_entropy(m.lm_head(x[:, :8]).reshape(-1, VOCAB), y[:, :8].reshape(-1),
                                                  ignore_index=-1)
                  + F.cross_entropy(m.lm_head(x[:, 8:]).reshape(-1, VOCAB), y[:, 8:].reshape(-1), ignore_index=-1),
                  True),
    "unknown-op": (lambda m, x, y: F.cross_entropy((m.lm_head(x) + m.vocab_bias).view(-1, VOCAB), y.view(-1),
                                                   ignore_index=-1), False),
    "log-softmax-nll": (lambda m, x, y: F.nll_loss(F.log_softmax(m.lm_head(x), -1).view(-1, VOCAB), y.view(-1),
                                                   ignore_index=-1), False),
    "in-place": (_in_place, False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_handwritten_losses_as_users_write_them(name, monkeypatch):
    """Every way of writing the loss gives the unmodified model's loss and gradients: what the stand-in follows runs
    chunked (no logits allocated), anything else computes the logits in full, says so once and in applied()."""
    monkeypatch.setattr(memopt._log, "_warned", set())
    tail, chunked = VARIANTS[name]
    torch.manual_seed(0)
    model = _Variant(tail)
    ref = copy.deepcopy(model)
    memopt.apply(model, loss=memopt.LossConfig(chunk_size=CHUNK))
    _, batch, _ = nanogpt()
    b = batch(0)
    step = lambda m, x: m(**x)  # noqa: E731
    if chunked:
        _assert_same_step(ref, model, b, step)
        assert "computed chunked" in memopt.applied(model).touched("loss")[""]
        model.train()
        assert _logits_allocated(lambda: step(model, b).backward()) == []
    else:
        with pytest.warns(UserWarning, match=r"on the logits of the output head 'lm_head' computes them in full"):
            _assert_same_step(ref, model, b, step)
        assert "the head's logits were computed in full" in memopt.applied(model).skipped("loss")[""]


def test_a_loss_computed_outside_the_model_from_its_logits():
    """A forward that returns the logits (a Lightning / Trainer compute_loss step): the loss computed from them
    outside the model runs chunked."""
    tail = lambda m, x, y: m.lm_head(x)  # noqa: E731
    torch.manual_seed(0)
    model = _Variant(tail)
    ref = copy.deepcopy(model)
    memopt.apply(model, loss=memopt.LossConfig(chunk_size=CHUNK))
    _, batch, _ = nanogpt()
    b = batch(0)
    step = lambda m, x: F.cross_entropy(m(x["idx"]).view(-1, VOCAB), x["targets"].view(-1), ignore_index=-1)  # noqa: E731
    _assert_same_step(ref, model, b, step)
    model.train()
    assert _logits_allocated(lambda: step(model, b).backward()) == []


# ----------------------------------------------------------------------------------------------------------------
# Refusals: a clear error, the model untouched


class _NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, x, labels=None):
        return self.out(self.body(x))


def _bert():
    import transformers

    return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, **_SMALL))


def _peft_lora_on_head():
    import peft

    return peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])


@pytest.mark.parametrize(
    "build, kwargs, match",
    [
        (lambda: nanogpt()[0], dict(loss="fused"), r"loss='fused' is not supported; use 'chunked', None or memopt.LossConfig"),
        (lambda: nanogpt()[0], dict(loss=memopt.LossConfig(labels="labels")), r"NanoGPT.forward has no argument 'labels' \(it takes \['idx', 'targets'\]\); name the one carrying the labels with LossConfig\(labels=...\)"),
        (_NoHead, dict(loss="chunked"), r"found no output head \(no module named lm_head\) in _NoHead. Name the output head .*LossConfig\(head='lm_head'\).*memopt.register_loss\(_NoHead, head='lm_head'\).*memopt.chunked_cross_entropy"),
        (_NoHead, dict(loss=memopt.LossConfig(head="head")), r"LossConfig\(head='head'\) matched no module"),
        (lambda: nanogpt()[0], dict(loss=memopt.LossConfig(head="transformer.h", labels="targets")), r"'transformer.h' is a ModuleList, not an nn.Linear"),
        (_bert, dict(loss="chunked"), r"no transformers causal LM .* in BertForMaskedLM"),
        (lambda: MODELS["llama"]()[0], dict(loss="chunked", quant=memopt.QuantConfig(skip_head=False, blocksize=32)), r"quantized head 'lm_head'.*QuantConfig\(skip_head=True\)"),
        (lambda: MODELS["llama"]()[0], dict(loss="chunked", lora="peft-head"), r"target_modules include the output head 'lm_head'"),
        (lambda: nanogpt()[0], dict(loss=memopt.LossConfig(ignore_index=-1)), r"LossConfig\(ignore_index=-1\) describes the loss memopt computes for a transformers causal LM; NanoGPT computes its own, and memopt follows its F.cross_entropy call .*: drop ignore_index="),
        (lambda: nanogpt()[0], dict(loss=memopt.LossConfig(shift=True)), r"LossConfig\(shift=True\) describes .*: drop shift="),
    ],
    ids=["bad-value", "no-labels-arg", "no-head", "head-not-found", "head-not-linear", "bert", "quantized-head", "lora-head",
         "handwritten-ignore-index", "handwritten-shift"],
)
def test_bad_input_raises_and_leaves_the_model_untouched(build, kwargs, match):
    if "quant" in kwargs:
        pytest.importorskip("bitsandbytes")
    if kwargs.get("lora") == "peft-head":
        pytest.importorskip("peft")
        kwargs = {**kwargs, "lora": _peft_lora_on_head()}
    model = build()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        memopt.apply(model, **kwargs)
    _assert_untouched(model, before)


def test_head_changed_after_apply_raises_at_the_next_training_forward():
    pytest.importorskip("peft")
    import peft

    ref, model, batch, _ = _pair("llama")
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["lm_head"]), model)
    model.train()
    with pytest.raises(RuntimeError, match=r"'lm_head' has LoRA adapters .* \(it changed after memopt.apply\)"):
        model(**batch(0))


def test_unknown_logit_postprocessing_of_a_transformers_model_is_refused_not_trained_on():
    """memopt computes a transformers model's loss itself: logits that are not the head's output as memopt models it
    (scaled and soft-capped as the config or LossConfig says) raise instead of training on another loss."""
    _, model, batch, _ = _pair("llama", softcap=5.0)  # Llama does not soft-cap its logits
    with pytest.raises(RuntimeError, match=r"LlamaForCausalLM.forward does something to the head's output that memopt "
                                           r"does not model \(the logits it returned are the head's output as is, not "
                                           r"the head's output soft-capped at 5\)"):
        model.train()(**batch(0))
    _, model, batch, _ = _pair("llama")
    model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)  # an op memopt does not fold
    with pytest.raises(RuntimeError, match=r"does not model \(the logits it returned are a \(2, 16, 96\) tensor"):
        model.train()(**batch(0))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(chunk_size=0), ValueError, r"chunk_size=0\) must be a positive int"),
        (dict(head=3), TypeError, r"head=3\) must be a string"),
        (dict(label_smoothing=2), ValueError, r"label_smoothing=2\) must be a float in \[0, 1\]"),
        (dict(softcap=-1.0), ValueError, r"softcap=-1.0\) must be a positive float"),
        (dict(shift="yes"), TypeError, r"shift='yes'\) must be True, False or None"),
    ],
)
def test_bad_loss_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        memopt.LossConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Memory


def test_no_logits_sized_tensor_is_saved_for_backward():
    ref, model, batch, loss_fn = _pair("llama")
    tokens = 2 * SEQ
    for m, expect_logits in ((ref, True), (model, False)):
        m.train()
        shapes, loss = _saved_shapes(lambda: loss_fn(m, batch(0)))
        loss.backward()
        vocab_sized = [s for s in shapes if VOCAB in s and s != (VOCAB, 32)]  # (vocab, hidden): the head's weight
        largest = max((torch.Size(s).numel() for s in vocab_sized), default=0)
        if expect_logits:
            assert largest >= tokens * VOCAB  # the check sees the reference's logits
        else:
            assert largest <= CHUNK * VOCAB, vocab_sized


def _peak(model, batch, step=lambda m, b: m(**b).loss) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    model.train()
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step(model, batch).backward()
    return next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_peak_falls_by_about_the_logits(checkpoint):
    import transformers

    vocab, tokens = 4096, 2 * 128
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    plain, chunked = copy.deepcopy(base), copy.deepcopy(base)
    memopt.apply(plain, checkpoint=checkpoint)
    memopt.apply(chunked, checkpoint=checkpoint, loss=memopt.LossConfig(chunk_size=32))
    logits = tokens * vocab * 4  # float32
    saved = _peak(plain, batch) - _peak(chunked, batch)
    # The plain step holds the logits, their log-softmax and their gradient (3 x logits); the chunked one, one chunk
    # of them (1/8 of the tokens) a few times over.
    assert 1.5 * logits <= saved <= 3.5 * logits, (saved / logits)


def test_nanogpt_peak_falls_by_about_the_logits():
    """nanoGPT (ignore_index=-1 padding, its own F.cross_entropy) at vocab 4096: MemTracker's peak of a training step
    falls by the plain step's logits, their log-softmax and their gradient, less one chunk of them."""
    vocab, seq = 4096, 128
    torch.manual_seed(0)
    base = NanoGPT(vocab_size=vocab, block_size=seq)
    ids = torch.randint(0, vocab, (2, seq + 1), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[0, -9:] = -1
    batch = {"idx": ids[:, :-1], "targets": targets}
    plain, chunked = copy.deepcopy(base), copy.deepcopy(base)
    memopt.apply(plain)
    memopt.apply(chunked, loss=memopt.LossConfig(chunk_size=32))
    step = lambda m, b: m(**b)[1]  # noqa: E731
    logits = 2 * seq * vocab * 4  # float32
    saved = _peak(plain, batch, step) - _peak(chunked, batch, step)
    assert 1.5 * logits <= saved <= 3.5 * logits, (saved / logits)
