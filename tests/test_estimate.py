"""memopt.estimate / memopt.plan: predictions on fake tensors agree with measured steps, sized exactly where a layout
is known, fast and light on a 7B config, and refuse bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from models import ALL_MODELS

import memopt
from memopt.estimation import adamw8bit_state_bytes, parse_bytes, quantized_layout

ROOT = Path(__file__).resolve().parent.parent


def _measured(config, batch_size=2, seq_len=16, optimizer="adamw", **options):
    """Peak of a real steady-state CPU step of the model built from `config`: (our tracker, PyTorch's MemTracker or
    None when it cannot run, e.g. on frozen weights)."""
    import transformers

    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, **options)
    model.train()
    opt = memopt.optimizer(model, optimizer)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with memopt.track(model, opt) as tracker:
        step()
    reference = None
    if all(p.requires_grad for p in model.parameters()):
        from torch.distributed._tools.mem_tracker import MemTracker

        mt = MemTracker()
        mt.track_external(model, opt)
        with mt:
            step()
        reference = mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return tracker.report().peak_bytes, reference


def _config(name):
    model, _, _ = ALL_MODELS[name]()
    return model.config


@pytest.mark.parametrize("name,options", [
    ("llama", {}), ("llama", {"checkpoint": True}), ("llama", {"checkpoint": "selective"}), ("mistral", {}),
    ("qwen2", {"checkpoint": True}), ("gpt2", {}), ("gpt_neox", {}), ("opt", {"checkpoint": True}), ("t5", {}),
])
def test_estimate_agrees_with_the_measured_step_on_cpu(name, options):
    config = _config(name)
    est = memopt.estimate(config, batch_size=2, seq_len=16, device="cpu", dtype=torch.float32, **options)
    ours, reference = _measured(config, **options)
    assert abs(est.peak_bytes - ours) <= 0.05 * ours, (est.peak_bytes, ours)
    assert abs(est.peak_bytes - reference) <= 0.05 * reference, (est.peak_bytes, reference)
    assert sum(est.breakdown.values()) == est.peak_bytes
    assert isinstance(est.report, memopt.MemoryReport) and est.report.layers


def test_estimate_with_quantization_and_lora_agrees_with_a_real_bitsandbytes_step():
    pytest.importorskip("bitsandbytes")
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4)
    for quant in ("4bit", "8bit"):
        est = memopt.estimate(config, batch_size=2, seq_len=32, device="cpu", dtype=torch.float32, quant=quant,
                              lora=8, checkpoint=True)
        ours, _ = _measured(config, batch_size=2, seq_len=32, quant=quant, lora=8, checkpoint=True)
        assert abs(est.peak_bytes - ours) <= 0.05 * ours, (quant, est.peak_bytes, ours)
        assert any("exact storage layout" in n for n in est.notes)


@pytest.mark.parametrize("out_f,in_f,bits,dq", [(1024, 1024, 4, True), (384, 1536, 4, False), (256, 512, 8, False)])
def test_quantized_layout_is_bitsandbytes_storage(out_f, in_f, bits, dq):
    pytest.importorskip("bitsandbytes")
    from memopt.transforms.quant import quantized_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f), torch.nn.ReLU(), torch.nn.Linear(out_f, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, quant=memopt.QuantConfig(bits=bits, double_quant=dq))
    layout = quantized_layout(out_f, in_f, bits, dq)
    expected = sum(torch.empty(shape, dtype=dtype).nbytes for shape, dtype in layout.values())
    assert quantized_bytes(model[0]) == expected


def test_adamw8bit_state_is_bitsandbytes_layout():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 8))  # one big, one small weight
    opt = memopt.optimizer(model, "adamw8bit")
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    state = {id(t.untyped_storage()): t.untyped_storage().nbytes()
             for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1}
    assert adamw8bit_state_bytes(list(model.parameters())) == sum(state.values())


def test_custom_model_with_inputs_callable():
    model, batch, loss_fn = ALL_MODELS["nanogpt"]()
    b = batch(0)
    est = memopt.estimate(lambda: ALL_MODELS["nanogpt"]()[0], inputs=lambda: b, device="cpu", checkpoint=True)
    memopt.apply(model, checkpoint=True)
    opt = torch.optim.AdamW(model.parameters())

    def step():
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with memopt.track(model, opt) as tracker:
        step()
    measured = tracker.report().peak_bytes
    assert abs(est.peak_bytes - measured) <= 0.05 * measured


def test_generate_mode_counts_the_kv_cache_with_gqa():
    config = _config("mistral")  # 4 attention heads, 2 KV heads
    est = memopt.estimate(config, batch_size=3, seq_len=40, mode="generate", device="cpu", dtype=torch.float32)
    head_dim = config.hidden_size // config.num_attention_heads
    # seq_len = prompt + generated; the last generated token never enters the cache (39 tokens), and Mistral's
    # sliding-window cache layers keep a small counter tensor each (the cache object's bytes, as the tracker counts)
    kv = 2 * config.num_hidden_layers * 2 * head_dim * 39 * 3 * 4
    assert kv <= est.kv_cache_bytes <= kv + 16 * config.num_hidden_layers
    assert est.per_sequence_bytes == est.kv_cache_bytes // 3
    assert est.peak_bytes >= est.weights_bytes + est.kv_cache_bytes
    small, big = est.max_concurrent_sequences(est.peak_bytes), est.max_concurrent_sequences(10 * est.peak_bytes)
    assert small >= 3 and big > small
    with pytest.raises(ValueError, match="mode='generate'"):
        memopt.estimate(config, batch_size=1, seq_len=8, device="cpu").max_concurrent_sequences("1GiB")

    # measured: a real prefill with the cache, as generate() runs it
    import transformers

    torch.manual_seed(0)
    model = memopt.apply(transformers.AutoModelForCausalLM.from_config(config).eval())  # sdpa, as estimated
    ids = torch.randint(0, config.vocab_size, (3, 40))
    with torch.no_grad(), memopt.track(model) as tracker:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    del out
    measured = tracker.report().peak_bytes
    assert abs(est.peak_bytes - measured) <= 0.05 * measured, (est.peak_bytes, measured)


def test_world_size_shards_state_per_rank():
    config = _config("llama")
    one = memopt.estimate(config, batch_size=2, seq_len=16, device="cpu", dtype=torch.float32)
    two = memopt.estimate(config, batch_size=2, seq_len=16, device="cpu", dtype=torch.float32, world_size=2)
    four = memopt.estimate(config, batch_size=2, seq_len=16, device="cpu", dtype=torch.float32, world_size=4)
    assert one.peak_bytes > two.peak_bytes > four.peak_bytes
    assert two.breakdown["optimizer"] == one.breakdown["optimizer"] // 2
    assert any("FSDP2" in n for n in two.notes)


def test_cuda_estimate_rounds_allocations_and_steps_adamw_with_foreach():
    config = _config("llama")
    cpu = memopt.estimate(config, batch_size=2, seq_len=16, device="cpu", dtype=torch.float32)
    cuda = memopt.estimate(config, batch_size=2, seq_len=16, device="cuda", dtype=torch.float32)
    assert cuda.peak_bytes > cpu.peak_bytes  # 512-byte blocks and foreach temporaries
    assert all(layer.param_bytes % 512 == 0 for layer in cuda.report.layers)
    assert "cuda (estimate)" in str(cuda)


def test_plan_picks_the_cheapest_plan_that_fits():
    import transformers

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4)
    kw = dict(batch_size=2, seq_len=64, device="cpu", dtype=torch.float32, headroom=0)
    est = {k: v for k, v in kw.items() if k != "headroom"}
    plain = memopt.estimate(config, **est)
    generous = memopt.plan(config, plain.peak_bytes + 1, **kw)
    assert generous.fits and generous.options == {} and generous.optimizer == "adamw"
    assert len(generous.tried) == 1 and generous.precision == "32-true"

    eight = memopt.estimate(config, optimizer="adamw8bit", checkpoint="selective", **est)
    assert eight.peak_bytes < plain.peak_bytes  # 8-bit state: 2 bytes per value instead of 8
    tight = memopt.plan(config, eight.peak_bytes, **kw)
    assert tight.fits and tight.estimate.peak_bytes <= eight.peak_bytes and tight.slowdown >= 1
    assert [c.fits for c in tight.tried] == [False] * (len(tight.tried) - 1) + [True]  # the first that fits
    assert tight.name == tight.tried[-1].name and tight.tried[-1].peak_bytes == tight.estimate.peak_bytes
    assert all(c.slowdown <= tight.slowdown for c in tight.tried)  # cheaper ones first
    assert all(c.reason for c in tight.tried[:-1])

    hopeless = memopt.plan(config, "1KiB", optimizer=["adamw", "adamw8bit"], weights=["full", "4bit+lora"], **kw)
    assert not hopeless.fits and hopeless.needed_bytes == hopeless.estimate.peak_bytes
    assert hopeless.needed_bytes == min(c.peak_bytes for c in hopeless.tried if c.peak_bytes is not None)
    assert all(c.bound_bytes <= c.peak_bytes for c in hopeless.tried if c.peak_bytes is not None)  # lower bounds
    assert "smallest peak" in str(hopeless)
    no_lora = memopt.plan(config, "1KiB", allow_lora=False, optimizer="adamw", loss=None, **kw)
    assert all(c.trains_all and "LoRA" not in c.name for c in no_lora.tried)

    model = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, **tight.options)  # the plan applies as is
    assert memopt.applied(model)


def test_bad_input_is_refused_clearly(tmp_path):
    config = _config("llama")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        memopt.estimate(str(tmp_path / "nope.json"))
    for kwargs, match in [({"optimizer": "adam9"}, "optimizer='adam9' is not supported"),
                          ({"mode": "serve"}, "mode='serve' is not supported"),
                          ({"device": "tpu"}, "device='tpu' is not supported"),
                          ({"batch_size": 0}, "batch_size=0 must be a positive int"),
                          ({"dtype": "int3"}, "dtype='int3' is not supported"),
                          ({"quant": "3bit"}, "quant='3bit' is not supported")]:
        with pytest.raises(ValueError, match=match):
            memopt.estimate(config, **kwargs)
    for bad in ("lots", "-3GiB", "24 parsecs", True, 0):
        with pytest.raises(ValueError, match="is not a size"):
            parse_bytes(bad)
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes(1.5e9) == 1500000000
    with pytest.raises(ValueError, match="chosen by the plan"):
        memopt.plan(config, "1GiB", quant="4bit")
    with pytest.raises(ValueError, match="plan\\(checkpoint='weird'\\): not an option of 'checkpoint'"):
        memopt.plan(config, "1GiB", checkpoint="weird")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "memopt", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_cli_estimate_and_plan(tmp_path, capsys):
    import transformers

    from memopt.cli import main

    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                             vocab_size=128).save_pretrained(tmp_path)
    cfg = str(tmp_path / "config.json")
    out = _cli("estimate", cfg, "--batch-size", "2", "--seq-len", "64", "--checkpoint", "full", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["peak_bytes"] > 0 and set(data["breakdown"]) == set(memopt.tracker.CATEGORIES)
    assert data["precision"] == "bf16-mixed" and data["optimizer"] == "adamw"  # the CLI's default, said
    out = _cli("plan", cfg, "--seq-len", "64", "--budget", "1KiB", "--no-lora", "--optimizer", "adamw", "--device", "cpu")
    assert out.returncode == 2 and "nothing fits" in out.stdout

    # the same entry point in-process (a subprocess per case costs seconds of imports)
    assert main(["estimate", cfg, "--seq-len", "64", "--budget", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "estimated peak" in text and "fits 1GiB: yes" in text and "model.layers.0" in text
    assert main(["plan", cfg, "--seq-len", "64", "--budget", "24GiB"]) == 0
    assert "plan: bf16-mixed, full fine-tune, adamw" in capsys.readouterr().out
    for args, message in [
        (("estimate", str(tmp_path / "missing.json")), f"memopt: config file not found: {tmp_path / 'missing.json'}"),
        (("estimate", cfg, "--optimizer", "adam9"), "memopt: optimizer='adam9' is not supported"),
        (("plan", cfg, "--budget", "lots"), "memopt: budget='lots' is not a size"),
        (("estimate", cfg, "--checkpoint", "weird"), "memopt: checkpoint='weird' is not supported"),
        (("estimate", cfg, "--dtype", "int3"), "memopt: --dtype 'int3' is not supported"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        assert isinstance(exit_.value.code, str) and "\n" not in exit_.value.code  # one line, exit status 1
        assert exit_.value.code.startswith(message), exit_.value.code


def test_7b_estimate_is_fast_light_and_where_known_figures_are(tmp_path):
    """The Llama-2-7B shape: bf16 AdamW full fine-tune with checkpointing ~ 4 x 13.5 GB (weights, grads, AdamW's two
    states) plus foreach AdamW's temporary and activations; QLoRA (4-bit + LoRA 16 + checkpointing) ~5 GB."""
    script = """
import json, resource, sys, time, transformers, memopt
cfg = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                               num_attention_heads=32, vocab_size=32000)
out = {}
for name, kw in {"full": dict(checkpoint=True), "qlora": dict(checkpoint=True, quant="4bit", lora=16)}.items():
    t0 = time.perf_counter()
    e = memopt.estimate(cfg, batch_size=1, seq_len=2048, dtype="bfloat16", **kw)
    out[name] = dict(peak=e.peak_bytes, seconds=time.perf_counter() - t0, breakdown=e.breakdown)
out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    gb = 1e9
    assert r["full"]["seconds"] < 120 and r["qlora"]["seconds"] < 120
    assert r["rss"] < 3 * 2**30
    weights = r["full"]["breakdown"]["params"]
    assert 13.3 * gb < weights < 13.7 * gb  # 6.74B bf16 parameters
    assert 4 * weights <= r["full"]["peak"] <= 5.2 * weights
    assert 4 * gb < r["qlora"]["peak"] < 7 * gb


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"checkpoint": True}, {"checkpoint": "selective"}])
def test_estimate_agrees_with_cuda_max_memory_allocated(options):
    import transformers

    config = transformers.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                      num_attention_heads=8)
    est = memopt.estimate(config, batch_size=4, seq_len=512, device="cuda", dtype=torch.bfloat16, **options)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    memopt.apply(model, **options)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 8000, (4, 512), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    del ids
    ids = torch.randint(0, 8000, (4, 512), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # params, optimizer state, ids: all counted by the estimate too
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    print(f"estimate {est.peak_bytes} measured {measured} (resident before the step {base})")
    assert abs(est.peak_bytes - measured) <= 0.05 * measured


@pytest.mark.parametrize("checkpoint", [False, True])
def test_estimate_accounts_for_the_chunked_loss(checkpoint):
    import transformers

    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4)
    kw = dict(batch_size=2, seq_len=64, device="cpu", dtype=torch.float32, checkpoint=checkpoint)
    plain = memopt.estimate(config, **kw)
    chunked = memopt.estimate(config, loss="chunked", **kw)
    ours, _ = _measured(config, batch_size=2, seq_len=64, checkpoint=checkpoint, loss="chunked")
    assert abs(chunked.peak_bytes - ours) <= 0.05 * ours, (chunked.peak_bytes, ours)
    assert chunked.peak_bytes < plain.peak_bytes
    assert chunked.report.layer("lm_head").activation_bytes < plain.report.layer("lm_head").activation_bytes + \
        plain.report.layer("").activation_bytes


# -- issue 13: what outside testing found ---------------------------------------------------------------------------
def test_checkpointed_llama_at_long_sequences_counts_no_seq_by_seq_mask():
    """Regression (issue 13, item 2): with use_cache=False (forced by checkpointing) transformers checks fake position
    ids for packed sequences, must assume packing and builds a (1, 1, T, T) mask (plus memopt's float copy) that the
    real step, whose positions are arange(T), never builds."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=4096)
    est = memopt.estimate(config, batch_size=1, seq_len=2048, device="cpu", dtype=torch.float32, checkpoint=True)
    ours, _ = _measured(config, batch_size=1, seq_len=2048, checkpoint=True)
    mask = 2048 * 2048 * (1 + 4)  # the bool mask and its float copy the real step does not have
    assert abs(est.peak_bytes - ours) <= 0.05 * ours < mask, (est.peak_bytes, ours)
    planned = memopt.plan(config, int(ours * 1.2), batch_size=1, seq_len=2048, device="cpu", dtype=torch.float32,
                          headroom=0, allow_lora=False, optimizer="adamw", loss=None)
    assert planned.fits  # the plan(90MiB) said nothing fits


def test_a_config_file_is_read_by_its_own_name(tmp_path):
    """Regression (issue 13, item 3): path/bench.json was read as path/config.json (or failed without one)."""
    import transformers

    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                             vocab_size=128).save_pretrained(tmp_path)
    (tmp_path / "config.json").rename(tmp_path / "bench.json")
    est = memopt.estimate(str(tmp_path / "bench.json"), batch_size=1, seq_len=16, device="cpu")
    assert est.report.layer("model.embed_tokens").params == 128 * 64
    transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=4,
                             vocab_size=64).save_pretrained(tmp_path)  # a different config.json beside it
    est = memopt.estimate(str(tmp_path / "bench.json"), batch_size=1, seq_len=16, device="cpu")
    assert est.report.layer("model.embed_tokens").params == 128 * 64
    assert memopt.estimate(str(tmp_path), batch_size=1, seq_len=16, device="cpu").report.layer(
        "model.embed_tokens").params == 64 * 32  # a folder: its config.json
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has none; name the JSON file itself"):
        memopt.estimate(str(empty))


