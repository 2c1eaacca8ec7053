"""memopt.track: the numbers add up, agree with PyTorch's MemTracker, are exact where they can be known, and the
tracker leaves nothing behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import ALL_MODELS

import memopt
from memopt.tracker import CATEGORIES, OUTSIDE, sum_storage_bytes
from memopt.transforms.quant import stored_tensors

ROOT = Path(__file__).resolve().parent.parent


def _opt_step(model, opt, batch, loss_fn):
    loss_fn(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _setup(name, **apply_kwargs):
    model, batch, loss_fn = ALL_MODELS[name]()
    if apply_kwargs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memopt.apply(model, **apply_kwargs)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b = batch(0)
    _opt_step(model, opt, b, loss_fn)  # optimizer state exists: a steady-state step
    return model, opt, b, loss_fn


def _memtracker_peak(model, opt, step) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        step()
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("name,kwargs", [
    ("llama", {}), ("llama", {"checkpoint": True}), ("llama", {"checkpoint": "selective"}), ("gpt2", {}),
    ("bert", {"checkpoint": True}), ("t5", {}), ("nanogpt", {}), ("mixtral", {}),
])
def test_peak_agrees_with_pytorch_memtracker(name, kwargs):
    model, opt, b, loss_fn = _setup(name, **kwargs)
    with memopt.track(model, opt) as tracker:
        _opt_step(model, opt, b, loss_fn)
    report = tracker.report()
    reference = _memtracker_peak(model, opt, lambda: _opt_step(model, opt, b, loss_fn))
    assert abs(report.peak_bytes - reference) <= 0.05 * reference, (report.peak_bytes, reference)
    assert sum(report.peak_breakdown.values()) == report.peak_bytes
    assert set(report.peak_breakdown) == set(CATEGORIES)
    assert report.peak_at["phase"] in ("forward", "backward", "optimizer")


def _real_totals(model, opt):
    state = [p for p in list(model.parameters()) + list(model.buffers()) for p in stored_tensors(p)]
    opt_state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return (sum_storage_bytes(state), sum_storage_bytes(p.grad for p in model.parameters() if p.grad is not None),
            sum_storage_bytes(opt_state))


@pytest.mark.parametrize("name,kwargs", [
    ("llama", {}), ("gpt2", {}), ("nanogpt", {"checkpoint": True}),  # gpt2 and nanoGPT tie the head to the embedding
])
def test_layers_add_up_to_the_real_totals(name, kwargs):
    model, opt, b, loss_fn = _setup(name, **kwargs)
    with memopt.track(model, opt) as tracker:
        loss_fn(model, b).backward()  # gradients alive at the end: the layers' grads are those
    report = tracker.report()
    params, grads, opt_state = _real_totals(model, opt)
    assert abs(report.total("param_bytes") - params) <= 0.01 * params
    assert abs(report.total("grad_bytes") - grads) <= 0.01 * grads
    assert abs(report.total("optimizer_bytes") - opt_state) <= 0.01 * opt_state
    assert report.total("params") == sum(p.numel() for p in model.parameters())
    assert report.totals["params"] == params and report.totals["grads"] == grads
    assert report.totals["optimizer"] == opt_state


def test_quantized_and_lora_layers_add_up():
    pytest.importorskip("bitsandbytes")
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, quant="4bit", lora=4, checkpoint=True)
    opt = memopt.optimizer(model, "adamw")
    ids = torch.randint(0, 128, (2, 16))
    step = lambda: model(input_ids=ids, labels=ids).loss.backward()  # noqa: E731
    step()
    opt.step()
    with memopt.track(model, opt) as tracker:
        step()
    report = tracker.report()
    params, grads, opt_state = _real_totals(model, opt)
    assert report.total("param_bytes") == params  # packed 4-bit weights with absmax, code and nested statistics
    assert report.total("grad_bytes") == grads  # only the adapters have gradients
    assert report.total("optimizer_bytes") == opt_state
    q = report.layer("model.layers.0.self_attn.q_proj.base_layer")
    assert q.param_bytes < 64 * 64  # 4-bit: well under one byte per weight
    assert q.trainable_bytes == 0 and q.grad_bytes == 0
    assert report.layer("model.layers.0.self_attn.q_proj.lora_A.default").grad_bytes == 4 * 64 * 4


class _Toy(nn.Module):
    """x -> fc1 -> attention (its own q/k/v projections, SDPA) -> fc2: activations known by hand."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads = heads
        self.fc2 = nn.Linear(d, d)

    def attend(self, x):
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)

    def forward(self, x):
        return self.fc2(self.attend(self.fc1(x)))


