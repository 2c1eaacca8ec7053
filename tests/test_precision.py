"""Precision as users name it ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"): the names and their
rules with dtype=, autocast's weight copies in the tracker's report, and estimates of mixed and pure bf16 steps within
5% of the measured CPU step (CPU autocast is bf16), with checkpointing, the chunked loss and QLoRA."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import memopt
from memopt.precision import PRECISIONS, precision_config, resolve_precision
from memopt.tracker import CATEGORIES, MemoryReport


def _llama(layers=2, vocab=512, hidden=128):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4)


def _measured(config, precision, batch_size=2, seq_len=64, optimizer="adamw", **options):
    """The tracked report of a real steady-state CPU step in `precision`: the model built in its parameter dtype,
    forward and loss under its autocast, a GradScaler for "16-mixed"."""
    import transformers

    p = precision_config(precision)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=p.param_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, **options)
    model.train()
    opt = memopt.optimizer(model, optimizer)
    # a modest initial scale: the default 2**16 can overflow a random model's first fp16 gradients, and a skipped
    # step leaves no optimizer state (the estimate is of a step that is taken)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if p.grad_scaler else None
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))

    def step():
        with p.autocast("cpu"):
            loss = model(input_ids=ids, labels=ids).loss
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    step()
    assert opt.state, "the warm-up step was skipped"
    with memopt.track(model, opt) as tracker:
        step()
    return tracker.report()


def test_names_and_the_rules_with_dtype():
    assert set(PRECISIONS) == {"32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"}
    mixed = precision_config("bf16-mixed")
    assert mixed.param_dtype == torch.float32 and mixed.compute_dtype == torch.bfloat16 and not mixed.grad_scaler
    assert precision_config("16-mixed").grad_scaler and precision_config("bf16-true").param_dtype == torch.bfloat16
    # dtype alone: its "-true" precision (what dtype= meant before); both: they must agree; neither: the model's
    assert resolve_precision(None, "bfloat16")[0].name == "bf16-true"
    assert resolve_precision(None, torch.float32)[0].name == "32-true"
    assert resolve_precision("bf16-mixed", "float32")[0].name == "bf16-mixed"
    assert resolve_precision(None, None, torch.bfloat16)[0].name == "bf16-true"
    assert resolve_precision(None, None, None)[0].name == "32-true"
    with pytest.raises(ValueError, match=r"dtype=bfloat16 conflicts with precision='bf16-mixed', whose parameters are "
                                         r"float32 .*precision='bf16-true' for bfloat16 parameters"):
        resolve_precision("bf16-mixed", "bfloat16")
    with pytest.raises(ValueError, match=r"precision='bf16' is not supported; use one of '32-true', .*'bf16-mixed' "
                                         r"\(float32 weights, bf16 autocast"):
        precision_config("bf16")
    with pytest.raises(ValueError, match="precision='fp8' is not supported"):
        memopt.estimate(_llama(), precision="fp8")
    with pytest.raises(ValueError, match="conflicts with precision='bf16-mixed'"):
        memopt.estimate(_llama(), precision="bf16-mixed", dtype=torch.bfloat16)
    assert isinstance(mixed.autocast("cpu"), torch.autocast) and precision_config("32-true").scaler("cpu") is None


def test_the_tracker_files_autocasts_weight_copies_in_their_own_category():
    """Under bf16 autocast each weight's bf16 copy is cast once per forward (cached) and kept for backward: category
    "autocast" and each layer's autocast_bytes, not activations; a fp32 step has none."""
    config = _llama()
    mixed = _measured(config, "bf16-mixed")
    plain = _measured(config, "32-true")
    assert "autocast" in CATEGORIES and plain.peak_breakdown["autocast"] == 0
    assert plain.total("autocast_bytes") == 0
    for i in range(2):  # a block's matmul weights (not its norms): 2 bytes each
        block = [layer for layer in mixed.layers if layer.name.startswith(f"model.layers.{i}.")]
        weights = sum(layer.params for layer in block if layer.type == "Linear")
        assert sum(layer.autocast_bytes for layer in block) == 2 * weights
    assert mixed.layer("lm_head").autocast_bytes == 2 * config.vocab_size * config.hidden_size
    assert mixed.layer("model.embed_tokens").autocast_bytes == 0  # an embedding is not autocast
    assert sum(mixed.peak_breakdown.values()) == mixed.peak_bytes

    # plain data through every display
    assert MemoryReport.from_dict(json.loads(mixed.to_json())) == mixed
    assert "autocast" in mixed.table().splitlines()[1] and " autocast " in mixed.table()
    assert " autocast " not in plain.table() and "autocast" not in plain.table().splitlines()[1]
    assert "autocast_bytes" in mixed.to_csv().splitlines()[0]
    comparison = memopt.compare(plain, mixed, names=("fp32", "bf16-mixed"))
    assert "at the peak, autocast: 0 B -> " in str(comparison) and "autocast fp32" in str(comparison)
    assert comparison.rows()[0]["autocast_bytes"][0] == 0
    old = mixed.to_dict()
    for layer in old["layers"]:
        layer.pop("autocast_bytes")  # a report written before the field existed still reads
    assert MemoryReport.from_dict(old).layers[0].autocast_bytes == 0


