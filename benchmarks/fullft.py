"""Full fine-tuning below parameters + gradients + optimizer state: plain AdamW, transformers Trainer's most frugal
flags, and memopt's best, side by side in one process.

    python benchmarks/fullft.py --clock cpu [--steps 50] [--precision fp32 bf16-mixed]
    python benchmarks/fullft.py --int8          # 8-bit + LoRA + checkpointing: what bitsandbytes kept, now freed
    python benchmarks/fullft.py --cuda-proof    # CUDA-only claims (offload, CPU-offloaded state, 7B on 24 GiB)
    python benchmarks/fullft.py --headline      # the 7B-on-24-GiB recipe: memopt.plan for the Llama-2-7B shape, and
                                                # the same recipe on a ~100M Llama on CPU: trains, within its estimate

Rows (the Llama-style bench model: hidden 512, 6 layers, vocab 8000, batch 4, seq 512; every weight trained):
  plain AdamW                     the unmodified model, torch AdamW
  Trainer GC + adamw_bnb_8bit     what transformers' Trainer builds from TrainingArguments(gradient_checkpointing=True,
  Trainer GC + adafactor          optim=...): `gradient_checkpointing_enable` and `Trainer.get_optimizer_cls_and_kwargs`,
                                  with its default global-norm clipping (max_grad_norm=1.0)
  memopt in-backward AdamW        checkpoint=True, loss="chunked", memopt.optimizer("adamw", in_backward=True)
  memopt in-backward 8-bit/4-bit  the same with "adamw8bit" (bitsandbytes) / "adamw4bit" (torchao)
Every row trains on the same batches (two, cycled) from the same weights, in fp32 and in bf16-mixed (fp32 weights,
torch.autocast bf16, as Trainer's bf16=True). Per row: the peak of a step with the optimizer state present
(`memopt.track`; CUDA: max_memory_allocated), the median step time of the untracked steps (all rows' steps
interleaved, so the machine's noise falls on every row alike; `--clock cpu`: the process's CPU time), the loss
after `--steps` steps.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import bench_args, llama, machine  # noqa: E402
from memopt._units import format_bytes  # noqa: E402

PRECISIONS = ("fp32", "bf16-mixed")



def _batches(args, n: int = 2) -> list[dict]:
    out = []
    for i in range(n):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(i))
        out.append({"input_ids": ids.to(args.device), "labels": ids.to(args.device)})
    return out


def _trainer_row(base, optim: str, lr: float):
    """The model and optimizer transformers' Trainer makes of TrainingArguments(gradient_checkpointing=True,
    optim=optim), and its default clipping."""
    import tempfile

    import transformers

    targs = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), gradient_checkpointing=True, optim=optim,
                                           learning_rate=lr, report_to=[], use_cpu=not torch.cuda.is_available())

    def build(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=targs.gradient_checkpointing_kwargs)
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(targs, model)
        decay = [p for n, p in model.named_parameters() if p.requires_grad]
        opt = cls([{"params": decay, "weight_decay": targs.weight_decay}], **kwargs)
        return model, opt, targs.max_grad_norm

    return build


def _memopt_row(name: str, lr: float):
    def build(model):
        memopt.apply(model, checkpoint=True, loss="chunked")
        return model, memopt.optimizer(model, name, in_backward=True, lr=lr), None

    return build


def rows_for(base, args) -> dict:  # noqa: ARG001
    rows = {
        "plain AdamW": lambda m: (m, torch.optim.AdamW(m.parameters(), lr=args.lr), None),
        "Trainer GC + adamw_bnb_8bit": _trainer_row(base, "adamw_bnb_8bit", args.lr),
        "Trainer GC + adafactor": _trainer_row(base, "adafactor", args.lr),
        "memopt ckpt + chunked + in-backward AdamW": _memopt_row("adamw", args.lr),
        "memopt ckpt + chunked + in-backward 8-bit AdamW": _memopt_row("adamw8bit", args.lr),
    }
    if memopt.optim.OPTIMIZERS["adamw4bit"].available() and not args.no_4bit:
        rows["memopt ckpt + chunked + in-backward 4-bit AdamW"] = _memopt_row("adamw4bit", args.lr)
    return rows


def _step(row: dict, batch: dict, precision: str, device: str) -> float:
    model, opt, clip = row["model"], row["opt"], row["clip"]
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16-mixed" \
        else contextlib.nullcontext()
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run(args, precision: str) -> list[dict]:
    base = llama(args)
    batches = _batches(args)
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, build in rows_for(base, args).items():
            torch.manual_seed(0)
            model, opt, clip = build(copy.deepcopy(base).to(args.device).train())
            rows[name] = {"name": name, "model": model, "opt": opt, "clip": clip, "losses": [], "times": []}
        cuda = args.device.startswith("cuda")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for i in range(args.steps):
            batch = batches[i % len(batches)]
            for row in rows.values():
                if i == 1:  # the optimizer state exists from the first step on: the steady-state peak
                    if cuda:
                        torch.cuda.synchronize()
                    with memopt.track(row["model"], row["opt"]) as tracker:
                        row["losses"].append(_step(row, batch, precision, args.device))
                    row["peak"] = tracker.report().peak_bytes
                    row["breakdown"] = tracker.report().peak_breakdown
                    continue
                if cuda:
                    torch.cuda.synchronize()
                t0 = clock()
                row["losses"].append(_step(row, batch, precision, args.device))
                if cuda:
                    torch.cuda.synchronize()
                if i >= 2:
                    row["times"].append(clock() - t0)
    out = []
    for row in rows.values():
        out.append({"name": row["name"], "peak": row["peak"], "breakdown": row["breakdown"],
                    "step_s": statistics.median(row["times"] or [float("nan")]), "loss": row["losses"][-1],
                    "first": row["losses"][0]})
        del row["model"], row["opt"]
    return out


def print_rows(rows: list[dict], precision: str, args) -> None:
    plain = rows[0]
    trainer = min((r for r in rows if r["name"].startswith("Trainer")), key=lambda r: r["peak"])
    print(f"\n{precision}: {args.steps} steps of batch {args.batch} x seq {args.seq} (hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}), lr {args.lr}")
    print("| row | step peak | vs plain | vs Trainer's best | grads at peak | optimizer at peak | step time | "
          "vs plain | loss step 1 | loss last | vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {format_bytes(r['peak'])} | {r['peak'] / plain['peak']:.2f}x | "
              f"{r['peak'] / trainer['peak']:.2f}x | {format_bytes(r['breakdown']['grads'])} | "
              f"{format_bytes(r['breakdown']['optimizer'])} | {r['step_s'] * 1e3:.0f} ms | "
              f"{r['step_s'] / plain['step_s']:.2f}x | {r['first']:.4f} | {r['loss']:.4f} | "
              f"{r['loss'] / plain['loss'] - 1:+.2%} |")


# -- 8-bit layers: what bitsandbytes kept for backward, freed ------------------------------------------------------
def int8_section(args) -> list[dict]:
    """8-bit + LoRA r16 + full checkpointing on the bench model, with bitsandbytes' own 8-bit forward (its input
    kept as a ctx attribute) and with memopt's (nothing kept): the peak of a tracked step after a warm-up step."""
    from memopt._patch import uninstall
    from memopt.transforms.quant import _Int8NoInput

    base = llama(args)
    batch = _batches(args, 1)[0]
    out = []
    for label in ("bitsandbytes' 8-bit forward (input kept)", "memopt (input freed)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = memopt.apply(copy.deepcopy(base).to(args.device), quant="8bit", lora=16, checkpoint=True).train()
        if label.startswith("bitsandbytes"):
            for module in model.modules():
                uninstall(module, _Int8NoInput)
        inputs: dict[int, int] = {}

        def note(m, a, o):  # the forward's calls (checkpointing's recompute in backward calls them again)
            if torch._C._current_graph_task_id() == -1:
                inputs[a[0].untyped_storage()._cdata] = a[0].untyped_storage().nbytes()

        hooks = [m.register_forward_hook(note) for m in model.modules() if type(m).__name__ == "Linear8bitLt"]
        opt = memopt.optimizer(model, "adamw", lr=1e-4)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        for h in hooks:
            h.remove()
        with memopt.track(model, opt) as tracker:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        report = tracker.report()
        out.append({"name": label, "peak": report.peak_bytes, "activations": report.peak_breakdown["activations"],
                    "inputs": sum(inputs.values()), "loss": loss.item()})
    print(f"\n8-bit + LoRA r16 + checkpoint=True, fp32, batch {args.batch} x seq {args.seq}; memopt.track")
    print("| 8-bit forward | step peak | activations at peak | loss |")
    print("|---|---:|---:|---:|")
    for r in out:
        print(f"| {r['name']} | {format_bytes(r['peak'])} | {format_bytes(r['activations'])} | {r['loss']:.4f} |")
    print(f"peak falls by {format_bytes(out[0]['peak'] - out[1]['peak'])}; the 8-bit layers' inputs of one forward "
          f"(distinct storages) are {format_bytes(out[0]['inputs'])}")
    return out


# -- CUDA-only claims, for the lead's CUDA proof script ------------------------------------------------------------
def cuda_proof(args) -> list[dict]:
    """Rows the CPU cannot measure: activation offloading (memory and time, with and without checkpointing),
    CPU-offloaded optimizer state, and the Llama-2-7B-shape full fine-tune under a 24 GiB cap. Prints
    `SKIP cuda-proof: ...` and returns [] without CUDA."""
    if not torch.cuda.is_available():
        print("SKIP cuda-proof: no CUDA device")
        return []
    device = "cuda"
    out = []

    def measure(name, build, batch, steps=3, precision="fp32"):
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model, opt, clip = build()
        row = {"model": model, "opt": opt, "clip": clip}
        _step(row, batch, precision, device)  # warm-up: state exists
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(_step(row, batch, precision, device))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        r = {"name": name, "peak": torch.cuda.max_memory_allocated(), "step_s": statistics.median(times),
             "loss": losses[-1]}
        print(f"| {name} | {format_bytes(r['peak'])} | {r['step_s'] * 1e3:.1f} ms | {r['loss']:.4f} |", flush=True)
        out.append(r)
        del model, opt, row
        return r

    bench = bench_args("").parse_args([])
    bench.device = device
    bench.batch, bench.seq = 8, 1024
    base = llama(bench).to(device)
    batch = _batches(bench, 1)[0]
    print(f"\ncuda-proof on {machine(device)}; bench model batch {bench.batch} x seq {bench.seq}")
    print("| row | peak | step | loss |")
    print("|---|---:|---:|---:|")

    def variant(**options):
        def build():
            model = memopt.apply(copy.deepcopy(base), **options).train()
            return model, torch.optim.AdamW(model.parameters(), lr=1e-4), None
        return build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure("activations: none offloaded", variant(), batch)
        measure("activations: offload=True", variant(offload=True), batch)
        measure("activations: checkpoint=True", variant(checkpoint=True), batch)
        measure("activations: checkpoint=True, offload=True", variant(checkpoint=True, offload=True), batch)
        measure("activations: checkpoint=True, offload=True, no streams",
                variant(checkpoint=True, offload=memopt.OffloadConfig(use_streams=False)), batch)

        def state(**kw):
            def build():
                model = memopt.apply(copy.deepcopy(base), checkpoint=True, loss="chunked").train()
                return model, memopt.optimizer(model, "adamw", lr=1e-4, **kw), None
            return build

        measure("state: AdamW on the GPU", state(), batch)
        measure("state: AdamW, cpu_offload=True", state(cpu_offload=True), batch)
        measure("state: AdamW, cpu_offload=True, in_backward=True", state(cpu_offload=True, in_backward=True), batch)
        measure("state: AdamW, in_backward=True", state(in_backward=True), batch)
        base = None  # the closures above hold it: free it for what follows
        if not args.no_7b:
            out.append(seven_b(device))
    return out


def seven_b(device: str) -> dict:
    """Llama-2-7B shape, every weight trained, batch 1 x seq 2048, bf16 weights, in-backward 4-bit AdamW with bf16
    stochastic rounding, checkpointing and the chunked loss, 3 steps with the process capped at 24 GiB."""
    import transformers

    cap = 24 * 2**30
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                                      use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    memopt.apply(model, checkpoint=True, loss="chunked")
    opt = memopt.optimizer(model, "adamw4bit", in_backward=True, lr=1e-5, bf16_stochastic_round=True)
    ids = torch.randint(0, 32000, (1, 2048), device=device, generator=torch.Generator(device).manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    r = {"name": "7B full fine-tune, 24 GiB cap", "peak": torch.cuda.max_memory_allocated(), "step_s": times[-1],
         "loss": losses[-1]}
    print(f"| Llama-2-7B shape, bf16, in-backward adamw4bit (bf16 SR), checkpoint + chunked, b1 x s2048, cap 24 GiB "
          f"| {format_bytes(r['peak'])} | {r['step_s'] * 1e3:.0f} ms | losses {', '.join(f'{x:.4f}' for x in losses)} |")
    torch.cuda.set_per_process_memory_fraction(1.0)
    return r


# -- the headline: a 7B full fine-tune on a 24 GiB card, planned; the same recipe on CPU at ~100M ---------------
HEADLINE = dict(precision="bf16-true", optimizer="adamw4bit", in_backward=True, checkpoint="full", loss="chunked")


def headline(args) -> dict:
    """`memopt.plan` for the Llama-2-7B shape (transformers.LlamaConfig() defaults), batch 1 x seq 2048, bf16 weights,
    every weight trained, 24 GiB; the recipe's own estimate; then the recipe on a ~100M-parameter Llama on CPU:
    `--headline-steps` steps on one batch (loss falls), the tracked peak of the steps after the first (torchao
    compiles its update at the first) against `memopt.estimate(device="cpu")`."""
    import transformers

    out = {}
    if not args.no_7b:
        seven = transformers.LlamaConfig()
        t0 = time.process_time()
        plan = memopt.plan(seven, "24GiB", batch_size=1, seq_len=2048, device="cuda", precision="bf16-true",
                           allow_lora=False)
        cpu_s = time.process_time() - t0
        print(plan)
        print(f"(plan: {cpu_s:.1f} s of CPU time)\n")
        est = memopt.estimate(seven, batch_size=1, seq_len=2048, device="cuda", **HEADLINE)
        print("the recipe itself (in-backward adamw4bit, checkpoint + chunked loss):")
        print("\n".join(line for line in str(est).splitlines()[:16] if line.strip()))
        out["plan"] = {"fits": plan.fits, "name": plan.name, "peak": plan.estimate.peak_bytes, "cpu_s": cpu_s,
                       "breakdown": plan.estimate.breakdown}
        out["recipe_7b"] = {"peak": est.peak_bytes, "breakdown": est.breakdown}
    h, layers, vocab, seq = args.headline_shape
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=int(h * 2.7) // 64 * 64,
                                      num_hidden_layers=layers, num_attention_heads=h // 64,
                                      num_key_value_heads=h // 64, max_position_embeddings=max(2048, seq))
    est = memopt.estimate(config, batch_size=1, seq_len=seq, device="cpu", **HEADLINE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(model, checkpoint="full", loss="chunked")
    model.train()
    opt = memopt.optimizer(model, "adamw4bit", in_backward=True, lr=1e-3, bf16_stochastic_round=True)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    losses, times = [], []

    def step():
        t0 = time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.process_time() - t0)
        losses.append(loss.item())

    step()  # torchao compiles its update here
    with memopt.track(model, opt) as tracker:
        for _ in range(args.headline_steps - 1):
            step()
    report = tracker.report()
    ratio = report.peak_bytes / est.peak_bytes
    print(f"\nCPU, {n / 1e6:.0f}M-parameter Llama (hidden {h}, {layers} layers, vocab {vocab}), batch 1 x seq {seq}, "
          "bf16 weights, in-backward adamw4bit (bf16 stochastic rounding), checkpoint + chunked loss")
    print("| | peak | params | grads | optimizer | activations | other |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, peak, b in (("estimate", est.peak_bytes, est.breakdown),
                          (f"measured (memopt.track, steps 2-{args.headline_steps})", report.peak_bytes,
                           report.peak_breakdown)):
        print(f"| {name} | {format_bytes(peak)} | " + " | ".join(
            format_bytes(b.get(c, 0)) for c in ("params", "grads", "optimizer", "activations", "other")) + " |")
    print(f"measured / estimate: {ratio:.3f}; losses {', '.join(f'{x:.4f}' for x in losses)}; step CPU time "
          f"(after the first) {statistics.median(times[1:]):.1f} s")
    out["cpu"] = {"params": n, "estimate": est.peak_bytes, "measured": report.peak_bytes, "ratio": ratio,
                  "losses": losses}
    return out


def main(argv=None):
    parser = bench_args(__doc__.splitlines()[0])
    parser.set_defaults(steps=50)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--int8", action="store_true", help="only the 8-bit section")
    parser.add_argument("--no-4bit", action="store_true", help="leave out the torchao 4-bit row (it compiles its "
                                                                 "update once per parameter shape)")
    parser.add_argument("--cuda-proof", action="store_true", help="only the CUDA-only rows (skips without CUDA)")
    parser.add_argument("--no-7b", action="store_true", help="with --cuda-proof / --headline: leave out the 7B run "
                                                              "/ plan")
    parser.add_argument("--headline", action="store_true", help="only the 7B-on-24-GiB recipe: the plan, and the "
                                                                "recipe on a small Llama on CPU")
    parser.add_argument("--headline-shape", type=int, nargs=4, default=(640, 12, 32000, 256),
                        metavar=("HIDDEN", "LAYERS", "VOCAB", "SEQ"), help="--headline's CPU model (default: ~100M "
                                                                            "parameters, seq 256)")
    parser.add_argument("--headline-steps", type=int, default=4)
    args = parser.parse_args(argv)
    if args.headline:
        return {"headline": headline(args)}
    if args.cuda_proof:
        return {"cuda_proof": cuda_proof(args)}
    if args.int8:
        return {"int8": int8_section(args)}
    clock = "CPU time of the process, all threads" if args.clock == "cpu" else "wall clock"
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; step time: {clock}")
    results = {}
    for precision in args.precision:
        results[precision] = run(args, precision)
        print_rows(results[precision], precision, args)
    return results


if __name__ == "__main__":
    main()