def test_activation_bytes_are_exact_on_a_toy_model():
    torch.manual_seed(0)
    B, T, C, H = 2, 16, 32, 4
    model = _Toy(C, H)
    x = torch.randn(B, T, C)
    with memopt.track(model) as tracker:
        model(x).sum().backward()
    report = tracker.report()
    f32 = 4
    assert report.layer("fc1").activation_bytes == B * T * C * f32  # a Linear keeps its input (for its weight's grad)
    # q, k and v all keep fc1's output: one storage, counted for q, the first to save it
    assert report.layer("q").activation_bytes == B * T * C * f32
    assert report.layer("k").activation_bytes == 0 and report.layer("v").activation_bytes == 0
    # SDPA (run by the root module itself) keeps q, k, v, its output (B, nh, T, hs) and logsumexp (B, nh, T) in fp32
    sdpa = 3 * B * T * C * f32 + B * T * C * f32 + B * H * T * 4
    assert report.layer("").activation_bytes == sdpa
    # fc2's input is a view of SDPA's output (stored (B, T, nh, hs) on CPU): already kept, not counted again
    assert report.layer("fc2").activation_bytes == 0
    assert report.total("activation_bytes") == 2 * B * T * C * f32 + sdpa


def _plain_then_checkpointed():
    """Reports of one llama step, then of the same model after `memopt.apply(checkpoint=True)`."""
    model, opt, b, loss_fn = _setup("llama")
    reports = []
    for apply in (False, True):
        if apply:
            memopt.apply(model, checkpoint=True)
        with memopt.track(model, opt) as tracker:
            _opt_step(model, opt, b, loss_fn)
        reports.append(tracker.report())
    return reports


def test_checkpointing_cuts_activation_bytes_by_more_than_40_percent():
    plain, ckpt = _plain_then_checkpointed()
    assert ckpt.total("activation_bytes") <= 0.6 * plain.total("activation_bytes")
    assert ckpt.peak_bytes < plain.peak_bytes
    # under checkpointing a block keeps only its input
    hidden = 2 * 16 * 32 * 4
    blocks = [r for r in ckpt.rows(depth=3) if r.name.startswith("model.layers.")]
    assert len(blocks) == 3 and all(r.activation_bytes == hidden for r in blocks), [
        (r.name, r.activation_bytes) for r in blocks]


def test_several_steps_report_the_largest_step():
    model, opt, b, loss_fn = _setup("llama")
    with memopt.track(model, opt) as one:
        _opt_step(model, opt, b, loss_fn)
    with memopt.track(model, opt) as three:
        for _ in range(3):
            _opt_step(model, opt, b, loss_fn)
    r1, r3 = one.report(), three.report()
    assert (r1.steps, r3.steps) == (1, 3)
    assert abs(r3.peak_bytes - r1.peak_bytes) <= 0.01 * r1.peak_bytes
    assert r3.total("activation_bytes") == r1.total("activation_bytes")  # per step, not summed over steps
    assert r3.layer("model.layers.0.mlp.gate_proj").calls == 3


def test_fake_tensors_give_the_same_peak_as_real_ones():
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4)

    def run(fake: bool):
        with FakeTensorMode() if fake else torch.device("cpu"):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config)
            memopt.apply(model, checkpoint=True)
            opt = torch.optim.AdamW(model.parameters())
            ids = torch.randint(0, 256, (2, 32))
            step = lambda: _opt_step(model, opt, {"input_ids": ids, "labels": ids}, lambda m, b: m(**b).loss)  # noqa: E731
            step()
            with memopt.track(model, opt) as tracker:
                step()
        return tracker.report()

    real, fake = run(False), run(True)
    # one difference: transformers cannot look at fake data to skip the causal mask, so it builds one (B, 1, T, T)
    # bool mask for SDPA; memopt adds no float copy of it (issue 13 item 2)
    assert abs(fake.peak_bytes - real.peak_bytes) <= 0.01 * real.peak_bytes
    assert fake.layer("model").activation_bytes - real.layer("model").activation_bytes == 2 * 1 * 32 * 32 * 1
    blocks = lambda r: [(x.name, x.activation_bytes) for x in r.layers if x.name.startswith("model.layers")]  # noqa: E731
    assert blocks(fake) == blocks(real)
    assert fake.total("param_bytes") == real.total("param_bytes")
    assert fake.total("optimizer_bytes") == real.total("optimizer_bytes")