def test_the_plot_shows_autocast_copies(tmp_path):
    pytest.importorskip("matplotlib")
    report = _measured(_llama(layers=1, vocab=128, hidden=64), "bf16-mixed", seq_len=16)
    assert report.plot(str(tmp_path / "m.png")) and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"checkpoint": True}, id="checkpoint"),
    pytest.param({"checkpoint": True, "loss": "chunked"}, id="checkpoint+chunked"),
    pytest.param({"checkpoint": True, "quant": "4bit", "lora": 8, "loss": "chunked"}, id="qlora+chunked"),
]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("options", CASES)
def test_estimate_agrees_with_the_measured_cpu_step(precision, options):
    if "quant" in options:
        pytest.importorskip("bitsandbytes")
    config = _llama()  # batch 4 x seq 128: activations, not the optimizer step, make most of these peaks
    est = memopt.estimate(config, batch_size=4, seq_len=128, device="cpu", precision=precision, **options)
    measured = _measured(config, precision, batch_size=4, seq_len=128, **options)
    assert abs(est.peak_bytes - measured.peak_bytes) <= 0.05 * measured.peak_bytes, (est.peak_bytes,
                                                                                     measured.peak_bytes)
    assert est.precision == precision and est.dtype == str(precision_config(precision).param_dtype)[6:]
    if precision == "bf16-mixed" and "quant" not in options:  # the copies themselves, counted alike
        assert est.report.total("autocast_bytes") == measured.total("autocast_bytes") > 0


def test_mixed_precision_costs_what_it_should():
    """bf16-mixed AdamW: 16 bytes per parameter (fp32 weights, gradients, two states) plus autocast's bf16 copies;
    bf16-true: 8; the printed estimate says which it assumed and what it leaves out."""
    config = _llama(layers=2, vocab=256, hidden=64)
    kw = dict(batch_size=1, seq_len=8, device="cpu")
    mixed = memopt.estimate(config, precision="bf16-mixed", **kw)
    true = memopt.estimate(config, precision="bf16-true", **kw)
    n = sum(layer.params for layer in mixed.report.layers)
    assert mixed.report.total("trainable_bytes") == 4 * n and true.report.total("trainable_bytes") == 2 * n
    assert mixed.report.total("optimizer_bytes") >= 8 * n > true.report.total("optimizer_bytes") >= 4 * n
    assert mixed.peak_bytes > true.peak_bytes
    text = str(mixed)
    assert "precision 'bf16-mixed'" in text and "float32 weights, gradients and optimizer state" in text
    assert "optimizer 'adamw': torch AdamW" in text and "not counted: the process's own memory" in text
    cuda = memopt.estimate(config, precision="bf16-mixed", batch_size=1, seq_len=8)
    assert "the CUDA context (~0.5 GiB)" in str(cuda) and any("CPU autocast's op lists" in n for n in cuda.notes)
    assert memopt.estimate(config, dtype="bfloat16", **kw).precision == "bf16-true"  # dtype alone, as before


def test_16_mixed_on_cpu_estimates_the_grad_scaler_step():
    """"16-mixed": fp16 autocast and a GradScaler. CPU autocast runs float16 too (slowly, without native fp16
    arithmetic), with torch.amp.GradScaler("cpu"); the estimate's GradScaler is a stand-in of its tensors."""
    config = _llama()
    est = memopt.estimate(config, batch_size=2, seq_len=64, device="cpu", precision="16-mixed", checkpoint=True)
    measured = _measured(config, "16-mixed", checkpoint=True)
    assert abs(est.peak_bytes - measured.peak_bytes) <= 0.05 * measured.peak_bytes, (est.peak_bytes,
                                                                                     measured.peak_bytes)
    assert est.report.total("autocast_bytes") == measured.total("autocast_bytes") > 0


# -- the examples take --precision ------------------------------------------------------------------------------------
FAST = ["--max-files", "40", "--seq-len", "32", "--eval-batches", "2"]


def _run_example(*args: str):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=900, env=env)


def _example(*args: str) -> str:
    out = _run_example(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_finetune_causal_lm_trains_in_bf16_mixed(tmp_path):
    out = _example("examples/finetune_causal_lm.py", *FAST, "--steps", "3", "--precision", "bf16-mixed",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path))
    assert "precision: 'bf16-mixed' (float32 weights" in out and "at the peak, autocast:" in out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["technique"].endswith(", adamw, bf16-mixed") and run["args"]["dtype"] == "float32"
    assert run["losses"][-1] < run["losses"][0]
    report = MemoryReport.from_dict(json.loads((tmp_path / "report.json").read_text()))
    assert report.total("autocast_bytes") > 0  # the bf16 weight copies, in their own column
    bad = _run_example("examples/finetune_causal_lm.py", "--precision", "bf16-mixed", "--dtype", "bfloat16")
    assert bad.returncode == 2 and "--dtype bfloat16 conflicts with --precision 'bf16-mixed'" in bad.stderr


def test_hf_trainer_maps_precision_to_training_arguments(tmp_path):
    out = _example("examples/hf_trainer.py", *FAST, "--steps", "2", "--logging-steps", "2", "--precision",
                   "bf16-mixed", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path))
    assert "precision: bf16-mixed (TrainingArguments {'bf16': True}, parameters float32)" in out
    assert (tmp_path / "memory_report.json").stat().st_size > 0
