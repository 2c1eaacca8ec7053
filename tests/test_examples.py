"""Examples and benchmarks run in a fast mode, so they cannot rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """The checkout's memopt first on the path: a script in examples/ would otherwise import an installed copy."""
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


def test_compile_benchmark_runs():
    out = _run("benchmarks/compile.py", "--hidden", "32", "--layers", "1", "--heads", "4", "--vocab", "128",
               "--seq", "32", "--batch", "1", "--steps", "1", "--backend", "aot_eager")
    assert out.count(", compiled |") == 3 and out.count(", eager |") == 3 and "target <= 1.25" in out
    # every compiled row keeps its compiled code through the timed steps (a torch._dynamo.reset() per row dropped
    # the earlier rows' code: they compiled again inside the timed step, ~1 s counted as a 4 ms step)
    assert "no graph compiled during the timed steps" in out, out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on CUDA the proof runs for real (minutes)")
def test_cuda_proof_script_skips_cleanly_without_cuda():
    out = _run("benchmarks/cuda_check.py")
    assert out.startswith("SKIP benchmarks/cuda_check.py: no CUDA device") and out.count("\n") == 1


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


def test_tracker_benchmark_runs():
    out = _run("benchmarks/tracker.py", "--hidden", "64", "--layers", "2", "--vocab", "256", "--seq", "32", "--steps", "1")
    rows = [line for line in out.splitlines() if line.startswith("| plain |") or line.startswith("| checkpoint=True |")]
    assert len(rows) == 2
    for row in rows:  # memopt.track's peak agrees with PyTorch's MemTracker
        assert abs(float(row.split("|")[4]) - 1) < 0.05, row


def test_headline_benchmark_runs(tmp_path):
    out = _run("benchmarks/headline.py", "--hidden", "128", "--layers", "2", "--vocab", "512", "--seq", "64",
               "--steps", "2", "--png", str(tmp_path / "h.png"))
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    ref = rows["transformers + peft + bitsandbytes QLoRA r16 (+GC)"]
    ours = rows["memopt.apply(checkpoint=True, quant='4bit', lora=16)"]
    assert float(ours[4].strip()[:-1]) <= 1.02  # peak vs transformers+peft
    assert ours[7:9] == ref[7:9]  # the same loss curve: first and last loss
    assert any(name.startswith("memopt.plan(") for name in rows)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_estimate_benchmark_runs():
    out = _run("benchmarks/estimate.py", "--hidden", "128", "--layers", "2", "--intermediate", "256", "--heads", "4",
               "--vocab", "512", "--seq", "64")
    assert out.count("\n| ") == 14 and "| QLoRA: quant='4bit', lora=16, checkpoint=True | bf16-mixed |" in out
    assert "budget of 24.00 GiB" in out and "plan: bf16-mixed, full fine-tune, adamw" in out


# The fine-tuning examples in their fast mode: the tiny preset on 40 standard-library files, a few steps. The
# tokenizer cache is shared by the tests of one session (built once, about a second for 40 files).
FAST = ["--max-files", "40", "--seq-len", "32", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("memopt-cache"))


