"""Issue 16, section 5: `memopt.estimate` and `memopt.plan` know the optimizer step in backward, the 4-bit and
Adafactor states (sized from `memopt.optim`'s registry, the one table), activation offloading and the optimizer
state in host memory; estimates agree with measured CPU steps (memopt.track) within 5%."""

from __future__ import annotations

import warnings

import pytest
import torch

import memopt
from memopt.estimation import OPTIMIZERS, find_loss
from memopt.estimation.optimizers import state_bytes


def _config(layers=2, hidden=128, vocab=1024, intermediate=None, kv_heads=2):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads)


def _measured(config, *, batch_size, seq_len, optimizer, in_backward=False, dtype=torch.float32, steps=2, **options):
    """(tracked peak, report, losses) of a real CPU step after `steps - 1` warm-up steps (the state exists)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, **options)
    model.train()
    kwargs = {"bf16_stochastic_round": True} if optimizer == "adamw4bit" and dtype == torch.bfloat16 else {}
    opt = memopt.optimizer(model, optimizer, in_backward=in_backward, **kwargs)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    losses = []

    def step():
        loss, _ = find_loss(model(input_ids=ids, labels=ids))  # the outputs (logits) dropped, as a loop does
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(steps - 1):
        step()
    with memopt.track(model, opt) as tracker:
        step()
    if in_backward:
        opt.remove()
    report = tracker.report()
    return report.peak_bytes, report, losses


CASES = [
    pytest.param(dict(optimizer="adamw", in_backward=True), id="adamw-in-backward"),
    pytest.param(dict(optimizer="adamw", in_backward=True, checkpoint=True, loss="chunked"),
                 id="adamw-in-backward-ckpt-chunked"),
    pytest.param(dict(optimizer="adamw8bit", in_backward=True), id="8bit-in-backward"),
    pytest.param(dict(optimizer="adamw8bit", in_backward=True, checkpoint=True, loss="chunked"),
                 id="8bit-in-backward-ckpt-chunked"),
    pytest.param(dict(optimizer="adamw4bit"), id="4bit"),
    pytest.param(dict(optimizer="adamw4bit", in_backward=True, checkpoint=True, loss="chunked"),
                 id="4bit-in-backward-ckpt-chunked"),
    pytest.param(dict(optimizer="adafactor"), id="adafactor"),
    pytest.param(dict(optimizer="adafactor", in_backward=True, checkpoint="selective"),
                 id="adafactor-in-backward-selective"),
    pytest.param(dict(optimizer="adamw", checkpoint=True, loss="chunked"), id="adamw-ckpt-chunked"),
]


@pytest.mark.parametrize("case", CASES)
def test_estimate_agrees_with_the_measured_step(case):
    if "8bit" in case["optimizer"]:
        pytest.importorskip("bitsandbytes")
    if "4bit" in case["optimizer"]:
        pytest.importorskip("torchao")
    config = _config()
    kw = dict(batch_size=2, seq_len=64)
    est = memopt.estimate(config, device="cpu", dtype=torch.float32, **kw, **case)
    measured, report, _ = _measured(config, **kw, **case)
    assert abs(est.peak_bytes - measured) <= 0.05 * measured, (est.peak_bytes, measured)
    assert sum(est.breakdown.values()) == est.peak_bytes
    if case.get("in_backward"):
        assert est.in_backward and any("in_backward" in n for n in est.notes)
        assert "step in backward" in str(est)


def test_in_backward_drops_the_gradients_from_the_peak_and_the_grad_column():
    """A plain step's peak holds every gradient (at the optimizer step, here with the logits gone thanks to the
    chunked loss); the step in backward keeps a few: the estimated grad column is a few layers' worth, like the
    tracker's, and the peak falls by about the trainable bytes."""
    config = _config(layers=4)
    kw = dict(batch_size=1, seq_len=32, device="cpu", dtype=torch.float32, checkpoint=True, loss="chunked",
              optimizer="adamw8bit")
    pytest.importorskip("bitsandbytes")
    plain = memopt.estimate(config, **kw)
    fused = memopt.estimate(config, in_backward=True, **kw)
    trainable = plain.report.total("trainable_bytes")
    assert plain.report.total("grad_bytes") == trainable
    assert fused.report.total("grad_bytes") <= trainable // 4
    assert plain.peak_bytes - fused.peak_bytes >= 0.5 * trainable