def _nanogpt_returning_logits_and_loss():
    """nanoGPT's return convention: (logits, loss), loss None without targets."""
    import torch.nn.functional as F
    from models import VOCAB, NanoGPT

    class Returns(NanoGPT):
        def forward(self, idx, targets=None):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            loss = None if targets is None else F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))
            return logits, loss

    torch.manual_seed(0)
    return Returns()


def _measured_custom(build, batch, options, loss_fn):
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, **options)
    opt = torch.optim.AdamW(model.parameters())

    def step():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with memopt.track(model, opt) as tracker:
        step()
    return tracker.report().peak_bytes


@pytest.mark.parametrize("options", [{"checkpoint": True}, {},
                                     {"checkpoint": True, "loss": "nanogpt"}])
def test_estimate_finds_the_loss_the_way_the_model_returns_it(options):
    """Regression (issue 13, item 6): a (logits, loss) output was taken as its logits (1.71x too high with
    checkpointing), and loss=LossConfig(head=..., labels=...) crashed on the (None, loss) it returns."""
    from models import _ids

    options = dict(options)
    if options.get("loss") == "nanogpt":
        options["loss"] = memopt.LossConfig(head="lm_head", labels="targets")
    batch = {"idx": _ids(0), "targets": _ids(1)}
    est = memopt.estimate(_nanogpt_returning_logits_and_loss, inputs=lambda: batch, device="cpu", **options)
    measured = _measured_custom(_nanogpt_returning_logits_and_loss, batch, options,
                                lambda m, b: [t for t in m(**b) if t is not None and t.dim() == 0][0])
    assert abs(est.peak_bytes - measured) <= 0.05 * measured, (est.peak_bytes, measured)
    assert not any("stand-in" in n for n in est.notes)


