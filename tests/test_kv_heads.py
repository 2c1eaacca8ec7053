"""kv_heads=K: multi-head (or GQA) attention converted to K key/value heads by pooling contiguous groups.

Every transformers architecture whose config declares num_key_value_heads is enumerated from the installed
transformers (its configuration sources, read as text: cheap at collection) and built from a tiny config; each that
builds converts exactly (against a hand-computed reference: the original model with each group's key/value heads
replaced by their mean, expanded back) or is refused, with its reason in REFUSED, before anything changes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import memopt
from models import HF_MODELS, nanogpt


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine each op then waits for it (a 2-layer
    Mixtral forward: 12 ms with one thread, 900 ms with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# tiny configs for any architecture

_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16, vocab_size=128,
    max_position_embeddings=256, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, n_shared_experts=1, shared_expert_intermediate_size=32, expert_intermediate_size=32,
    # vision and audio towers of composite models
    depth=2, num_heads=4, embed_dim=64, hidden_dim=64, out_hidden_size=64, num_layers=2, d_model=64, encoder_layers=2,
    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
    projection_dim=64,
    # multi-head latent attention (DeepSeek-V2/V3 and their kin): the refusal is tested on a model that runs
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    # hybrid models: an attention layer among the two (Jamba, Bamba, RecurrentGemma)
    attn_layer_period=2, attn_layer_offset=1, attn_layer_indices=[1], expert_layer_period=2, expert_layer_offset=1,
    block_types=["recurrent", "attention"],
)
_NOT_ATTENTION = ("linear", "conv", "mamba", "recurrent", "hybrid_sliding")
_OVERRIDES = {"granitemoehybrid": dict(layer_types=["mamba", "attention"])}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _uses_mrope(model_type: str) -> bool:
    """Multimodal rotary embeddings (Qwen2-VL, GLM-4V, ...): their sections must fit the tiny head_dim."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    path = pathlib.Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    return path.is_file() and "mrope_section" in path.read_text(encoding="utf-8")


