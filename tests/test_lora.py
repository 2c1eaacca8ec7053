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