def _hooks_left(model) -> list[str]:
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    left = [n for n, m in model.named_modules()
            if any(getattr(h, "__self__", None).__class__.__name__ == "Tracker"
                   for h in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values()))]
    left += [n for n, p in model.named_parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
    if _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
        left.append("optimizer hooks")
    if _get_current_dispatch_mode() is not None:
        left.append("dispatch mode")
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        left.append("saved tensors hooks")
    if getattr(torch.UntypedStorage.resize_, "__module__", None) == "memopt.tracker.tracking":
        left.append("resize_")
    return left


def test_nothing_is_left_behind():
    model, opt, b, loss_fn = _setup("llama", checkpoint=True)
    resize = torch.UntypedStorage.resize_
    tracker = memopt.track(model, opt)
    assert _hooks_left(model)
    _opt_step(model, opt, b, loss_fn)
    tracker.remove()
    tracker.remove()  # idempotent
    assert _hooks_left(model) == []
    assert torch.UntypedStorage.resize_ is resize
    assert tracker.report().steps == 1  # the report outlives the tracker

    with pytest.raises(RuntimeError, match="boom"):
        with memopt.track(model, opt):
            raise RuntimeError("boom")
    assert _hooks_left(model) == []


def test_works_with_everything_apply_does():
    pytest.importorskip("bitsandbytes")
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 16))
    reference = model(input_ids=ids, labels=ids).loss.item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, checkpoint="selective", attention="sdpa", quant="8bit", lora=4)
    opt = memopt.optimizer(model, "adamw")
    with memopt.track(model, opt) as tracker:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    report = tracker.report()
    assert abs(loss.item() - reference) < 0.05  # the tracker changes nothing (8-bit weights differ a little)
    assert report.peak_bytes > 0 and report.layer("model.layers.0").activation_bytes > 0
    assert report.totals["optimizer"] == report.total("optimizer_bytes") > 0  # created by this first step


def test_optimizer_found_at_its_first_step_and_accelerate_wrapper():
    model, opt, b, loss_fn = _setup("llama")
    with memopt.track(model) as tracker:  # no optimizer given: found when it steps
        _opt_step(model, opt, b, loss_fn)
    assert tracker.report().total("optimizer_bytes") == _real_totals(model, opt)[2]

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the torch optimizer in .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    with memopt.track(model, Wrapper(opt)) as tracker:
        assert tracker._optimizers == [opt]


def test_bad_input_is_refused_clearly():
    model, opt, b, loss_fn = _setup("llama")
    with pytest.raises(TypeError, match="expects an nn.Module"):
        memopt.track("model")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        memopt.track(model, optimizer="adamw")
    assert _hooks_left(model) == []
    with memopt.track(model, opt) as tracker:
        _opt_step(model, opt, b, loss_fn)
    report = tracker.report()
    with pytest.raises(KeyError, match="no layer 'nope'"):
        report.layer("nope")
    with pytest.raises(ValueError, match="depth=-1"):
        report.table(depth=-1)
    with pytest.raises(ValueError, match="units='MB'"):
        report.table(units="MB")
    with pytest.raises(TypeError, match="MemoryReport"):
        memopt.compare(report, 3)


def test_report_outputs_and_compare(tmp_path):
    r0, r1 = _plain_then_checkpointed()

    text = str(r1)
    assert "peak" in text and "model.layers.0.self_attn.q_proj" in text and text.splitlines()[-1].startswith("total")
    folded = r1.rows(depth=3)
    assert [r.name for r in folded if r.name.startswith("model.layers")] == [f"model.layers.{i}" for i in range(3)]
    assert sum(r.param_bytes for r in folded) == r1.total("param_bytes")
    assert len(r1.rows(depth=0)) in (1, 2)  # the model, and the ops outside it if any

    again = memopt.MemoryReport.from_dict(json.loads(r1.to_json(str(tmp_path / "r.json"))))
    assert again == r1 and json.loads((tmp_path / "r.json").read_text())["peak_bytes"] == r1.peak_bytes
    csv_text = r1.to_csv(str(tmp_path / "r.csv"))
    assert csv_text.splitlines()[0].startswith("name,type,params,param_bytes")
    assert len(csv_text.splitlines()) == len(r1.layers) + 1

    pytest.importorskip("matplotlib")
    png = r1.plot(str(tmp_path / "m.png"))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"

    cmp = memopt.compare(r0, r1, names=("plain", "checkpoint"))
    assert cmp.ratio < 0.95
    row = next(r for r in cmp.rows(depth=3) if r["name"] == "model.layers.0")
    assert row["activation_bytes"][2] < 0  # the delta: the block keeps less
    assert "plain" in str(cmp) and "model.layers.0" in cmp.table(depth=3)
    assert json.dumps(cmp.to_dict())