def test_estimate_takes_a_loss_fn_and_says_when_it_stands_in():
    import torch.nn.functional as F
    from models import VOCAB, _ids

    batch = {"idx": _ids(0)}
    targets = _ids(1)

    def loss_fn(model, b):  # the loop computes the loss from the logits, as many do
        logits, _ = model(**b)
        return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

    est = memopt.estimate(_nanogpt_returning_logits_and_loss, inputs=lambda: batch, device="cpu", checkpoint=True,
                          loss_fn=loss_fn)
    measured = _measured_custom(_nanogpt_returning_logits_and_loss, batch, {"checkpoint": True}, loss_fn)
    assert abs(est.peak_bytes - measured) <= 0.05 * measured, (est.peak_bytes, measured)
    standin = memopt.estimate(_nanogpt_returning_logits_and_loss, inputs=lambda: batch, device="cpu")
    assert any("stand-in loss" in n and "loss_fn=" in n for n in standin.notes)  # no targets: said, not hidden
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        memopt.estimate(_nanogpt_returning_logits_and_loss, inputs=lambda: batch, device="cpu",
                        loss_fn=lambda m, b: m(**b)[0])
    with pytest.raises(ValueError, match="which is the loss\\? pass loss_fn="):
        memopt.estimation.find_loss((torch.tensor(1.0), torch.tensor(2.0)))
