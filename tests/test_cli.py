"""The command line: --precision for estimate, plan and report; a config read by its own file name; every bad input
one `memopt: ...` line and a non-zero exit status, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A small Llama config saved as bench.json (no config.json beside it) and one with a negative size."""
    import transformers

    folder = tmp_path_factory.mktemp("configs")
    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                             vocab_size=128).save_pretrained(folder)
    (folder / "config.json").rename(folder / "bench.json")
    bad = json.loads((folder / "bench.json").read_text())
    bad["intermediate_size"] = -128
    (folder / "negative.json").write_text(json.dumps(bad))
    return {"ok": str(folder / "bench.json"), "negative": str(folder / "negative.json"), "folder": folder}


def _error(args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    code = exit_.value.code
    assert isinstance(code, str) and code.startswith("memopt: ") and "\n" not in code, code  # one line, status 1
    return code


def test_bad_input_is_one_line_and_a_non_zero_exit(configs):
    """Regression (issue 13, item 15): each of these printed a 22-78 line traceback."""
    ok, negative = configs["ok"], configs["negative"]
    for command in (["inspect", negative], ["estimate", negative, "--seq-len", "16"],
                    ["plan", negative, "--seq-len", "16", "--budget", "1GiB"]):
        assert "negative dimension -128" in _error(command) and "check the config's sizes" in _error(command)
    assert "--depth -1 must be >= 0" in _error(["report", ok, "--batch-size", "1", "--seq-len", "8", "--depth", "-1"])
    if not torch.cuda.is_available():
        assert "CUDA is not available here" in _error(["report", ok, "--batch-size", "1", "--seq-len", "8",
                                                        "--device", "cuda"])
    missing = configs["folder"] / "nowhere" / "x.png"
    assert f"the folder {missing.parent} does not exist" in _error(
        ["report", ok, "--batch-size", "1", "--seq-len", "8", "--plot", str(missing)])
    assert "precision='bf16' is not supported" in _error(["estimate", ok, "--precision", "bf16"])
    assert "conflicts with precision='bf16-mixed'" in _error(["estimate", ok, "--precision", "bf16-mixed",
                                                              "--dtype", "bfloat16"])
    assert "conflicts with precision='bf16-mixed'" in _error(["plan", ok, "--budget", "1GiB", "--precision",
                                                              "bf16-mixed", "--dtype", "bfloat16"])
    assert "not an option of 'optimizer'" in _error(["plan", ok, "--budget", "1GiB", "--optimizer", "lamb"])
    assert "optimizer='paged_adamw8bit' needs CUDA" in _error(["estimate", ok, "--optimizer", "paged_adamw8bit",
                                                               "--device", "cpu"])
    # as a user sees it: stderr is the one line, the exit status 1
    out = subprocess.run([sys.executable, "-m", "memopt", "inspect", negative], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.startswith("memopt:")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr


def test_a_config_json_of_any_name(configs, capsys):
    """Regression (issue 13, item 3): path/bench.json was read as path/config.json (and failed without one)."""
    ok = configs["ok"]
    assert main(["inspect", ok, "--json"]) == 0
    assert "model.layers.1" in capsys.readouterr().out
    assert main(["estimate", ok, "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] > 0
    assert main(["plan", ok, "--seq-len", "16", "--budget", "1GiB"]) == 0
    assert "plan: " in capsys.readouterr().out
    assert main(["report", ok, "--batch-size", "1", "--seq-len", "8", "--depth", "1"]) == 0
    assert "peak" in capsys.readouterr().out
    assert "config file not found" in _error(["estimate", str(configs["folder"])])  # a folder without config.json


def test_precision_flags(configs, capsys):
    ok = configs["ok"]
    runs = {}
    for flags in ([], ["--precision", "bf16-true"], ["--dtype", "bfloat16"], ["--precision", "32-true"]):
        assert main(["estimate", ok, "--seq-len", "64", "--json", *flags]) == 0
        runs[tuple(flags)] = json.loads(capsys.readouterr().out)
    assert runs[()]["precision"] == "bf16-mixed"  # the default: float32 weights and AdamW state, bf16 autocast
    assert runs[("--dtype", "bfloat16")]["precision"] == "bf16-true" == runs[("--precision", "bf16-true")]["precision"]
    assert runs[()]["peak_bytes"] > runs[("--precision", "bf16-true")]["peak_bytes"]
    assert runs[()]["breakdown"]["optimizer"] >= 2 * runs[("--precision", "bf16-true")]["breakdown"]["optimizer"]
    assert main(["estimate", ok, "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "precision 'bf16-mixed'" in text and "optimizer 'adamw'" in text and "not counted:" in text

    assert main(["plan", ok, "--seq-len", "64", "--budget", "1GiB", "--precision", "bf16-true,bf16-mixed",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["precision"] == "bf16-true" and plan["fits"]  # the first listed is preferred
    assert main(["plan", ok, "--seq-len", "64", "--budget", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "bf16-mixed, full fine-tune, adamw" in text and "headroom" in text and "not counted" in text

    assert main(["report", ok, "--batch-size", "2", "--seq-len", "16", "--precision", "bf16-mixed", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_breakdown"]["autocast"] > 0 or sum(layer["autocast_bytes"] for layer in report["layers"]) > 0
    assert any("bf16-mixed" in n for n in report["notes"])
    assert main(["report", ok, "--batch-size", "2", "--seq-len", "16", "--precision", "16-mixed"]) == 0
    assert "16-mixed" in capsys.readouterr().out