def test_loss_outside_the_model_is_its_own_row():
    model, batch, _ = ALL_MODELS["llama"]()
    b = batch(0)
    labels = b.pop("labels")
    with memopt.track(model) as tracker:
        logits = model(**b).logits
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    report = tracker.report()
    outside = report.layer(OUTSIDE)
    assert outside.activation_bytes >= logits.numel() * 4  # log_softmax's output, kept for backward


@pytest.mark.gpu
def test_cuda_peak_agrees_with_max_memory_allocated():
    model, opt, b, loss_fn = _setup("llama")
    model.cuda()
    b = {k: v.cuda() for k, v in b.items()}
    opt = torch.optim.AdamW(model.parameters())
    _opt_step(model, opt, b, loss_fn)
    torch.cuda.synchronize()
    with memopt.track(model, opt) as tracker:
        _opt_step(model, opt, b, loss_fn)
        torch.cuda.synchronize()
    report = tracker.report()
    torch.cuda.reset_peak_memory_stats()
    _opt_step(model, opt, b, loss_fn)
    torch.cuda.synchronize()
    reference = torch.cuda.max_memory_allocated()
    assert abs(report.peak_bytes - reference) <= 0.05 * reference
    tracked = int(report.notes[0].rsplit("peaked at ", 1)[1].split()[0])
    assert abs(tracked - reference) <= 0.05 * reference  # the storage accounting alone, too


