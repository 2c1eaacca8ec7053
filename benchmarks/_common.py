"""Shared pieces of the benchmarks: the Llama-style bench model, peak memory and step time, side by side."""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from memopt._units import format_bytes


def bench_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported), after one warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="step time as wall-clock time, or as this process's CPU time (all threads; CPU device only): "
                        "steadier when other jobs share the machine")
    p.add_argument("--threads", type=int, action=_Threads, metavar="N",
                   help="torch.set_num_threads(N) (default: PyTorch's). On a shared machine 1 keeps --clock cpu "
                        "honest: threads spin-waiting on a descheduled sibling add CPU time that is not work")
    return p


class _Threads(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        if value < 1:
            parser.error(f"--threads {value}: give a positive number of threads")
        torch.set_num_threads(value)
        setattr(namespace, self.dest, value)


def llama(args, attn_implementation: str = "sdpa") -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 / 64 + 1) * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128), use_cache=False,
    )
    torch.manual_seed(0)
    config._attn_implementation = attn_implementation
    return transformers.LlamaForCausalLM(config)


def hf_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """transformers' own activation checkpointing (non-reentrant), the row memopt's is compared with."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def batch(args) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    return {"input_ids": ids, "labels": ids}


@dataclass
class Row:
    name: str
    peak_bytes: int
    step_s: float
    loss: float


def _step(model: nn.Module, inputs: dict) -> float:
    for p in model.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    return loss.item()


def peak_bytes(model: nn.Module, inputs: dict, device: str) -> tuple[int, float]:
    """Peak live bytes of one forward+backward: torch.cuda.max_memory_allocated on CUDA, PyTorch's MemTracker on CPU."""
    for p in model.parameters():
        p.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = _step(model, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), loss
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = _step(model, inputs)
    peak = tracker.get_tracker_snapshot("peak")
    return next(iter(peak.values()))["Total"], loss


def run_rows(variants: dict[str, Callable[[], nn.Module]], inputs: dict, args) -> list[Row]:
    """Build every variant, measure its peak, then time all of them round-robin (the machine is shared and noisy:
    interleaving spreads the noise over every row alike)."""
    models, peaks, losses = {}, {}, {}
    for name, build in variants.items():
        model = build().to(args.device).train()
        peaks[name], losses[name] = peak_bytes(model, inputs, args.device)
        _step(model, inputs)  # warm-up
        models[name] = model
    times: dict[str, list[float]] = {name: [] for name in variants}
    clock = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    for _ in range(args.steps):
        for name, model in models.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            _step(model, inputs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(clock() - t0)
    return [Row(n, peaks[n], statistics.median(times[n]), losses[n]) for n in variants]


def print_table(rows: list[Row], baseline: str, title: str, args) -> None:
    base = next(r for r in rows if r.name == baseline)
    print(f"\n{title}")
    clock = " (step time: CPU time of the process, all threads)" if getattr(args, "clock", "wall") == "cpu" else ""
    print(f"machine: {machine(args.device)}; torch {torch.__version__}{clock}")
    print("| variant | peak memory | vs baseline | step time | vs baseline | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.name} | {format_bytes(r.peak_bytes)} | {r.peak_bytes / base.peak_bytes:.2f}x | {r.step_s * 1000:.0f} ms"
            f" | {r.step_s / base.step_s:.2f}x | {r.loss:.4f} |"
        )


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def fresh(base: nn.Module, fn: Callable[[nn.Module], nn.Module] | None = None) -> Callable[[], nn.Module]:
    """A builder that deep-copies the base model (same weights in every row) and applies `fn`."""

    def build() -> nn.Module:
        model = copy.deepcopy(base)
        return fn(model) if fn is not None else model

    return build


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once); non-tensors are skipped."""
    from memopt.tracker import sum_storage_bytes

    return sum_storage_bytes(t for t in tensors if isinstance(t, torch.Tensor))


def resident_bytes(model: nn.Module, optimizer=None) -> dict[str, int]:
    """What lives between steps: parameters (quantized ones with their quantization state), buffers, optimizer
    state."""
    from memopt.transforms.quant import stored_tensors

    params = [t for p in model.parameters() for t in stored_tensors(p)]
    state = [] if optimizer is None else [t for s in optimizer.state.values() for t in s.values()]
    return {"params": storage_bytes(params) + storage_bytes(model.buffers()), "optimizer": storage_bytes(state)}


def profiled_peak_increment(fn) -> int:
    """Highest bytes allocated above the starting point while `fn` runs (works where MemTracker cannot: frozen and
    quantized parameters, modules run twice, compiled steps)."""
    from memopt.tracker import profiled_peak

    return profiled_peak(fn)
