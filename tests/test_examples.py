"""Examples and benchmarks run in a fast mode, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    """The checkout under test comes first on the path: a script's own folder, not the working directory, starts
    sys.path, so an editable install of another checkout would otherwise be imported."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quickstart_prints_applied_and_a_smaller_peak():
    out = _run("examples/quickstart.py", "--seq-len", "128", "--batch-size", "2")
    assert "model.layers.0" in out and "applied" in out
    ratio = float(out.rsplit("peak memory: ", 1)[1].split("x")[0])
    assert ratio < 0.9, out


def test_checkpoint_benchmark_runs():
    out = _run("benchmarks/checkpoint.py", "--hidden", "64", "--layers", "2", "--vocab", "256", "--seq", "64",
               "--steps", "1")
    assert out.count("| memopt") == 3 and "transformers gradient_checkpointing_enable" in out


def test_attention_benchmark_runs():
    out = _run("benchmarks/attention.py", "--hidden", "64", "--layers", "2", "--vocab", "256", "--seqs", "64", "128",
               "--steps", "1")
    assert "| 64 |" in out and "| 128 |" in out


def test_cli_inspect(tmp_path):
    import transformers

    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=3, intermediate_size=128, num_attention_heads=4,
                             vocab_size=128).save_pretrained(tmp_path)
    out = _run("-m", "memopt", "inspect", str(tmp_path / "config.json"), "--checkpoint", "2")
    assert "model.layers.0" in out and "every=2" in out and "'eager' -> 'sdpa'" in out
    bad = subprocess.run([sys.executable, "-m", "memopt", "inspect", str(tmp_path / "nope.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip() == f"memopt: config file not found: {tmp_path / 'nope.json'}"
    bad = subprocess.run([sys.executable, "-m", "memopt", "inspect", str(tmp_path / "config.json"), "--checkpoint",
                          "weird"], capture_output=True, text=True)
    assert bad.returncode != 0 and "checkpoint='weird' is not supported" in bad.stderr


def test_quant_benchmark_runs():
    out = _run("benchmarks/quant.py", "--hidden", "128", "--layers", "1", "--vocab", "256", "--seq", "32", "--steps", "1")
    assert "| 4-bit + LoRA r16, adamw8bit |" in out and "| bf16: transformers+peft QLoRA r16 (+GC), adamw |" in out


def test_loss_benchmark_runs():
    out = _run("benchmarks/loss.py", "--hidden", "64", "--layers", "2", "--vocabs", "256", "512", "--seq", "64",
               "--steps", "1")
    assert out.count("| memopt checkpoint=True + loss='chunked' |") == 2 and "vocab=512" in out
