"""lora= and memopt.optimizer: a quantized model still trains, only adapters change, nothing is upcast needlessly."""

from __future__ import annotations


import pytest
import torch

import memopt

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def _llama(dtype=torch.float32, seed=0):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def test_4bit_lora_checkpoint_trains_only_adapters_and_the_loss_falls():
    model, batch = _llama()
    memopt.apply(model, quant="4bit", lora=8, checkpoint=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(memopt.applied(model).touched("lora")) == 2 * 7  # all Linear layers but the head
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = memopt.optimizer(model, "adamw", lr=1e-2)
    losses = []
    model.train()
    for _ in range(15):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the quantized base did not move


def test_base_state_dict_keys_unchanged_and_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model, batch = _llama()
    memopt.apply(model, quant="4bit")
    keys_quant = set(model.state_dict())
    memopt.apply(model, lora=4)
    keys = set(model.state_dict())
    assert keys_quant <= keys and all("lora_" in k for k in keys - keys_quant)  # no base_layer. in any key
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # non-zero adapters, so the round trip is not trivially equal
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    fresh, _ = _llama(seed=7)
    memopt.apply(fresh, quant="4bit", lora=4)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_adapters_save_with_peft():
    model, _ = _llama()
    memopt.apply(model, quant="8bit", lora=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = peft.get_peft_model_state_dict(model)
    assert adapters and all("lora_" in k for k in adapters)
    assert set(memopt.applied(model).touched("lora")) == {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                         for p in ("q_proj", "v_proj")}


def test_memopt_quantized_model_accepts_get_peft_model():
    model, batch = _llama()
    memopt.apply(model, quant="4bit")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model(**batch).loss.backward()
    assert any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_bf16_only_adapters_are_upcast_unlike_prepare_model_for_kbit_training():
    model, _ = _llama(torch.bfloat16)
    memopt.apply(model, quant="4bit", lora=8)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert dtypes["model.norm.weight"] == dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes["lm_head.weight"] == torch.float32  # logits in float32 without a bf16 copy beside them
    assert "float32" in memopt.applied(model).touched("lora:head")["lm_head"]
    # The transformers/peft recipe on the same quantized base upcasts every non-quantized parameter.
    ref, _ = _llama(torch.bfloat16)
    memopt.apply(ref, quant="4bit")
    ref = peft.prepare_model_for_kbit_training(ref, use_gradient_checkpointing=False)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert ref.base_model.model.model.embed_tokens.weight.dtype == torch.float32
    # The difference is exactly the non-quantized, non-adapter parameters (embeddings, norms, head) at 2 more bytes.
    upcast = sum(p.numel() for n, p in model.named_parameters() if p.dtype == torch.bfloat16)
    assert upcast > 0
    assert _param_bytes(ref) - _param_bytes(model) == 2 * upcast


def test_optimizers():
    model, batch = _llama()
    memopt.apply(model, quant="4bit", lora=4)
    opt = memopt.optimizer(model, "adamw8bit", lr=1e-3, min_8bit_size=16)  # LoRA tensors are small
    model(**batch).loss.backward()
    opt.step()
    states = [s for s in opt.state.values() if s]
    assert states and any(t.dtype == torch.uint8 for s in states for t in s.values() if torch.is_tensor(t))
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"paged_adamw8bit.*needs the parameters on a CUDA device; on CPU use 'adamw8bit'"):
        memopt.optimizer(model, "paged_adamw8bit", lr=1e-3)
    with pytest.raises(ValueError, match=r"optimizer='sgd9' is not supported; use 'adamw', 'adamw8bit', 'paged_adamw8bit'"):
        memopt.optimizer(model, "sgd9")
    frozen, _ = _llama()
    memopt.apply(frozen, quant="4bit")
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters.*add lora=r"):
        memopt.optimizer(frozen)


@pytest.mark.parametrize("value, match", [(0, r"lora=0 is not supported"), ("big", r"lora='big' is not supported"),
                                          (2.5, r"lora=2.5 is not supported")])
def test_bad_lora_values(value, match):
    model, _ = _llama()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        memopt.apply(model, quant="4bit", lora=value)
    assert [n for n, _ in model.named_modules()] == before


def test_missing_peft_is_an_import_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    model, _ = _llama()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ImportError, match=r"lora= needs peft, which is not installed: pip install peft"):
        memopt.apply(model, quant="4bit", lora=8)
    assert [n for n, _ in model.named_modules()] == before