def test_the_state_is_memopt_optims_layout():
    """One source of truth: the estimator sizes every optimizer's state from `memopt.optim.OPTIMIZERS`' layouts
    (the ones tests/test_optim.py checks byte for byte against the real optimizers)."""
    from memopt.optim import OPTIMIZERS as REGISTRY

    params = [((1024, 128), torch.float32), ((128,), torch.float32), ((256, 128), torch.bfloat16)]
    for name, entry in REGISTRY.items():
        spec = OPTIMIZERS[name]
        expected = sum(entry.state_bytes(s, d) for s, d in params)
        shared = sum(torch.empty(s, dtype=d).nbytes for s, d in entry.shared_layout.values())
        if not spec.on_device:  # paged: in CUDA unified memory, not counted on the device
            assert state_bytes(spec, params) == 0
            continue
        assert state_bytes(spec, params) == expected + shared, name
        assert state_bytes(spec, params, in_backward=True) == expected + 3 * shared, name  # one optimizer each
    assert set(REGISTRY) <= set(OPTIMIZERS)


def test_a_registry_entry_is_an_optimizer_estimate_and_plan_know(monkeypatch):
    """Adding an optimizer to `memopt.optim.OPTIMIZERS` is all the estimator needs (its state from the layout, a step
    in place)."""
    import dataclasses

    from memopt.optim import OPTIMIZERS as REGISTRY

    lion = dataclasses.replace(REGISTRY["sgd"], name="lion", layout="one moment",
                               state_layout=lambda shape, dtype, **_: {"exp_avg": (shape, dtype)})
    monkeypatch.setitem(REGISTRY, "lion", lion)
    config = _config(layers=2, hidden=64, vocab=256)
    kw = dict(batch_size=1, seq_len=16, device="cpu", dtype=torch.float32)
    sgd = memopt.estimate(config, optimizer="sgd", **kw)
    est = memopt.estimate(config, optimizer="lion", **kw)
    assert est.peak_bytes == sgd.peak_bytes + sgd.report.total("trainable_bytes")
    assert "lion" in [o.value for o in memopt.estimation.SEARCH_SPACE["optimizer"].all_options()]


def test_offload_counts_saved_activations_on_the_host_on_cuda_only():
    config = _config(layers=3, hidden=64, vocab=512)
    kw = dict(batch_size=2, seq_len=256, dtype=torch.float32, optimizer="sgd")
    cuda = memopt.estimate(config, device="cuda", **kw)
    off = memopt.estimate(config, device="cuda", offload=True, **kw)
    assert off.peak_bytes < 0.6 * cuda.peak_bytes and off.breakdown["activations"] < cuda.breakdown["activations"] / 4
    assert any("offload=activations->host" in n for n in off.notes)
    assert "the pinned host memory of the offloaded activations" in off.not_counted
    ckpt = memopt.estimate(config, device="cuda", checkpoint=True, **kw)
    both = memopt.estimate(config, device="cuda", checkpoint=True, offload=True, **kw)
    assert both.peak_bytes <= ckpt.peak_bytes
    cpu = memopt.estimate(config, device="cpu", **kw)
    cpu_off = memopt.estimate(config, device="cpu", offload=True, **kw)
    assert cpu_off.peak_bytes == cpu.peak_bytes
    assert any("does nothing with device='cpu'" in n for n in cpu_off.notes)


def test_cpu_offload_keeps_only_small_parameters_state_on_the_device():
    config = _config(layers=2, hidden=64, vocab=512)
    kw = dict(batch_size=1, seq_len=16, dtype=torch.float32, device="cuda", checkpoint=True)
    plain = memopt.estimate(config, **kw)
    off = memopt.estimate(config, cpu_offload=True, **kw)
    assert 0 < off.breakdown["optimizer"] < plain.breakdown["optimizer"] / 10  # the norms' state (< 4096 values)
    assert off.peak_bytes < plain.peak_bytes
    assert any("cpu_offload" in n for n in off.notes)
    with pytest.raises(ValueError, match="cpu_offload=True.*device='cpu'"):
        memopt.estimate(config, cpu_offload=True, **{**kw, "device": "cpu"})
    with pytest.raises(TypeError, match="in_backward='yes'"):
        memopt.estimate(config, in_backward="yes", **kw)