def test_cli_report(tmp_path, capsys):
    import transformers

    from memopt.cli import main

    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                             vocab_size=128).save_pretrained(tmp_path)
    cfg = str(tmp_path / "config.json")
    out = subprocess.run([sys.executable, "-m", "memopt", "report", cfg, "--batch-size", "2", "--seq-len", "16",
                          "--checkpoint", "full", "--depth", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "model.layers.1" in out.stdout and "LlamaDecoderLayer" in out.stdout

    # the same entry point in-process (a subprocess per case costs seconds of imports)
    assert main(["report", cfg, "--batch-size", "2", "--seq-len", "16", "--json", "--plot", str(tmp_path / "m.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] > 0 and set(data["peak_breakdown"]) == set(CATEGORIES)
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", cfg, "--batch-size", "2", "--seq-len", "16", "--csv"]) == 0
    assert capsys.readouterr().out.startswith("name,type,params")
    for args, message in [(("--quant", "3bit"), "memopt: quant='3bit' is not supported"),
                          (("--dtype", "int3"), "memopt: --dtype 'int3' is not supported")]:
        with pytest.raises(SystemExit) as exit_:
            main(["report", cfg, "--batch-size", "2", "--seq-len", "16", *args])
        assert str(exit_.value.code).startswith(message)
    with pytest.raises(SystemExit, match="must be positive"):
        main(["report", cfg, "--batch-size", "0", "--seq-len", "16"])
def test_trainer_memory_callback(tmp_path):
    import transformers

    from memopt.integrations import MemoryCallback, read_report

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    memopt.apply(model, checkpoint=True)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", disable_tqdm=True, use_cpu=True,
    )
    callback = MemoryCallback(plot=False, depth=3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["memory/peak_MiB"] > 0 for h in logged)
    assert all(f"memory/{c}_MiB" in logged[0] for c in CATEGORIES)
    for h in logged:  # the breakdown is of the interval's peak
        parts = sum(h[f"memory/{c}_MiB"] for c in CATEGORIES)
        assert abs(parts - h["memory/peak_MiB"]) < 0.05 and h["memory/optimizer_MiB"] > 0
    report = read_report(str(tmp_path / "memory_report.json"))
    assert report.steps == 4 and report.peak_bytes >= max(h["memory/peak_MiB"] for h in logged) * 2**20 * 0.99
    assert "model.layers.1" in (tmp_path / "memory_report.txt").read_text()
    assert callback.tracker is None and _hooks_left(model) == []


def test_chunked_loss_is_the_heads_own_row():
    model, opt, b, loss_fn = _setup("llama")
    with memopt.track(model, opt) as plain:
        _opt_step(model, opt, b, loss_fn)
    memopt.apply(model, loss="chunked")
    with memopt.track(model, opt) as chunked:
        _opt_step(model, opt, b, loss_fn)
    p, c = plain.report(), chunked.report()
    head = c.layer("lm_head")
    assert head.calls == 2  # the head's stand-in call, and the chunked loss counted as its own work
    assert head.peak_bytes > 0 and head.forward_s is not None
    # the root no longer keeps the log-softmax of the whole logits (it keeps nothing: no row at all)
    assert "" not in [layer.name for layer in c.layers] and p.layer("").activation_bytes > 0
    assert c.peak_bytes < p.peak_bytes


def test_times_are_per_step_and_say_so():
    model, opt, b, loss_fn = _setup("llama")
    with memopt.track(model, opt) as tracker:
        for _ in range(4):
            _opt_step(model, opt, b, loss_fn)
    report = tracker.report()
    lines = report.table().splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert re.split(r"\s{2,}", header.strip())[-2:] == ["fwd ms/step", "bwd ms/step"]
    assert any("times: mean per step over 4 steps" in line for line in lines)
    layer = report.layer("model.layers.0.mlp.gate_proj")
    row = next(line for line in lines if line.startswith("model.layers.0.mlp.gate_proj "))
    assert row.split()[-2] == f"{layer.forward_s * 1e3 / 4:.1f}"  # the sum over the steps, divided by 4


def _report(layers, peak):
    from memopt.tracker import LayerMemory

    return memopt.MemoryReport(peak, dict.fromkeys(CATEGORIES, 0), {"module": "", "phase": "forward"},
                               [LayerMemory(name, "Linear", param_bytes=n, peak_bytes=n) for name, n in layers],
                               "cpu", steps=1)


def test_compare_marks_rows_missing_on_one_side():
    before = _report([("a", 1024), ("gone", 2048)], 4096)
    after = _report([("a", 1024), ("new", 512)], 2048)
    cmp = memopt.compare(before, after, names=("x", "y"))
    lines = cmp.table().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    cells = {c[0]: c for c in (re.split(r"\s{2,}", line.strip()) for line in lines[start + 1:])}
    # layer, param x, y, grad x, y, activ x, y, delta, peak x, y
    assert cells["gone"] == ["gone", "2.00 KiB", "-", "0 B", "-", "0 B", "-", "-", "2.00 KiB", "-"]
    assert cells["new"] == ["new", "-", "512 B", "-", "0 B", "-", "0 B", "-", "-", "512 B"]
    assert cells["a"] == ["a", "1.00 KiB", "1.00 KiB", "0 B", "0 B", "0 B", "0 B", "0 B", "1.00 KiB", "1.00 KiB"]
    assert any("-: not in that report" in line for line in lines)
    data = {r["name"]: r for r in cmp.rows()}
    assert data["gone"]["param_bytes"] == (2048, None, None) and data["new"]["param_bytes"] == (None, 512, None)
    assert data["a"]["param_bytes"] == (1024, 1024, 0)
    assert json.dumps(cmp.to_dict())


def test_a_long_run_keeps_every_steps_peak_in_the_thinned_timeline(monkeypatch):
    import memopt.tracker.tracking as tracking

    monkeypatch.setattr(tracking, "_TIMELINE_MAX", 64)  # thinned many times over a few steps
    model, opt, b, loss_fn = _setup("llama")
    bounds = []
    with memopt.track(model, opt) as tracker:
        for _ in range(6):
            _opt_step(model, opt, b, loss_fn)
            bounds.append(tracker._ops)
    report = tracker.report()
    assert len(report.timeline) <= 64
    starts = [0] + bounds[:-1]
    peaks = [max((live for op, live, _ in report.timeline if lo < op <= hi), default=0) for lo, hi in zip(starts, bounds)]
    assert peaks == [report.peak_bytes] * 6, (peaks, report.peak_bytes)  # identical steps look identical


def test_timeline_thinning_keeps_the_peak_of_each_window():
    from memopt.tracker.report import Timeline

    line = Timeline(8)
    for op in range(1000):
        line.add(op, 100 if op % 50 == 7 else op % 5, "forward")  # a spike every 50 ops
    points = line.points()
    assert len(points) <= 8 and max(p[1] for p in points) == 100
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    line = Timeline(16)
    for op in range(40):
        line.add(op, op, "backward" if op >= 20 else "forward")
    assert line.points()[-1] == (39, 39, "backward")  # the last point is always there: the end of the run