def _shrink(default, kv_heads: int, model_type: str) -> dict:
    d = default.to_dict()
    values = {**_TINY, "num_key_value_heads": kv_heads}
    over = {k: v for k, v in values.items() if k in d or k in _fields(type(default))}
    for k, v in over.items():  # a per-layer list in this architecture's config
        if isinstance(d.get(k), list) and not isinstance(v, list):
            over[k] = [v] * len(d[k])
    types = d.get("layer_types")
    if isinstance(types, list) and types:  # keep an attention layer among the two
        attn = next((t for t in types if "attention" in t and not any(w in t for w in _NOT_ATTENTION)), types[-1])
        over["layer_types"] = [types[0], attn] if types[0] != attn else [attn, attn]
        if isinstance(d.get("mlp_layer_types"), list):
            over["mlp_layer_types"] = d["mlp_layer_types"][:2]
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and ("mrope_section" in rope or (model_type and _uses_mrope(model_type))):
        over["rope_parameters"] = {**rope, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    return {**over, **_OVERRIDES.get(model_type, {})}


def tiny_config(model_type: str, kv_heads: int = 4):
    """The architecture's default config shrunk to hidden 64, 2 layers, 4 heads of 16, `kv_heads` key/value heads."""
    cls = transformers.CONFIG_MAPPING[model_type]
    default = cls()
    subs = {}
    for key in getattr(cls, "sub_configs", {}):
        sub = getattr(default, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            subs[key] = {**sub.to_dict(), **_shrink(sub, kv_heads, getattr(sub, "model_type", ""))}
    config = cls(**{**_shrink(default, kv_heads, model_type), **subs})
    for c in [config, *(getattr(config, k, None) for k in getattr(cls, "sub_configs", {}))]:
        if c is None or not hasattr(c, "to_dict"):
            continue
        vocab = getattr(c, "vocab_size", None) or 128
        for name, value in c.to_dict().items():  # special tokens inside the tiny vocabulary
            if name.endswith("_token_id") and isinstance(value, int) and not 0 <= value < vocab:
                setattr(c, name, vocab - 1)
    return config


def build(config, device=None):
    with torch.device(device or "cpu"):
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                return auto.from_config(config, attn_implementation="eager")
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc):
                    raise
    raise ValueError(f"no Auto class builds {type(config).__name__}")


def _kv_model_types() -> list[str]:
    """Model types whose config class declares num_key_value_heads, from the installed transformers' sources (no
    import of 800 configuration modules), plus composite models whose language model does (a few: their text
    models are tested on their own)."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    found = set()
    for path in root.glob("*/configuration_*.py"):
        text = path.read_text(encoding="utf-8")
        if "num_key_value_heads" not in text:
            continue
        for body in re.split(r"\nclass ", text)[1:]:
            match = re.search(r'model_type\s*=\s*"([^"]+)"', body)
            if match and re.search(r"\bnum_key_value_heads\b", body):
                found.add(match.group(1))
    composites = {"llava", "gemma3", "paligemma", "mllama", "idefics3", "internvl", "qwen2_vl", "mistral3"}
    known = set(transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES)
    return sorted((found | composites) & known)


# Architectures memopt refuses, and why (a substring of the error). Every refusal must be listed here.
REFUSED = {
    # multi-head latent attention: keys and values come from a shared latent, one per query head (sarvam_mla is
    # DeepSeek-V3's class)
    **{t: "nothing to pool" for t in ("axk2", "deepseek_v2", "dots3_note_text", "glm4_moe_lite", "hy_v4", "kimi_linear",
                                      "mistral4", "mistral_large4_text", "sarvam_mla")},
    # MLA too, with a part per key/value head that the rest of the architecture does not follow
    **{t: "its own forward fails with 2 key/value heads" for t in ("minicpm3", "deepseek_v32", "glm_moe_dsa")},
    "bailing_hybrid": "its own forward fails with 2 key/value heads",
    "esmc": "its own forward fails with 2 key/value heads",  # k_norm as wide as all query heads
    "deepseek_v4": "does not read config.num_key_value_heads",
    "doge": "a layout memopt does not know",  # dt_proj: (kv heads, kv heads x head_dim)
    "jetmoe": "does not share each key/value head among a contiguous group",  # mixture of attention heads
    "embedding_gemma2_text": "cannot be read as one number for every layer",
    "whisper": "another name for encoder_attention_heads",
}
H, K0, K = 4, 4, 2


def _forward(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = model(input_ids=ids, use_cache=False)
        except TypeError:
            out = model(input_ids=ids)
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _group_mean(t: torch.Tensor, dim: int, kv: int, k: int, pooling: str = "mean") -> torch.Tensor:
    """The reference: every head replaced by its group's mean (or first), the tensor kept at `kv` heads."""
    x = t.movedim(dim, 0)
    hd = x.shape[0] // kv
    x = x.reshape(k, kv // k, hd, *x.shape[1:])  # (groups, heads per group, head_dim, ...)
    y = x.mean(1, keepdim=True) if pooling == "mean" else x[:, :1]
    return y.expand_as(x).reshape(kv * hd, *x.shape[3:]).movedim(0, dim)


def _meta(model: nn.Module, config) -> nn.Module:
    """`model`'s class built from `config` on the meta device."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)(config)


def _reference(model: nn.Module, config_k, heads: int, kv: int, k: int, pooling: str = "mean") -> nn.Module:
    """`model` with its key/value heads replaced by their group's mean, as the architecture built for k heads says
    which tensors hold them: a dim of kv x head_dim, or the k and v parts of a fused (heads + 2 kv) x head_dim."""
    gqa = _meta(model, config_k)
    shapes = {n: t.shape for n, t in {**dict(gqa.named_parameters()), **dict(gqa.named_buffers())}.items()}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in {**dict(ref.named_parameters()), **dict(ref.named_buffers())}.items():
            if shapes[name] == t.shape:
                continue
            (dim,) = [i for i, (a, b) in enumerate(zip(t.shape, shapes[name])) if a != b]
            o, n = t.shape[dim], shapes[name][dim]
            if o // kv == n // k:
                t.copy_(_group_mean(t, dim, kv, k, pooling))
            else:
                hd = (o - n) // (2 * (kv - k))
                assert o == (heads + 2 * kv) * hd, name
                for start in (heads * hd, (heads + kv) * hd):
                    part = t.narrow(dim, start, kv * hd)
                    part.copy_(_group_mean(part, dim, kv, k, pooling))
    return ref


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, state: dict, config: dict | None = None) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert not memopt.applied(model)
    if config is not None:
        assert model.config.to_dict() == config


@pytest.mark.parametrize("model_type", _kv_model_types())
def test_every_architecture_converts_exactly_or_is_refused(model_type):
    try:
        config = tiny_config(model_type)
        size = sum(p.numel() for p in build(config, "meta").parameters())
        if size > 5_000_000:  # a tower the generic shrinking missed: too slow to build for real
            raise ValueError(f"{size / 1e6:.0f}M parameters")
        torch.manual_seed(0)
        model = build(config).eval()
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        before = _forward(model, ids)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{model_type} does not build and run on token ids from a tiny config: {type(exc).__name__}")
    text = model.config.get_text_config(decoder=True)
    if "num_key_value_heads" not in text.to_dict() and "num_key_value_heads" not in text.attribute_map:
        with pytest.raises(ValueError, match="has no num_key_value_heads"):
            memopt.apply(model, kv_heads=K, attention=None)
        return
    state, config_dict = _state(model), model.config.to_dict()
    if model_type in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model_type]):
            memopt.apply(model, kv_heads=K, attention=None)
        _assert_untouched(model, state, config_dict)
        return
    config_k = copy.deepcopy(model.config)
    config_k.get_text_config(decoder=True).num_key_value_heads = K
    ref = _reference(model, config_k, text.num_attention_heads, text.num_key_value_heads, K)
    memopt.apply(model, kv_heads=K, attention=None)
    assert model.config.get_text_config(decoder=True).num_key_value_heads == K
    # an ordinary GQA model of its architecture: the same keys and shapes as one built from the converted config
    fresh = _meta(model, model.config).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
    out, expected = _forward(model, ids), _forward(ref, ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(out, before, atol=1e-6)  # the conversion did change the model
    assert memopt.applied(model).touched("kv_heads")


# ----------------------------------------------------------------------------------------------------------------
# exactness against references written out by hand


def _llama(heads=8, kv=8, **kw):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv, k, pooling", [(8, 4, "mean"), (8, 2, "mean"), (8, 1, "mean"), (8, 2, "first"),
                                             (4, 2, "mean"), (4, 1, "first")])
def test_llama_equals_the_mean_pooled_reference(kv, k, pooling):
    model = _llama(kv=kv, attention_bias=True)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.copy_(_group_mean(proj.weight, 0, kv, k, pooling))  # (kv * hd, hidden)
                proj.bias.copy_(_group_mean(proj.bias, 0, kv, k, pooling))
    memopt.apply(model, kv_heads=memopt.KVHeadsConfig(k, pooling), attention=None)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (k * 8, 64) and attn.k_proj.out_features == k * 8
    assert attn.num_key_value_groups == 8 // k and model.config.num_key_value_heads == k
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    # the same through SDPA (memopt's default attention) and in training mode
    memopt.apply(model)
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_phi3_fused_qkv_equals_the_reference():
    config = transformers.Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=8, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    ref = copy.deepcopy(model)
    hd = 8
    with torch.no_grad():
        for layer in ref.model.layers:
            w = layer.self_attn.qkv_proj.weight  # rows [q: 8 heads | k: 8 heads | v: 8 heads] x hd
            for start in (8 * hd, 16 * hd):
                w[start:start + 8 * hd] = _group_mean(w[start:start + 8 * hd], 0, 8, 2)
    memopt.apply(model, kv_heads=2, attention=None)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == ((8 + 2 * 2) * hd, 64)
    assert model.model.layers[0].self_attn.num_key_value_heads == 2
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    assert "qkv_proj.weight" in memopt.applied(model).touched("kv_heads")["model.layers.0.self_attn"]


def test_olmo2_norm_over_all_key_heads_is_pooled_too():
    config = transformers.Olmo2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)  # not all ones: its pooling matters
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            a = layer.self_attn
            for t in (a.k_proj.weight, a.v_proj.weight, a.k_norm.weight):  # k_norm: RMSNorm(kv heads x hd)
                t.copy_(_group_mean(t, 0, 8, 4))
    memopt.apply(model, kv_heads=4, attention=None)
    assert model.model.layers[0].self_attn.k_norm.weight.shape == (32,)
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "mixtral"])
def test_current_number_of_kv_heads_is_bit_identical(name):
    model, batch, _ = HF_MODELS[name]()
    model.eval()
    kv = model.config.num_key_value_heads
    state, config = _state(model), model.config.to_dict()
    before = model(**batch()).logits
    memopt.apply(model, kv_heads=kv, attention=None)
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state) and model.config.to_dict() == config
    assert torch.equal(model(**batch()).logits, before)
    assert memopt.applied(model).skipped("kv_heads") == {
        "": f"{type(model).__name__} already has {kv} key/value heads (of 4 attention heads): nothing to pool"}
    assert not memopt.applied(model).touched("kv_heads")


# ----------------------------------------------------------------------------------------------------------------
# bad input: a clear error, the model untouched


@pytest.mark.parametrize("value, match", [
    (3, r"kv_heads=3 does not divide the 8 attention heads and 4 key/value heads of LlamaForCausalLM.*"
        r"use one of \[1, 2, 4\]"),
    (8, r"kv_heads=8 is more than the 4 key/value heads of LlamaForCausalLM.*cannot split them; "
        r"use one of \[1, 2, 4\]"),
    (16, r"kv_heads=16 is more than the 4 key/value heads"),
    (0, r"kv_heads=0 is not supported; use a positive int"),
    (-2, r"kv_heads=-2 is not supported; use a positive int"),
    (True, r"kv_heads=True is not supported; use a positive int \(e.g. kv_heads=2\), 'mqa'"),
    (2.0, r"kv_heads=2.0 is not supported"),
    ("gqa", r"kv_heads='gqa' is not supported"),
])
def test_bad_kv_heads_raise_and_leave_the_model_untouched(value, match):
    model = _llama(kv=4)
    state, config = _state(model), model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        memopt.apply(model, kv_heads=value, checkpoint=True)
    _assert_untouched(model, state, config)


def test_bad_config_raises():
    with pytest.raises(ValueError, match=r"KVHeadsConfig\(pooling='median'\) is not supported; use one of "
                                         r"\('mean', 'first'\)"):
        memopt.KVHeadsConfig(2, pooling="median")
    with pytest.raises(ValueError, match=r"kv_heads=0 is not supported"):
        memopt.KVHeadsConfig(0)
    from memopt.config import kv_heads_config

    assert kv_heads_config(2) == memopt.KVHeadsConfig(2) and kv_heads_config("mqa") == memopt.KVHeadsConfig(1)
    assert kv_heads_config(None) is None and kv_heads_config(False) is None


@pytest.mark.parametrize("name, match", [
    ("gpt2", r"GPT2LMHeadModel cannot be converted: its config \(GPT2Config\) has no num_key_value_heads"),
    ("opt", r"OPTForCausalLM cannot be converted: its config \(OPTConfig\) has no num_key_value_heads"),
    ("gpt_neox", r"GPTNeoXForCausalLM cannot be converted: its config \(GPTNeoXConfig\) has no num_key_value_heads"),
    ("bert", r"BertForMaskedLM cannot be converted: its config \(BertConfig\) has no num_key_value_heads"),
    ("t5", r"T5ForConditionalGeneration cannot be converted: its config \(T5Config\) has no num_key_value_heads"),
])
def test_architectures_without_kv_heads_are_refused_before_anything_changes(name, match):
    model, *_ = HF_MODELS[name]()
    state, config = _state(model), model.config.to_dict()
    with pytest.raises(ValueError, match=match + r".*memopt.register_kv_heads"):
        memopt.apply(model, kv_heads=1, checkpoint=True, loss="chunked" if name != "t5" else None)
    _assert_untouched(model, state, config)


def test_hand_written_model_without_a_registered_attention_is_refused():
    model, *_ = nanogpt()
    state = _state(model)
    with pytest.raises(ValueError, match=r"kv_heads=2: NanoGPT is not a transformers model and none of its modules "
                                         r"is an attention memopt knows how to convert; teach it with "
                                         r"memopt.register_kv_heads"):
        memopt.apply(model, kv_heads=2)
    _assert_untouched(model, state)


def test_quantized_or_lora_model_is_refused_convert_first():
    pytest.importorskip("bitsandbytes")
    model = _llama(kv=4)
    memopt.apply(model, quant="4bit", attention=None)
    state = _state(model)
    with pytest.raises(ValueError, match=r"k_proj is a Linear4bit, not the Linear its architecture builds.*pass "
                                         r"kv_heads= in the same memopt.apply call"):
        memopt.apply(model, kv_heads=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.config.num_key_value_heads == 4
    model = _llama(kv=4)
    memopt.apply(model, lora=4, attention=None)
    with pytest.raises(ValueError, match=r"k_proj is a Linear|not the Linear its architecture builds"):
        memopt.apply(model, kv_heads=2)
    assert model.config.num_key_value_heads == 4


# ----------------------------------------------------------------------------------------------------------------
# what a user does with a converted model


def test_generate_caches_k_over_h_of_the_original():
    def cache_bytes(model, cache_implementation=None):
        kwargs = {} if cache_implementation is None else {"cache_implementation": cache_implementation,
                                                           "disable_compile": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=0, **kwargs)
        tensors = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return out.sequences, sum(t.numel() * t.element_size() for t in tensors), tensors[0].shape

    base = _llama()
    seq, full, shape = cache_bytes(base)
    assert shape[1] == 8 and seq.shape == (2, 15)
    _, full_static, _ = cache_bytes(base, "static")
    for k in (4, 2, 1):
        model = memopt.apply(copy.deepcopy(base), kv_heads=k)
        seq, nbytes, shape = cache_bytes(model)
        assert shape[1] == k and seq.shape == (2, 15)
        assert nbytes * 8 == full * k  # exactly K/H of the multi-head cache
        if k == 2:
            _, static, _ = cache_bytes(model, "static")  # the static cache is sized from the converted config
            assert static * 8 == full_static * k


def test_save_pretrained_loads_with_plain_transformers_without_memopt(tmp_path):
    model = memopt.apply(_llama(), kv_heads=2, checkpoint=True, loss="chunked")
    model.eval()
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    torch.save({"ids": IDS, "logits": expected}, tmp_path / "expected.pt")
    code = f"""
import sys
class NoMemopt:
    def find_spec(self, name, path=None, target=None):
        if name == "memopt" or name.startswith("memopt."):
            raise ImportError("memopt is not installed here")
sys.meta_path.insert(0, NoMemopt())
import torch, transformers
model, info = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, output_loading_info=True)
assert not any(info.values()), info
assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
saved = torch.load({str(tmp_path / "expected.pt")!r})
torch.testing.assert_close(model.eval()(saved["ids"]).logits, saved["logits"], rtol=1e-5, atol=1e-5)
out = model.generate(saved["ids"], attention_mask=torch.ones_like(saved["ids"]), max_new_tokens=3, do_sample=False,
                     pad_token_id=0, return_dict_in_generate=True)
assert out.past_key_values.layers[0].keys.shape[1] == 2
assert not [m for m in sys.modules if m.startswith("memopt")]
print("ok")
"""
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["num_key_value_heads"] == 2


def test_applied_records_every_layer_and_stays():
    model = _llama()
    memopt.apply(model, kv_heads=2)
    record = memopt.applied(model)
    touched = record.touched("kv_heads")
    assert list(touched) == ["", "model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert touched[""] == "8 -> 2 key/value heads (LlamaConfig.num_key_value_heads; mean pooling) of 8 query heads"
    assert touched["model.layers.0.self_attn"] == ("8 -> 2 key/value heads (mean of 4 heads; k_proj.weight, "
                                                   "v_proj.weight) of 8 query heads")
    assert record.configs["kv_heads"] == memopt.KVHeadsConfig(2)
    assert [e.technique for e in record.entries][:3] == ["kv_heads"] * 3
    memopt.apply(model, kv_heads="mqa")  # GQA-2 -> MQA pools further; the record keeps the history
    assert memopt.applied(model).touched("kv_heads")["model.layers.1.self_attn"].startswith("8 -> 2 -> 1 key/value")
    memopt.apply(model, kv_heads=1)  # already 1: nothing changes, the record stays
    assert memopt.applied(model).touched("kv_heads")[""].startswith("8 -> 2 -> 1 key/value heads")
    memopt.remove(model)  # cannot be undone: the record and the config stay
    assert memopt.applied(model).touched("kv_heads") and model.config.num_key_value_heads == 1
    assert not memopt.applied(model).touched("attention")


def test_runs_first_and_composes_with_every_option_in_one_call():
    pytest.importorskip("bitsandbytes")
    model = _llama().train()
    memopt.apply(model, kv_heads=2, quant="4bit", lora=4, checkpoint=True, loss="chunked")
    record = memopt.applied(model)
    techniques = list(dict.fromkeys(e.technique.split(":")[0] for e in record.entries))
    assert techniques[0] == "kv_heads" and {"quant", "lora", "attention", "loss", "checkpoint"} <= set(techniques)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert type(k_proj.base_layer).__name__ == "Linear4bit" and k_proj.base_layer.out_features == 16  # quantized after
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and torch.isfinite(loss)


def test_uptraining_recipe_gives_the_converted_models_loss_and_gradients():
    """kv_heads=2, checkpoint=True, loss="chunked" in one call: the same loss and gradients as the converted model
    trained plainly."""
    base = _llama()
    plain = memopt.apply(copy.deepcopy(base), kv_heads=2, attention=None).train()
    ours = memopt.apply(copy.deepcopy(base), kv_heads=2, checkpoint=True, loss="chunked").train()
    for m in (plain, ours):
        m(input_ids=IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(ours(input_ids=IDS, labels=IDS).loss, plain(input_ids=IDS, labels=IDS).loss)
    for (n, a), (_, b) in zip(plain.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_model_pools_in_float32():
    model = _llama(kv=8).to(torch.bfloat16)
    w = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    memopt.apply(model, kv_heads=2, attention=None)
    got = model.model.layers[0].self_attn.k_proj.weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, w.float().view(2, 4, 8, 64).mean(1).reshape(16, 64).to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------------
# register_kv_heads: hand-written attention


class HandAttention(nn.Module):
    """A hand-written grouped-query attention: separate q/k/v with biases, or one fused [q | k | v] projection."""

    def __init__(self, d: int = 32, n_head: int = 4, n_kv: int = 4, fused: bool = False):
        super().__init__()
        self.n_head, self.n_kv, self.hd, self.fused = n_head, n_kv, d // n_head, fused
        if fused:
            self.qkv = nn.Linear(d, d + 2 * n_kv * self.hd)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, n_kv * self.hd), nn.Linear(d, n_kv * self.hd)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split([C, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2).repeat_interleave(self.n_head // self.n_kv, 1)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2).repeat_interleave(self.n_head // self.n_kv, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class HandModel(nn.Module):
    def __init__(self, fused: bool = False):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList([HandAttention(fused=fused) for _ in range(2)])
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _hand_layout(m: HandAttention) -> memopt.KVLayout:
    kv = m.n_kv * m.hd
    if m.fused:
        d = m.n_head * m.hd
        tensors = {"qkv.weight": [(0, d, d + kv), (0, d + kv, d + 2 * kv)],
                   "qkv.bias": [(0, d, d + kv), (0, d + kv, d + 2 * kv)]}
    else:
        tensors = {"k.weight": 0, "k.bias": 0, "v.weight": 0, "v.bias": 0}
    return memopt.KVLayout(heads=m.n_head, kv_heads=m.n_kv, tensors=tensors,
                           update=lambda m, k: setattr(m, "n_kv", k))


@pytest.fixture
def hand_registered():
    from memopt.transforms import kv_heads

    memopt.register_kv_heads(HandAttention, _hand_layout)
    yield
    kv_heads._REGISTERED.pop(HandAttention, None)


@pytest.mark.parametrize("fused", [False, True])
def test_register_kv_heads_teaches_a_hand_written_attention(hand_registered, fused):
    torch.manual_seed(0)
    model = HandModel(fused)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.layers:
            if fused:
                for t in (m.qkv.weight, m.qkv.bias):
                    for start in (32, 64):
                        t[start:start + 32] = _group_mean(t[start:start + 32], 0, 4, 2)
            else:
                for t in (m.k.weight, m.k.bias, m.v.weight, m.v.bias):
                    t.copy_(_group_mean(t, 0, 4, 2))
    ids = torch.randint(0, 50, (2, 10))
    memopt.apply(model, kv_heads=2, attention=None)
    assert model.layers[0].n_kv == 2
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert list(memopt.applied(model).touched("kv_heads")) == ["layers.0", "layers.1"]


def test_register_kv_heads_bad_layouts(hand_registered):
    from memopt.transforms import kv_heads

    model = HandModel()
    state = _state(model)
    kv_heads._REGISTERED[HandAttention] = lambda m: memopt.KVLayout(4, 4, {"key.weight": 0})
    with pytest.raises(ValueError, match=r"KVLayout.tensors names 'key.weight', which HandAttention does not have"):
        memopt.apply(model, kv_heads=2)
    kv_heads._REGISTERED[HandAttention] = lambda m: memopt.KVLayout(4, 4, {"k.weight": (0, 0, 6)})
    with pytest.raises(ValueError, match=r"slice 0:6 of dim 0 \(size 32\) does not hold 4 heads of equal size"):
        memopt.apply(model, kv_heads=2)
    kv_heads._REGISTERED[HandAttention] = lambda m: memopt.KVLayout(4, 4, {"k.weight": 0})
    with pytest.raises(ValueError, match=r"kv_heads=3 does not divide the 4 attention heads"):
        memopt.apply(model, kv_heads=3)
    kv_heads._REGISTERED[HandAttention] = lambda m: {"k.weight": 0}
    with pytest.raises(TypeError, match=r"returned dict, not a memopt.KVLayout"):
        memopt.apply(model, kv_heads=2)
    _assert_untouched(model, state)
    with pytest.raises(TypeError, match=r"register_kv_heads expects an nn.Module subclass"):
        memopt.register_kv_heads(int, _hand_layout)


# ----------------------------------------------------------------------------------------------------------------
# memopt.estimate(kv_heads=)


def test_estimate_with_kv_heads_for_training_and_generation():
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8)
    hd, layers = 16, 2
    gen = {k: memopt.estimate(config, mode="generate", batch_size=2, seq_len=256, kv_heads=k, device="cpu")
           for k in (None, 2)}
    # the cache object after generating: the last of the seq_len tokens is generated, never cached
    assert gen[None].kv_cache_bytes == 2 * layers * 8 * hd * (256 - 1) * 2 * 4
    assert gen[2].kv_cache_bytes * 4 == gen[None].kv_cache_bytes
    assert gen[2].options["kv_heads"] == 2
    train = {k: memopt.estimate(config, batch_size=2, seq_len=64, kv_heads=k, device="cpu", checkpoint=True)
             for k in (None, 2)}
    pooled = layers * 2 * 128 * (8 - 2) * hd * 4  # k_proj and v_proj of every layer, float32
    assert train[None].breakdown["params"] - train[2].breakdown["params"] == pooled
    assert train[2].peak_bytes < train[None].peak_bytes
    # the estimate of the converted model is the estimate of the GQA config it becomes
    gqa = transformers.LlamaConfig(**{**config.to_dict(), "num_key_value_heads": 2})
    same = memopt.estimate(gqa, batch_size=2, seq_len=64, device="cpu", checkpoint=True)
    assert same.peak_bytes == train[2].peak_bytes
    with pytest.raises(ValueError, match=r"kv_heads=3 does not divide"):
        memopt.estimate(config, kv_heads=3, device="cpu")
