"""The CUDA proof: one prepared run of every claim this CPU machine cannot check, printing one table.

    python benchmarks/cuda_check.py            # on a CUDA machine: about 6-8 minutes on one H200
    python benchmarks/cuda_check.py --quick    # the same checks, smaller shapes (a minute or two)

On a machine without CUDA it prints one SKIP line and exits 0. Sections, each a row or a few of the table:

  gpu tests      pytest -m gpu (tracker against torch.cuda.max_memory_allocated, estimates against CUDA, offload)
  tracker        memopt.track's peak against torch.cuda.max_memory_allocated on the bench model (plain, checkpoint)
  estimate       memopt.estimate against the measured peak: 32-true, bf16-mixed, bf16-true, checkpointing, the chunked
                 loss, QLoRA (4-bit + LoRA); the CUDA context and fragmentation are not in either
  sdpa           the SDPA kernel memopt's probe saw (flash / efficient / cudnn) for a Llama in bf16, with and without
                 a padding mask, and a hand-written nanoGPT-style attention
  bitsandbytes   4-bit and 8-bit layers' CUDA kernels: outputs and input gradients against the dequantized weight
  optimizers     paged_adamw8bit and adamw8bit steps, state bytes per parameter
  offload        checkpoint="offload" against checkpoint=True (peak, step time)
  full FT        benchmarks/fullft.py --cuda-proof: activation offloading, CPU-offloaded optimizer state, and the
                 Llama-2-7B-shape full fine-tune under a 24 GiB cap
  compile        benchmarks/compile.py on CUDA (Inductor): eager and compiled, plain and memopt
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from memopt._units import format_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS: list[tuple[str, str, str, str]] = []  # (section, check, result, verdict)


def row(section: str, check: str, result: str, ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("ok" if ok else "FAIL")
    ROWS.append((section, check, result, verdict))
    print(f"  [{section}] {check}: {result} {verdict}", flush=True)


def section(name: str, fn, *args) -> None:
    started = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # one section failing must not hide the others' numbers
        row(name, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}", False)
        traceback.print_exc()
    print(f"  [{name}] {time.perf_counter() - started:.0f} s", flush=True)


def _llama_config(quick: bool, vocab: int = 32000):
    import transformers

    h, layers = (1024, 4) if quick else (2048, 8)
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=int(h * 8 / 3 // 64 * 64),
                                    num_hidden_layers=layers, num_attention_heads=h // 128,
                                    num_key_value_heads=h // 128, max_position_embeddings=4096, use_cache=False)


def _measured_step_peak(model, opt, ids, precision: str = "32-true") -> int:
    """Peak of a steady-state training step (after a warm-up step), as torch.cuda.max_memory_allocated."""
    autocast = precision in ("bf16-mixed", "16-mixed")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16,
                            enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def gpu_tests(args) -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    last = [line for line in out.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    row("gpu tests", "pytest -m gpu", last[0], out.returncode == 0)


def tracker(args) -> None:
    import transformers

    config = _llama_config(args.quick)
    ids = torch.randint(0, config.vocab_size, (4, 1024), device="cuda")
    for name, options in (("plain", {}), ("checkpoint=True", {"checkpoint": True})):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).cuda()
        memopt.apply(model, **options)
        opt = torch.optim.AdamW(model.parameters())
        _measured_step_peak(model, opt, ids)  # warm-up: optimizer state exists
        torch.cuda.reset_peak_memory_stats()
        with memopt.track(model, opt) as t:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        report = t.report()
        tracked = max(report.peak_bytes, 1)
        real = torch.cuda.max_memory_allocated()
        row("tracker", f"{name}: memopt.track vs max_memory_allocated",
            f"{format_bytes(report.peak_bytes)} vs {format_bytes(real)}", abs(tracked - real) / real < 0.05)
        del model, opt


def estimate(args) -> None:
    import transformers

    config = _llama_config(args.quick)
    batch, seq = 2, 1024
    cases = [
        ("32-true", {}, "adamw"),
        ("32-true", {"checkpoint": True}, "adamw"),
        ("bf16-mixed", {"checkpoint": True}, "adamw"),
        ("bf16-true", {"checkpoint": True}, "adamw"),
        ("bf16-true", {"checkpoint": True, "loss": "chunked"}, "adamw"),
        ("bf16-true", {"checkpoint": True, "quant": "4bit", "lora": 16}, "adamw"),
    ]
    for precision, options, optimizer in cases:
        est = memopt.estimate(config, batch_size=batch, seq_len=seq, device="cuda", precision=precision,
                              optimizer=optimizer, **options)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
        model = transformers.LlamaForCausalLM(config).to(dtype).cuda()
        memopt.apply(model, **options)
        opt = memopt.optimizer(model, optimizer)
        ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
        real = _measured_step_peak(model, opt, ids, precision)
        ratio = est.peak_bytes / real
        row("estimate", f"{precision} {options or 'plain'}",
            f"estimated {format_bytes(est.peak_bytes)}, measured {format_bytes(real)} ({ratio:.3f}x)",
            abs(ratio - 1) < 0.05)
        del model, opt
        torch.cuda.empty_cache()


def sdpa(args) -> None:
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from models import NanoGPT

    config = _llama_config(True, vocab=1000)
    for name, padded in (("llama bf16, no padding", False), ("llama bf16, left padding", True)):
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").to(torch.bfloat16)
        model.cuda().train()
        memopt.apply(model)
        ids = torch.randint(0, 1000, (2, 512), device="cuda")
        mask = torch.ones_like(ids)
        if padded:
            mask[0, :7] = 0
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        row("sdpa", name, memopt.applied(model).touched("attention:backend").get("", "not probed"))
    model = NanoGPT(d=256, nh=4).to(torch.bfloat16).cuda().train()
    memopt.apply(model)
    idx = torch.randint(0, 96, (2, 64), device="cuda")
    model(idx, idx)[1].backward()
    row("sdpa", "hand-written nanoGPT attention, bf16", memopt.applied(model).touched("attention:backend").get("", ""))


def bitsandbytes(args) -> None:
    import torch.nn as nn

    for quant in ("4bit", "8bit"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256)).to(torch.bfloat16).cuda()
        ref = copy.deepcopy(model)
        memopt.apply(model, quant=quant, lora=8, attention=None)
        x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = model(x)
        y.float().pow(2).mean().backward()
        with torch.no_grad():  # the reference: the float weights
            err = (y.float() - ref(x).float()).norm() / ref(x).float().norm()
        row("bitsandbytes", f"{quant} forward+backward on CUDA", f"relative error vs float weights {err:.4f}, input "
            f"grad finite {bool(torch.isfinite(x.grad).all())}", bool(torch.isfinite(x.grad).all()) and err < 0.2)


def optimizers(args) -> None:
    import torch.nn as nn

    for name in ("adamw8bit", "paged_adamw8bit"):
        model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4096)).cuda()
        opt = memopt.optimizer(model, name, lr=1e-3)
        model(torch.randn(8, 4096, device="cuda")).sum().backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        n = sum(p.numel() for p in model.parameters())
        row("optimizers", f"{name} step", f"{state / n:.3f} bytes of state per parameter", 1.9 < state / n < 2.2)


def offload(args) -> None:
    import transformers

    config = _llama_config(args.quick)
    ids = torch.randint(0, config.vocab_size, (4, 2048), device="cuda")
    results = {}
    for name in ("full", "offload"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).cuda()
        memopt.apply(model, checkpoint=name)
        opt = torch.optim.AdamW(model.parameters())
        t0 = time.perf_counter()
        results[name] = _measured_step_peak(model, opt, ids)
        results[name + " s"] = time.perf_counter() - t0
        del model, opt
        torch.cuda.empty_cache()
    row("offload", "checkpoint='offload' vs 'full' (peak, 2 steps' time)",
        f"{format_bytes(results['offload'])} vs {format_bytes(results['full'])}, "
        f"{results['offload s']:.2f} s vs {results['full s']:.2f} s", results["offload"] < results["full"])


def full_ft(args) -> None:
    import fullft

    for r in fullft.cuda_proof(argparse.Namespace(no_7b=args.quick)):
        row("full FT", r["name"], f"peak {format_bytes(r['peak'])}, step {r['step_s'] * 1e3:.0f} ms, loss "
            f"{r['loss']:.4f}", r["peak"] <= 24 * 2**30 if "24 GiB" in r["name"] else None)


def compile_bench(args) -> None:
    import compile as compile_bench_module

    argv = ["--device", "cuda", "--steps", "5", "--batch", "8", "--seq", "1024"]
    if args.quick:
        argv += ["--layers", "2"]
    for r in compile_bench_module.main(argv):
        row("compile", r["name"], f"peak {format_bytes(r['peak'])}, step {r['step_s'] * 1e3:.1f} ms, first step "
            f"{r['first_s']:.0f} s")


SECTIONS = {"gpu tests": gpu_tests, "tracker": tracker, "estimate": estimate, "sdpa": sdpa,
            "bitsandbytes": bitsandbytes, "optimizers": optimizers, "offload": offload, "full FT": full_ft,
            "compile": compile_bench}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, no 7B run")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP benchmarks/cuda_check.py: no CUDA device on this machine (torch "
              f"{torch.__version__}, cuda available: False); run it where `nvidia-smi` lists a GPU")
        return 0
    started = time.perf_counter()
    print(f"CUDA proof on {torch.cuda.get_device_name()}, torch {torch.__version__}, memopt {memopt.__version__}")
    warnings.simplefilter("ignore")
    for name, fn in SECTIONS.items():
        if args.only is None or name in args.only:
            print(f"== {name}", flush=True)
            section(name, fn, args)
    print("\n| section | check | result | verdict |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    failed = sum(r[3] == "FAIL" for r in ROWS)
    print(f"\n{len(ROWS)} rows, {failed} failed, {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