def test_plan_finds_the_step_in_backward_with_4bit_state_and_says_why_cheaper_ones_did_not_fit():
    """A full fine-tune whose plain AdamW state does not fit: the plan goes through the cheaper optimizers first and
    lands on a step in backward with a small state."""
    pytest.importorskip("torchao")
    config = _config(layers=4, hidden=256, vocab=4096)
    kw = dict(batch_size=1, seq_len=64, device="cpu", precision="bf16-true", headroom=0, allow_lora=False)
    target = memopt.estimate(config, batch_size=1, seq_len=64, device="cpu", precision="bf16-true",
                             optimizer="adamw4bit", in_backward=True, checkpoint="full", loss="chunked")
    p = memopt.plan(config, target.peak_bytes, **kw)
    assert p.fits and p.estimate.peak_bytes <= target.peak_bytes
    assert p.in_backward or p.optimizer in ("adamw4bit", "adafactor")
    text = str(p)
    assert "in_backward" in " ".join(p.space) and "optimizer step in backward" in text
    assert "at the peak: params" in text
    assert all(not c.fits for c in p.tried[:-1])
    if p.in_backward:
        assert "in_backward=True" in text
    # AdamW plans (exact or quantized) come before Adafactor's
    ranks = [OPTIMIZERS[c.optimizer].adam for c in p.tried]
    assert ranks == sorted(ranks, reverse=True) or p.optimizer != "adafactor"


def test_plan_searches_offloading_on_cuda_only():
    config = _config(layers=2, hidden=64, vocab=256)
    kw = dict(batch_size=1, seq_len=16, headroom=0, allow_lora=False)
    cpu = memopt.plan(config, "1GiB", device="cpu", **kw)
    assert cpu.space["offload"] == ["no activation offloading"]
    assert cpu.space["cpu_offload"] == ["optimizer state on the device"]
    assert any("offload=True (needs device='cuda')" in n for n in cpu.notes)
    cuda = memopt.plan(config, "1GiB", device="cuda", **kw)
    assert cuda.space["offload"] == ["no activation offloading", "activation offloading"]
    # offloading is only combined with full checkpointing (the blocks' inputs are all it copies)
    only = memopt.plan(config, "1MiB", device="cuda", offload=True, **kw)
    assert {c.options.get("checkpoint") for c in only.tried} == {"full"}


def test_the_headline_recipe_trains_on_cpu_within_its_estimate():
    """The 7B-on-24-GiB recipe (bf16 weights, in-backward 4-bit AdamW with bf16 stochastic rounding, checkpointing,
    the chunked loss) on a small Llama on CPU: the loss falls and the tracked peak is within 5% of the estimate
    (`python benchmarks/fullft.py --headline` runs it at ~100M parameters)."""
    pytest.importorskip("torchao")
    # two weight shapes only: torchao compiles its update once per shape (seconds each on CPU)
    config = _config(layers=2, hidden=128, vocab=1024, intermediate=128, kv_heads=4)
    recipe = dict(optimizer="adamw4bit", in_backward=True, checkpoint="full", loss="chunked")
    est = memopt.estimate(config, batch_size=1, seq_len=64, device="cpu", precision="bf16-true", **recipe)
    measured, report, losses = _measured(config, batch_size=1, seq_len=64, dtype=torch.bfloat16, steps=4, **recipe)
    assert losses[-1] < losses[0] - 0.2, losses
    assert abs(est.peak_bytes - measured) <= 0.05 * measured, (est.peak_bytes, measured)
    assert report.peak_breakdown["grads"] <= report.total("trainable_bytes") // 8


def test_cli_estimate_and_plan_take_the_optimizer_flags(tmp_path, capsys):
    import json

    from memopt.cli import main

    path = tmp_path / "tiny.json"
    _config(layers=2, hidden=64, vocab=256).to_json_file(path)
    base = ["estimate", str(path), "--seq-len", "32", "--device", "cpu", "--precision", "32-true", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--in-backward", "--optimizer", "adafactor"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["in_backward"] and fused["optimizer"] == "adafactor" and fused["peak_bytes"] < plain["peak_bytes"]
    assert main(base + ["--offload"]) == 0
    assert any("does nothing with device='cpu'" in n for n in json.loads(capsys.readouterr().out)["notes"])
    with pytest.raises(SystemExit, match="cpu_offload=True"):
        main(base + ["--cpu-offload"])
    assert main(["plan", str(path), "--seq-len", "32", "--device", "cpu", "--precision", "32-true", "--budget",
                 "1GiB", "--in-backward", "yes", "--optimizer", "adamw8bit,adamw4bit", "--no-lora"]) == 0
    text = capsys.readouterr().out
    assert "in_backward=True" in text and "optimizer step in backward" in text