def test_bf16_qlora_uses_no_more_memory_than_the_transformers_peft_recipe(tmp_path):
    import sys
    import warnings
    from pathlib import Path

    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _common import profiled_peak_increment, resident_bytes

    # Logits (batch x seq x vocab) large enough to matter, as in real fine-tunes.
    config = transformers.LlamaConfig(vocab_size=8000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 8000, (4, 256), generator=torch.Generator().manual_seed(0))

    def measure(model):
        opt = memopt.optimizer(model, "adamw", lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        model.train()
        step()
        resident = sum(resident_bytes(model, opt).values())
        return resident, resident + profiled_peak_increment(step)

    ours = base.to(torch.bfloat16)
    base.save_pretrained(tmp_path)
    memopt.apply(ours, quant="4bit", lora=16, checkpoint=True)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config,
                                                               device_map="cpu", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.prepare_model_for_kbit_training(theirs)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    (our_resident, our_peak), (their_resident, their_peak) = measure(ours), measure(theirs)
    assert our_resident < their_resident and our_peak <= their_peak, (our_resident, their_resident, our_peak, their_peak)


def test_quant_after_lora_is_refused_and_leaves_the_model_untouched():
    model, _ = _llama()
    memopt.apply(model, lora=4)
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"already has LoRA adapters .* pass quant= and lora= in one call"):
        memopt.apply(model, quant="4bit")
    assert [(n, type(m)) for n, m in model.named_modules()] == before


@pytest.mark.parametrize("lora, match", [
    (lambda: peft.LoraConfig(r=4, target_modules=["no_such_layer"]), r"target_modules \['no_such_layer'\] matched no module"),
    (lambda: memopt.LoraSettings(r=4, dropout=1.5), r"dropout=1.5\) must be in \[0, 1\)"),
    (lambda: memopt.LoraSettings(r=4, alpha=0), r"alpha=0\) must be positive"),
])
def test_bad_lora_is_found_before_quantization_changes_anything(lora, match):
    model, _ = _llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        memopt.apply(model, quant="4bit", lora=lora())
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_default_targets_skip_the_tied_head_and_multihead_attention_projections():
    from models import nanogpt

    model, *_ = nanogpt()
    memopt.apply(model, lora=4)
    record = memopt.applied(model)
    assert "lm_head" not in record.touched("lora") and "lm_head" in record.skipped("lora")
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    memopt.apply(layer, lora=4, attention=None)
    assert "reads the weight directly" in memopt.applied(layer).skipped("lora")["self_attn.out_proj"]
    assert set(memopt.applied(layer).touched("lora")) == {"linear1", "linear2"}


def _train(model, batch, opt, steps=3):
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def _lora_entries(model):
    return [e for e in memopt.applied(model).entries if e.technique.split(":")[0] == "lora"]


@pytest.mark.parametrize("again", [
    lambda: 8, lambda: memopt.LoraSettings(r=8),
    lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
])
def test_applying_the_same_lora_again_keeps_the_trained_adapters(again):
    model, batch = _llama()
    memopt.apply(model, quant="4bit", lora=8, checkpoint=True)
    opt = memopt.optimizer(model, "adamw", lr=1e-2)
    _train(model, batch, opt, steps=2)
    record = _lora_entries(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    memopt.apply(model, lora=again(), checkpoint=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # lora_B is not zero again
    assert {id(p) for p in model.parameters()} == params  # the optimizer's parameters are the model's
    assert _lora_entries(model) == record
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    _train(model, batch, opt, steps=1)  # and training goes on with the same optimizer


@pytest.mark.parametrize("first, again, match", [
    (lambda: 8, lambda: 16, r"\(r=8, alpha=16 on 14 layers .*lora=16 asks for r=16, alpha=32 .*differ in rank, alpha\)"),
    (lambda: 8, lambda: memopt.LoraSettings(r=8, alpha=32), r"alpha=16.*asks for .*alpha=32"),
    (lambda: 8, lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]),
     r"on 14 layers.*asks for r=8, alpha=16 on 2 layers.*differ in layers"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), lambda: 4, r"on 4 layers.*on 14 layers"),
])
def test_applying_other_lora_settings_is_refused_and_leaves_the_model_untouched(first, again, match):
    model, batch = _llama()
    memopt.apply(model, lora=first())
    modules = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    record = str(memopt.applied(model))
    with pytest.raises(ValueError, match=r"already has LoRA adapters") as info:
        memopt.apply(model, lora=again(), checkpoint=True)
    assert info.match(match) and "would re-initialise them" in str(info.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert str(memopt.applied(model)) == record  # checkpoint=True in the same call was not applied either


def test_adapters_added_with_peft_are_kept_by_the_same_lora_config():
    model, batch = _llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft.inject_adapter_in_model(config, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    memopt.apply(model, lora=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    touched = memopt.applied(model).touched("lora")
    assert len(touched) == 4 and all("already in the model: kept" in d for d in touched.values())


@pytest.mark.parametrize("targets", [["input_layernorm"], ["q_proj", "post_attention_layernorm"], ["self_attn"],
                                     "model.layers.0.input_layernorm"])
def test_a_target_peft_cannot_wrap_is_refused_before_quantization_changes_anything(targets):
    model, _ = _llama()
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"PEFT cannot put LoRA on .*model.layers.0.\w+ \(Llama\w+\).*nn.Linear"):
        memopt.apply(model, quant="4bit", lora=peft.LoraConfig(r=4, target_modules=targets))
    assert [(n, type(m)) for n, m in model.named_modules()] == modules  # every Linear still an nn.Linear


def test_layer_types_peft_supports_beyond_linear_are_accepted():
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 32))
    memopt.apply(model, lora=peft.LoraConfig(r=4, target_modules=["0", "1"]), attention=None)
    assert set(memopt.applied(model).touched("lora")) == {"0", "1"}