def _table(out: str, header: str) -> list[list[str]]:
    """The rows of the markdown table that follows `header` in `out`, as lists of cells."""
    lines = out.split(header, 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_finetune_causal_lm_trains_and_reports(tmp_path, cache):
    from memopt import MemoryReport

    out = _run("examples/finetune_causal_lm.py", *FAST, "--steps", "3", "--cache-dir", cache, "--out", str(tmp_path))
    assert "model.layers.0  applied  full" in out  # memopt.applied
    assert "one row per block" in out and "\nmodel.layers.3 " in out and "model.layers.3.mlp" not in out
    assert "peak: plain " in out and "at the peak, activations:" in out  # memopt.compare
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["val_loss_after"] < run["val_loss_before"] - 0.05, run
    assert run["losses"][-1] < run["losses"][0], run["losses"]
    assert run["peak_bytes"] < 0.9 * run["plain_peak_bytes"], run
    report = MemoryReport.from_dict(json.loads((tmp_path / "report.json").read_text()))
    assert report.steps == 3 and report.peak_bytes == run["peak_bytes"]
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_causal_lm_qlora(tmp_path, cache):
    out = _run("examples/finetune_causal_lm.py", *FAST, "--steps", "3", "--quant", "4bit", "--lora", "8",
               "--optimizer", "adamw8bit", "--loss", "chunked", "--cache-dir", cache, "--out", str(tmp_path))
    assert "quant                 model.layers.0.self_attn.q_proj" in out and "lm_head" in out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["val_loss_after"] < run["val_loss_before"], run
    assert run["technique"] == "checkpoint=full, sdpa, 4bit + LoRA r8, chunked loss, adamw8bit"
    bad = subprocess.run([sys.executable, "examples/finetune_causal_lm.py", "--quant", "4bit"], cwd=ROOT,
                         capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and "add --lora RANK" in bad.stderr


def test_finetune_minilm_classifier(tmp_path):
    out = _run("examples/finetune_minilm_classifier.py", "--steps", "2", "--per-class", "12", "--batch-size", "4",
               "--seq-len", "24")
    applied = [line.split() for line in out.splitlines() if line.split()[1:2] == ["classifier"]]
    assert ["quant", "classifier", "skipped", "output"] in [a[:4] for a in applied]  # a task head: kept in fp32
    assert ["lora:head", "classifier", "applied", "task"] in [a[:4] for a in applied]  # and trained in full
    rows = {r[0]: r for r in _table(out, "| run | trainable params |")}
    full, mem = rows["full fine-tune, float32"], rows["memopt: 4bit, LoRA r8, checkpoint=full"]
    assert int(mem[1].replace(",", "")) < 0.05 * int(full[1].replace(",", ""))  # LoRA + the head only
    ratio = float(out.rsplit("peak memory: memopt ", 1)[1].split("x")[0])
    assert ratio < 0.5, out


def test_hf_trainer_logs_memory(tmp_path, cache):
    out = _run("examples/hf_trainer.py", *FAST, "--steps", "4", "--logging-steps", "2", "--cache-dir", cache,
               "--out", str(tmp_path))
    rows = _table(out, "| step | loss | memory/peak_MiB |")
    assert [r[0] for r in rows] == ["2", "4"] and all(float(r[2]) > 0 for r in rows)
    before, after = (float(x) for x in out.split("validation loss: ", 1)[1].split(" after")[0].split(" before -> "))
    assert after < before
    for name in ("memory_report.json", "memory_report.txt", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0


def _torchrun(nproc: int, *args: str) -> str:
    return _run("-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
                "examples/fsdp_finetune.py", *args)


def test_fsdp_two_processes_match_one_and_halve_memory(cache):
    args = [*FAST, "--steps", "3", "--cache-dir", cache]
    two = _torchrun(2, *args, "--check")
    one = _torchrun(1, *args)
    assert "2 process(es), gloo, FSDP2 fully_shard of 4 blocks" in two
    losses2 = [float(r[1]) for r in _table(two, "| step | loss |")]
    losses1 = [float(r[1]) for r in _table(one, "| step | loss |")]
    assert len(losses2) == 3 and losses2[-1] < losses2[0]
    assert losses2 == pytest.approx(losses1, abs=1e-5)
    assert float(two.rsplit("largest loss difference from the 2-process run: ", 1)[1].split()[0]) < 1e-5
    assert [r[0] for r in _table(two, "| rank | peak |")] == ["0", "1"]
    held = [int(out.rsplit("per-rank params+grads+optimizer bytes: ", 1)[1].split()[0]) for out in (one, two)]
    assert held[1] < 0.55 * held[0], held


def test_generate_within_budget_fast():
    out = _run("examples/generate_within_budget.py", "--fast")
    assert "memopt.plan" in out and "kv cache" in out
    plan = re.search(r"plan: \w+ cache[^:]*: (\d+) sequences", out)
    assert plan and int(plan.group(1)) < 4, out  # 9MiB binds: the 4 requests run in more than one batch
    run = re.search(r"measured [\d.]+ \w+ \(([\d.]+)x the prediction; (\d+)% of the budget", out)
    assert run, out
    assert 0.95 <= float(run.group(1)) <= 1.05 and int(run.group(2)) <= 100, run.group(0)


def test_kv_cache_benchmark_runs():
    out = _run("benchmarks/kv_cache.py", "--fast")
    rows = {r[0].split(" (")[0]: r for r in _table(out, "| scheme | concurrent sequences |")}
    assert list(rows) == ["static", "dynamic, padded batches", "paged"]
    assert int(rows["paged"][1]) >= int(rows["static"][1]) and all(float(r[4]) > 0 for r in rows.values())
    measured = re.search(r"measured in transformers' allocator over (\d+) forwards.*?up to (\d+) requests.*?"
                         r"never written ([\d.]+)% when .*?, ([\d.]+)% averaged", out)
    assert measured and int(measured.group(1)) > 0 and int(measured.group(2)) >= int(rows["paged"][1]), out
    study = _table(out, "| new tokens, median |")
    assert [r[0] for r in study] == ["64", "256"]
    for r in study:  # static reserves max_len; paged wastes at most the last block, less with smaller pages
        waste = [float(c.split("%")[0]) for c in r[5:]]
        assert float(r[4].rstrip("%")) > 50 > max(waste) and waste == sorted(waste), r
    quality = {r[0]: r for r in _table(out, "| KV cache | bytes/token (float32) |")}
    assert quality["fp8"][2] == "0.250x" and float(quality["int4 (hqq, group 64, residual 128)"][4]) > 0.999
    sizes = {r[0]: [float(c.split("(")[1].rstrip("x)")) for c in r[1:]] for r in _table(out, "| KV cache (bf16) |")}
    assert sizes["fp8"] == [0.5, 0.5] and sizes["int2 (hqq, group 64, residual 128)"] < sizes["int4 (hqq, group 64, "
                                                                                           "residual 128)"] < [0.5, 0.5]


def test_uptrain_gqa_converts_uptrains_and_reports(tmp_path, cache):
    out = _run("examples/uptrain_gqa.py", "--max-files", "40", "--seq-len", "32", "--batch-size", "4",
               "--eval-batches", "2", "--mha-steps", "40", "--eval-points", "2", "--gen-context", "48",
               "--gen-tokens", "3", "--gen-batch", "2", "--threads", "1", "--cache-dir", cache, "--out", str(tmp_path),
               "--quiet")
    rows = {r[0]: r for r in _table(out, "| model | kv heads | pooling |")}
    assert list(rows) == ["MHA (+ the same steps, control)", "GQA-4 mean", "GQA-4 first", "GQA-2 mean",
                          "GQA-2 first", "MQA mean", "MQA first"]
    assert [rows[n][7] for n in ("GQA-4 mean", "GQA-2 mean", "MQA mean")] == ["0.5000x", "0.2500x", "0.1250x"]
    assert "target: KV cache exactly K/H of the MHA's: met" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["uptrain_steps"] == 2 and len(results["runs"]["MQA mean"]["curve"]) == 3
    assert (tmp_path / "uptrain.png").read_bytes()[:4] == b"\x89PNG"
    # the saved MHA model is reused by a second run, converted and uptrained again
    again = _run("examples/uptrain_gqa.py", "--mha", str(tmp_path / "mha"), "--max-files", "40", "--seq-len", "32",
                 "--batch-size", "4", "--eval-batches", "2", "--kv-heads", "2", "--eval-points", "1",
                 "--gen-context", "48", "--gen-tokens", "3", "--gen-batch", "2", "--threads", "1", "--cache-dir", cache,
                 "--out", str(tmp_path / "again"), "--quiet")
    assert f"MHA model: {tmp_path / 'mha'} (40 training steps)" in again
    assert float(again.split("MHA validation loss ", 1)[1].split(";")[0]) == pytest.approx(results["mha_val_loss"], abs=1e-4)


def test_gqa_benchmark_runs():
    out = _run("benchmarks/gqa.py", "--hidden", "64", "--layers", "2", "--vocab", "256", "--contexts", "32",
               "--batch", "2", "--new-tokens", "3", "--steps", "1", "--clock", "cpu", "--threads", "1")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| MHA") or line.startswith("| kv_heads=")]
    assert [r[1].strip() for r in rows] == ["MHA", "kv_heads=4", "kv_heads=2", "kv_heads=1"]
    assert [r[4].strip() for r in rows] == ["1.0000x", "0.5000x", "0.2500x", "0.1250x"]
    assert "KV cache exactly K/H of the MHA's: met; memopt.estimate predicts it exactly: met" in out


def test_loss_compile_benchmark_runs():
    out = _run("benchmarks/loss_compile.py", "--backend", "aot", "--vocab", "512", "--batch", "2", "--seq", "64",
               "--d", "32", "--layers", "1", "--chunk-size", "32", "--steps", "1", "--warmup", "1")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|") for line in out.splitlines()
            if line.startswith("| ") and "---" not in line and "model" not in line}
    assert len(rows) == 6 and "no graph compiled during the timed steps" in out, out
    logits = {key: float(cells[6]) for key, cells in rows.items()}
    assert logits[("plain", "eager")] > 0 and logits[("plain", "aot")] > 0  # the plain step has the logits
    assert all(v == 0 for (name, _), v in logits.items() if "chunked" in name), out  # the chunked ones none
    assert float(rows[("plain", "aot")][7]) == 0  # the head's weight transposed (d, vocab) is no chunk


def test_no_sdpa_benchmark_runs():
    out = _run("benchmarks/no_sdpa.py", "--hidden", "32", "--layers", "2", "--heads", "4", "--vocab", "128", "--seq",
               "128", "--batch", "1", "--steps", "1", "--archs", "bloom", "falcon_alibi")
    for arch in ("bloom", "falcon_alibi"):  # ALiBi through SDPA: no (batch, heads, seq, seq) matrix kept
        cells = next(line for line in out.splitlines() if line.startswith(f"| {arch} |")).split("|")
        sdpa, ckpt = float(cells[4].strip(" x")), float(cells[6].strip(" x"))
        assert sdpa < 0.9 and ckpt < sdpa, out
        assert cells[10].strip() == cells[11].strip(), out  # the same loss as transformers' eager attention
