"""memopt.optimizer: the optimizer step in backward, the small-state optimizers and what their state costs."""

from __future__ import annotations

import copy
import importlib.util
import io
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.optim import OPTIMIZERS




def _llama(layers: int = 2, hidden: int = 64, vocab: int = 96):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _batch(seed: int = 0, vocab: int = 96, batch: int = 2, seq: int = 16) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


class _MLP(nn.Module):
    """Few parameter shapes: torchao compiles its update once per shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).square().mean()


def _train(model, opt, batches, loss=lambda m, b: m(**b).loss, scheduler=None) -> list[float]:
    losses = []
    for b in batches:
        value = loss(model, b)
        value.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(value.item())
    return losses


def _kwargs(name: str) -> dict:
    return {"lr": 1e-2} if name != "adamw8bit" else {"lr": 1e-2, "min_8bit_size": 16}


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor", "sgd"])
def test_in_backward_updates_equal_the_ordinary_optimizer(name):
    ref, fused = _llama(), _llama()
    memopt.apply(fused, checkpoint=True)  # and the hooks fire during the recompute's backward
    batches = [_batch(i % 2) for i in range(3)]
    a = _train(ref, memopt.optimizer(ref, name, **_kwargs(name)), batches)
    opt = memopt.optimizer(fused, name, in_backward=True, **_kwargs(name))
    b = _train(fused, opt, batches)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert all(p.grad is None for p in fused.parameters())
    assert isinstance(opt, torch.optim.Optimizer) and len(opt.param_groups) == len(list(fused.parameters()))


def test_in_backward_adamw4bit_equals_adamw4bit():
    pytest.importorskip("torchao")
    ref, fused = _MLP(), _MLP()
    xs = [{"x": torch.randn(8, 64, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    loss = lambda m, b: m(**b)  # noqa: E731
    a = _train(ref, memopt.optimizer(ref, "adamw4bit", lr=1e-2), xs, loss)
    b = _train(fused, memopt.optimizer(fused, "adamw4bit", in_backward=True, lr=1e-2), xs, loss)
    assert a == b
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q)


def test_lr_scheduler_over_the_in_backward_optimizer():
    ref, fused = _llama(), _llama()
    batches = [_batch(i) for i in range(4)]
    opt_a = memopt.optimizer(ref, "adamw", lr=1e-2)
    opt_b = memopt.optimizer(fused, "adamw", in_backward=True, lr=1e-2)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step))  # noqa: E731
    a = _train(ref, opt_a, batches, scheduler=sched(opt_a))
    b = _train(fused, opt_b, batches, scheduler=sched(opt_b))
    assert a == pytest.approx(b, rel=1e-6)
    inner = next(iter(opt_b.optimizers.values()))
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)  # the scheduler reached the optimizers that step
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_state_dict_resume_gives_the_same_next_step(name):
    model = _llama()
    opt = memopt.optimizer(model, name, in_backward=True, **_kwargs(name))
    _train(model, opt, [_batch(0), _batch(1)])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = _train(model, opt, [_batch(2)])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = _llama()
    resumed.load_state_dict(saved["model"])
    opt2 = memopt.optimizer(resumed, name, in_backward=True, **_kwargs(name))
    opt2.load_state_dict(saved["opt"])
    assert _train(resumed, opt2, [_batch(2)]) == expected
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"one group each.*Load a state dict saved by memopt.optimizer"):
        opt2.load_state_dict(memopt.optimizer(_llama(), name, **_kwargs(name)).state_dict())


def test_gradient_accumulation_is_refused_at_the_second_backward():
    model = _llama()
    opt = memopt.optimizer(model, "adamw", in_backward=True, lr=1e-3)
    model(**_batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match=r"gradient accumulation.*Call optimizer.step\(\).*in_backward=False"):
        model(**_batch(1)).loss.backward()
    opt.step()  # the loop recovers once it steps after each backward
    model(**_batch(1)).loss.backward()
    opt.step()


def test_clipping_is_refused_with_the_fix_named():
    model, other = _llama(), nn.Linear(4, 4)
    opt = memopt.optimizer(model, "adamw", in_backward=True, lr=1e-3)
    model(**_batch(0)).loss.backward()
    opt.step()
    for clip in (torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad.clip_grad_norm_):
        with pytest.raises(RuntimeError, match=r"no global norm.*max_grad_norm=0.*in_backward=False"):
            clip(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match=r"clip_grad_value_"):
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
    measured = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measuring only: the true norm
    ref = _llama()
    ref(**_batch(0)).loss.backward()
    torch.testing.assert_close(measured, torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    other(torch.ones(2, 4)).sum().backward()
    assert torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0) > 0  # others' clipping is untouched
    opt.remove()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # released


def test_lora_and_8bit_state_in_backward_train_the_adapters_only():
    pytest.importorskip("bitsandbytes")
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, quant="8bit", lora=4, checkpoint=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = memopt.optimizer(model, "adamw8bit", in_backward=True, lr=1e-2, min_8bit_size=16)
    losses = _train(model, opt, [_batch(0)] * 4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
    assert len(opt.optimizers) == len(trained) and all("lora_" in n for n in trained)


def test_tracker_sees_gradients_live_and_die():
    def report(in_backward: bool):
        model = _llama(layers=4, hidden=128, vocab=512)
        memopt.apply(model, checkpoint=True)
        opt = memopt.optimizer(model, "adamw", in_backward=in_backward, lr=1e-3)
        batch = _batch(0, vocab=512, seq=64)
        _train(model, opt, [batch])
        with memopt.track(model, opt) as tracker:
            _train(model, opt, [batch])
        return model, tracker.report()

    model, plain = report(False)
    _, fused = report(True)
    trainable = sum(p.numel() * 4 for p in model.parameters())
    assert plain.total("grad_bytes") == trainable  # every gradient at once, before the step
    # in backward: a few parameters' gradients at a time (the largest is the 512 x 128 embedding's, 256 KiB)
    assert fused.total("grad_bytes") <= trainable / 8
    assert fused.peak_breakdown["grads"] <= trainable / 8
    assert fused.peak_bytes < plain.peak_bytes - trainable / 2
    assert fused.total("optimizer_bytes") == plain.total("optimizer_bytes") == 2 * trainable + 4 * len(
        list(model.parameters()))


def _state_bytes(opt) -> int:
    seen = {}
    for state in opt.state.values():
        for t in state.values():
            if not isinstance(t, torch.Tensor):
                continue
            parts = [getattr(t, a) for a in getattr(t, "tensor_attrs", ())] or [t]  # torchao's subclasses
            for x in parts:
                seen[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adamw4bit", "adafactor"])
def test_state_layout_is_byte_exact_and_bytes_per_param_as_documented(name):
    spec = OPTIMIZERS[name]
    if not spec.available():
        pytest.skip(f"{spec.requires} not installed")
    # the registry's layout against the real optimizer's state (torchao compiles per shape: a smaller model there)
    model = _llama(layers=2, hidden=256, vocab=512) if name != "adamw4bit" else _MLP()
    opt = memopt.optimizer(model, name, lr=1e-3)
    (model(**_batch(0, vocab=512)).loss if name != "adamw4bit" else model(torch.randn(4, 64))).backward()
    opt.step()
    params = list(model.parameters())
    shared = sum(torch.empty(s, dtype=d).nbytes for s, d in spec.shared_layout.values())
    assert _state_bytes(opt) == sum(spec.state_bytes(p.shape, p.dtype) for p in params) + shared
    # bytes per parameter on the small Llama (2.4M parameters), as the docstring and the registry state them
    params = list(_llama(layers=2, hidden=256, vocab=512).parameters())
    per_param = (sum(spec.state_bytes(p.shape, p.dtype) for p in params) + shared) / sum(p.numel() for p in params)
    assert per_param == pytest.approx(spec.bytes_per_param, abs=0.005), per_param


def test_errors_name_the_value_and_the_fix(monkeypatch):
    model = _llama()
    with pytest.raises(ValueError, match=r"optimizer='lion' is not supported; use 'adamw', .*'adamw4bit', 'adafactor'"):
        memopt.optimizer(model, "lion")
    with pytest.raises(TypeError, match=r"in_backward='yes'\) must be True or False"):
        memopt.optimizer(model, "adamw", in_backward="yes")
    with pytest.raises(ValueError, match=r"cpu_offload=True.*host memory already: drop cpu_offload=True"):
        memopt.optimizer(model, "adamw", cpu_offload=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a))
    with pytest.raises(ImportError, match=r"optimizer='adamw4bit' needs torchao.*pip install \"memopt\[optim\]\""):
        memopt.optimizer(model, "adamw4bit")
    fused = memopt.optimizer(model, "adamw", in_backward=True)
    with pytest.raises(ValueError, match=r"already updated in backward.*remove\(\)"):
        memopt.optimizer(model, "adamw", in_backward=True)
    fused.remove()
    memopt.optimizer(model, "adamw", in_backward=True)


def test_import_memopt_stays_light():
    code = ("import sys, memopt; bad = [m for m in ('torchao', 'bitsandbytes') if m in sys.modules]; "
            "assert not bad, bad; import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_transformers_trainer_with_the_in_backward_optimizer(tmp_path):
    import transformers

    class _Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: v[0] for k, v in _batch(i % 2, batch=1).items()}

    def run(in_backward: bool, max_grad_norm: float = 0.0):
        model = _llama()
        opt = memopt.optimizer(model, "adamw", in_backward=in_backward, lr=1e-3)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                              max_grad_norm=max_grad_norm, report_to=[], logging_steps=1,
                                              save_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None))
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        return [(h["loss"], h["grad_norm"]) for h in history], model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, ref = run(False)
        fused, model = run(True)
        assert sum(plain, ()) == pytest.approx(sum(fused, ()), rel=1e-5)  # losses and the logged grad_norm
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match=r"max_grad_norm=0"):
            run(True, max_grad_norm=1.0)


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = []
    for in_backward in (False, True):
        model = _llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = memopt.optimizer(model, "adamw", in_backward=in_backward, lr=1e-2)
        batch = {k: v[rank:rank + 1] for k, v in _batch(0).items()}
        losses = _train(model, opt, [batch] * 3)
        results.append((losses, [p.full_tensor().detach().clone() for p in model.parameters()]))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_fsdp2_in_backward_equals_the_ordinary_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_fsdp_worker, args=(2, port, out), nprocs=2, join=True)
    (plain_losses, plain), (fused_losses, fused) = torch.load(out, weights_only=False)
    assert plain_losses == pytest.approx(fused_losses, rel=1e-6)
    for p, q in zip(plain, fused):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cpu_offloaded_state_on_cuda():
    pytest.importorskip("torchao")
    model = _llama().cuda()
    opt = memopt.optimizer(model, "adamw", cpu_offload=True, lr=1e-3)
    batches = [{k: v.cuda() for k, v in _batch(i).items()} for i in range(2)]
    losses = _train(model, opt, batches)
    assert all(t.device.type == "cpu" for o in opt.optim_dict.values() for s in o.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))
    assert losses[1] < losses[0] + 1


def _script(*args: str, cwd=None) -> str:
    import os
    from pathlib import Path

    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_example_full_fine_tune_with_the_step_in_backward(tmp_path):
    import json

    out = _script("examples/finetune_causal_lm.py", "--max-files", "40", "--seq-len", "32", "--eval-batches", "2",
                  "--steps", "3", "--optimizer", "adamw8bit", "--in-backward", "--cache-dir", str(tmp_path / "cache"),
                  "--out", str(tmp_path))
    assert "adamw8bit in backward" in out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["losses"][-1] < run["losses"][0], run["losses"]
    assert run["peak_bytes"] < 0.9 * run["plain_peak_bytes"], run


def test_fullft_benchmark_runs_in_a_fast_mode():
    out = _script("benchmarks/fullft.py", "--hidden", "64", "--layers", "2", "--vocab", "256", "--seq", "32",
                  "--batch", "2", "--steps", "3", "--clock", "cpu", "--precision", "fp32", "--no-4bit")
    rows = [line for line in out.splitlines() if line.startswith("| ") and ("MiB" in line or "KiB" in line)]
    assert any("plain AdamW" in r for r in rows) and any("Trainer GC + adafactor" in r for r in rows)
    assert any("in-backward 8-bit AdamW" in r for r in rows)
    assert "SKIP cuda-proof: no CUDA device" in _script("benchmarks/fullft.py", "--cuda-proof") or \
        torch.cuda.is_available()