@pytest.mark.parametrize("rank", [10**9, 65])
def test_a_rank_above_every_layers_dimensions_is_refused_before_anything_is_allocated(rank):
    model, _ = _llama()  # hidden 64: no targeted layer has both dimensions above 64
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=rf"lora r={rank} is above min\(in_features, out_features\) of every "
                                         r"layer it adapts \(at most 64 here.*model.layers.0.self_attn.q_proj"):
        memopt.apply(model, quant="4bit", lora=rank)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules


def test_a_rank_at_full_rank_for_some_layers_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    memopt.apply(model, lora=8, attention=None)
    touched = memopt.applied(model).touched("lora")
    assert "full rank" not in touched["0"]
    assert "r=8 is full rank here: min(in, out) = 4" in touched["2"]


def _resident(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("order", ["same call", "loss first"])
def test_chunked_loss_keeps_a_bf16_head_in_bf16(order):
    model, batch = _llama(torch.bfloat16)
    ref, _ = _llama(torch.bfloat16)
    memopt.apply(ref, quant="4bit", lora=8)
    if order == "same call":
        memopt.apply(model, quant="4bit", lora=8, loss="chunked")
    else:
        memopt.apply(model, loss="chunked")
        memopt.apply(model, quant="4bit", lora=8)
    assert model.lm_head.weight.dtype == torch.bfloat16 and ref.lm_head.weight.dtype == torch.float32
    assert "loss='chunked' computes it" in memopt.applied(model).skipped("lora:head")["lm_head"]
    assert _resident(ref) - _resident(model) == 2 * model.lm_head.weight.numel()  # 2 bytes per head weight
    model.train()
    ref.train()
    loss, ref_loss = model(**batch).loss, ref(**batch).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref_loss, rtol=2e-2)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("head_in_float32, loss, dtype", [(False, None, torch.bfloat16), (True, "chunked", torch.float32),
                                                          (None, None, torch.float32)])
def test_head_in_float32_switch(head_in_float32, loss, dtype):
    model, batch = _llama(torch.bfloat16)
    memopt.apply(model, quant="4bit", lora=memopt.LoraSettings(r=8, head_in_float32=head_in_float32), loss=loss)
    assert model.lm_head.weight.dtype == dtype
    model.train()
    model(**batch).loss.backward()


def test_bad_head_in_float32():
    with pytest.raises(TypeError, match=r"head_in_float32='yes'\) must be True, False or None"):
        memopt.LoraSettings(head_in_float32="yes")


def _entries_but_backend(model):
    """What apply recorded, without the SDPA kernels the first forwards saw (a new apply counts them again)."""
    return [e for e in memopt.applied(model).entries if e.technique != "attention:backend"]


def test_the_whole_qlora_call_twice_is_harmless():
    model, batch = _llama(torch.bfloat16)
    memopt.apply(model, quant="4bit", lora=16, checkpoint=True)
    opt = memopt.optimizer(model, "adamw", lr=1e-2)
    _train(model, batch, opt, steps=1)
    record = _entries_but_backend(model)
    assert "lora:head" in {e.technique for e in record}  # the head upcast is recorded, and stays recorded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    memopt.apply(model, quant="4bit", lora=16, checkpoint=True)  # a notebook cell run twice
    assert _entries_but_backend(model) == record
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    _train(model, batch, opt, steps=1)
