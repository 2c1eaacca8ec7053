"""Train a Llama-style causal LM on the Python standard library's own source code, with memopt, and see where the
memory went.

    python examples/finetune_causal_lm.py                          # tiny preset, 200 steps: a few minutes on 2 CPU cores
    python examples/finetune_causal_lm.py --quant 4bit --lora 16   # QLoRA: 4-bit base, LoRA adapters, checkpointing
    python examples/finetune_causal_lm.py --optimizer adamw8bit --in-backward   # full fine-tune, 8-bit step in backward
    python examples/finetune_causal_lm.py --model-config 1b --precision bf16-mixed --batch-size 8 --seq-len 1024  # GPU

The model is built from a config (a named preset, see --model-config, or a local transformers config.json) with
random weights; the corpus is the standard library's .py files, tokenised with a byte-level BPE trained on them
(cached under ~/.cache/memopt, so only the first run trains it). `memopt.apply` is called once with the flags'
techniques, and the whole run is tracked with `memopt.track`. A progress bar shows the loss and the tracked memory
(live / peak). At the end it prints:

    what memopt did to each layer                       (memopt.applied)
    the run's memory, one row per block                 (MemoryReport.table)
    one step of the unmodified model against the run    (memopt.compare: same model, eager attention, no
                                                         checkpointing, no quantization, torch AdamW, the same
                                                         --precision)
    training loss (first and last 10 steps) and validation loss before and after training

and writes report.json (the run's MemoryReport, `MemoryReport.from_dict` reads it back), run.json (losses,
what was applied, peaks) and memory.png (per-layer bars and the memory timeline) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import transformers
from tqdm import tqdm

import memopt
from _data import eval_batches, load_corpus, random_batch
from memopt._units import format_bytes
from memopt.precision import PRECISIONS, Precision, dtype_name, precision_config, resolve_precision

# Llama-style shapes; vocab comes from the tokenizer. Every Linear's in_features is a multiple of 64, so all of them
# can be 4-bit (bitsandbytes' CPU kernels quantize whole 64-weight blocks per row).
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.9M parameters (half of them embedding and head): trains on 2 CPU cores in minutes
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    # ~6.9M, the quickstart's shape
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8),
    # ~29M, the benchmarks' shape
    "medium": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
    # ~1.0B, Llama-3.2-1B's layers (grouped-query attention, tied embedding) with the corpus' vocabulary: a GPU job
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(name: str, vocab_size: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A causal LM with random weights from a preset name or a config.json path, with eager attention (memopt
    switches it to SDPA; the unmodified copy keeps eager)."""
    if name in PRESETS:
        config = transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(2048, seq_len),
                                          use_cache=False, **PRESETS[name])
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(f"--model-config {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                             "config.json (or a directory holding one)")
        config = transformers.AutoConfig.from_pretrained(str(path))  # a file by its own name, a folder's config.json
        config.use_cache = False
        if config.vocab_size < vocab_size:
            raise ValueError(f"--model-config {name}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                             f"{vocab_size}; pass --vocab-size {config.vocab_size} or raise vocab_size in the config")
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return model


def block_depth(model: nn.Module) -> int:
    """FQN depth of the model's blocks (3 for ``model.layers.0``): the report folds every block into one row."""
    for fqn in memopt.applied(model).touched("checkpoint"):
        return fqn.count(".") + 1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return name.count(".") + 2
    return 1


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               scheduler: Any = None, clip: float | None = None, precision: Precision | None = None,
               scaler: Any = None) -> torch.Tensor:
    """One step: the forward and loss under `precision`'s autocast (bf16/fp16 compute for the "-mixed" ones), the
    loss scaled by `scaler` ("16-mixed"), gradients unscaled before clipping."""
    with (precision or PRECISIONS["32-true"]).autocast(ids.device.type):
        loss = model(input_ids=ids, labels=ids).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
             precision: Precision | None = None) -> float:
    model.eval()
    with (precision or PRECISIONS["32-true"]).autocast(torch.device(device).type):
        losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.float().item() for b in batches]
    model.train()
    return statistics.fmean(losses)


def plain_step_report(plain: nn.Module, batches: list[torch.Tensor], lr: float,
                      precision: Precision | None = None) -> memopt.MemoryReport | None:
    """One tracked training step of the unmodified model in the same precision (after an untracked warm-up step, so
    its optimizer state exists as in every step after the first); None if it does not fit on the GPU."""
    optimizer = torch.optim.AdamW(plain.parameters(), lr=lr)
    device_type = batches[0].device.type
    scaler = (precision or PRECISIONS["32-true"]).scaler(device_type)
    try:
        train_step(plain, optimizer, batches[0], precision=precision, scaler=scaler)
        with memopt.track(plain, optimizer) as tracker:
            train_step(plain, optimizer, batches[1], precision=precision, scaler=scaler)
    except torch.OutOfMemoryError:
        return None
    return tracker.report()


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10% of the steps (at most 100), then cosine decay to 10% of the peak lr."""
    warmup = min(100, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def checkpoint_arg(value: str) -> Any:
    if value.isdigit():
        return int(value)
    if value in ("none", "full", "selective", "offload"):
        return None if value == "none" else value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a checkpoint policy; use none, full, selective, offload or N (every N-th block)")


def device_arg(value: str) -> torch.device:
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {value}: CUDA is not available here; use --device cpu")
    return device


def parser(description: str, quant: bool = True, device: bool = True) -> argparse.ArgumentParser:
    """The flags shared with hf_trainer.py and fsdp_finetune.py: model, techniques, corpus, training length;
    `quant`: also --quant and --optimizer (bitsandbytes), which FSDP cannot shard; `device`: also --device (under
    FSDP the launcher decides)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-config", default="tiny", metavar="PRESET|PATH",
                   help=f"a preset ({', '.join(PRESETS)}) or a transformers config.json (file or directory)")
    p.add_argument("--checkpoint", type=checkpoint_arg, default="full", metavar="POLICY",
                   help="activation checkpointing: none, full, selective, offload or N (every N-th block)")
    p.add_argument("--attention", choices=("sdpa", "none"), default="sdpa",
                   help="sdpa: no (batch, heads, seq, seq) matrix kept for backward; none: the model's eager attention")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA adapters of this rank (0: full fine-tune)")
    if quant:
        p.add_argument("--quant", choices=("none", "4bit", "nf4", "fp4", "8bit"), default="none",
                       help="weights in 4 or 8 bits (bitsandbytes); needs --lora to train anything")
        p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit", "adamw4bit", "adafactor"),
                       default="adamw", help="memopt.optimizer: torch AdamW (8 bytes of state per parameter), "
                       "bitsandbytes' 8-bit state (~2; paged: CUDA only), torchao's 4-bit (~1.07; memopt[optim]), "
                       "torch Adafactor (~0.03)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3, 1e-3 with --lora)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="32-true (default): float32 throughout; bf16-mixed: float32 weights, gradients and optimizer "
                        "state, bf16 autocast (what most GPU fine-tunes run); 16-mixed: the same in fp16 with a "
                        "GradScaler (on CPU: float16 autocast and torch.amp.GradScaler('cpu'), slow without native "
                        "fp16 arithmetic); bf16-true: everything bf16")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="the parameters' dtype; alone it means its '-true' precision (bfloat16: bf16-true)")
    if device:
        p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096, help="byte-level BPE vocabulary trained on the corpus")
    p.add_argument("--max-files", type=int, default=None,
                   help="use an evenly spaced subset of the standard library's files (default: all)")
    p.add_argument("--cache-dir", default=None, help="tokenizer and token ids cache (default ~/.cache/memopt)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches evaluated before and after")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("steps", "batch_size", "seq_len", "eval_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.lora < 0:
        p.error(f"--lora {args.lora} must be a rank >= 1, or 0 for a full fine-tune")
    if args.lr is None:
        args.lr = 1e-3 if args.lora else 3e-3
    if getattr(args, "quant", "none") != "none" and not args.lora:
        p.error(f"--quant {args.quant} freezes the quantized weights; add --lora RANK so that something trains")
    try:  # --precision and --dtype: one precision (memopt.precision), args.dtype the parameters' dtype
        precision = resolve_precision(args.precision, args.dtype)[0]
    except ValueError as exc:
        p.error(str(exc).replace("precision=", "--precision ").replace("dtype=", "--dtype "))
    args.precision, args.dtype = precision.name, dtype_name(precision.param_dtype)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/finetune_causal_lm", help="where report.json, run.json and memory.png go")
    p.add_argument("--loss", choices=("none", "chunked"), default="none",
                   help="chunked: the output head and cross-entropy chunk by chunk, the logits never whole")
    p.add_argument("--in-backward", action="store_true",
                   help="the optimizer step fused into backward: each gradient is applied and freed as soon as it is "
                        "complete (no gradient clipping then: no global norm exists)")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.in_backward and args.precision == "16-mixed":
        p.error("--in-backward with --precision 16-mixed: the GradScaler unscales every gradient before the step, "
                "and in backward each is applied and freed as soon as it exists; use --precision bf16-mixed")

    corpus = load_corpus(args.vocab_size, args.max_files, args.cache_dir)
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model_config, corpus.vocab_size, args.seq_len, DTYPES[args.dtype], args.device)
    except ValueError as exc:
        p.error(str(exc))
    model.train()
    plain = copy.deepcopy(model)  # the unmodified model, for the comparison
    try:
        memopt.apply(model, checkpoint=args.checkpoint, attention=None if args.attention == "none" else "sdpa",
                     quant=None if args.quant == "none" else args.quant, lora=args.lora or None,
                     loss=None if args.loss == "none" else args.loss)
        optimizer = memopt.optimizer(model, args.optimizer, lr=args.lr, in_backward=args.in_backward)
    except (ValueError, TypeError, ImportError, NotImplementedError) as exc:
        p.error(str(exc))
    scheduler = cosine_schedule(optimizer, args.steps)
    precision = precision_config(args.precision)
    scaler = precision.scaler(args.device.type)
    technique = describe(args)
    n_params = sum(t.numel() for t in plain.parameters())
    n_trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    print(corpus)
    print(f"model: {args.model_config} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters, "
          f"{n_trainable / 1e6:.2f}M trainable), {args.dtype} on {args.device}; {technique}")
    print(f"precision: {precision}" + (
        "; on CPU: float16 autocast (matmuls in float16, slow on CPUs without native fp16 arithmetic) and "
        "torch.amp.GradScaler('cpu')" if precision.grad_scaler and args.device.type == "cpu" else ""))
    print(f"training: {args.steps} steps of batch {args.batch_size} x seq {args.seq_len}, lr {args.lr:g}")

    g = torch.Generator().manual_seed(args.seed)
    g_first = torch.Generator().manual_seed(args.seed)  # the run's first two batches
    first = [random_batch(corpus.train, args.batch_size, args.seq_len, g_first).to(args.device) for _ in range(2)]
    before = plain_step_report(plain, first, args.lr, precision)
    del plain
    val = eval_batches(corpus.val, args.batch_size, args.seq_len, args.eval_batches)
    val_before = evaluate(model, val, args.device, precision)

    losses: list[float] = []
    t0 = time.perf_counter()
    with memopt.track(model, optimizer) as tracker:
        bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True, mininterval=1.0)
        for step in bar:
            ids = random_batch(corpus.train, args.batch_size, args.seq_len, g).to(args.device)
            losses.append(train_step(model, optimizer, ids, scheduler, clip=None if args.in_backward else 1.0,
                                     precision=precision, scaler=scaler).item())
            if step % 10 == 0 or step == args.steps - 1:  # a report walks every layer: not every step
                peak = tracker.report().peak_bytes
                bar.set_postfix(loss=f"{statistics.fmean(losses[-10:]):.3f}",
                                mem=f"{format_bytes(tracker.live_bytes)} / {format_bytes(peak)}", refresh=False)
    seconds = time.perf_counter() - t0
    report = tracker.report()
    val_after = evaluate(model, val, args.device, precision)

    depth = block_depth(model)
    print("\n" + str(memopt.applied(model)))
    print(f"\nmemory of the training run ({args.steps} steps, memopt.track), one row per block:\n")
    print(report.table(depth=depth))
    if before is None:
        print(f"\nthe unmodified model's training step ran out of memory on {args.device}: nothing to compare")
    else:
        comparison = memopt.compare(before, report, names=("plain", "memopt"))
        print("\none training step of the unmodified model (eager attention, no checkpointing, no quantization, "
              f"torch AdamW, {args.precision}) against the run (memopt.compare):\n")
        print(comparison.table(depth=depth))

    k = min(10, max(1, len(losses) // 2))
    first_loss, last_loss = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    print(f"\ntraining loss: {first_loss:.4f} (mean of the first {k} steps) -> {last_loss:.4f} (last {k})")
    print(f"validation loss: {val_before:.4f} before -> {val_after:.4f} after training")
    print(f"time: {seconds:.1f} s, {seconds / args.steps * 1000:.0f} ms per step")
    peak_line = f"peak memory: memopt {format_bytes(report.peak_bytes)}"
    if before is not None:
        peak_line += f", unmodified step {format_bytes(before.peak_bytes)} ({report.peak_bytes / before.peak_bytes:.2f}x)"
    print(peak_line)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(str(out / "report.json"))
    report.plot(str(out / "memory.png"), depth=depth,
                title=f"{args.model_config}, {technique}: peak {format_bytes(report.peak_bytes)}")
    summary = {
        "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
        "technique": technique,
        "losses": losses,
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "peak_bytes": report.peak_bytes,
        "plain_peak_bytes": None if before is None else before.peak_bytes,
        "seconds": seconds,
        "applied": memopt.applied(model).to_dict(),
    }
    (out / "run.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'report.json'}, {out / 'run.json'}, {out / 'memory.png'}")
    return summary


def describe(args: argparse.Namespace) -> str:
    """The techniques as one short phrase, e.g. ``checkpoint=full, sdpa, 4bit + LoRA r16, adamw8bit``."""
    parts = [f"checkpoint={args.checkpoint}" if args.checkpoint else "no checkpointing",
             "sdpa" if args.attention == "sdpa" else "eager attention"]
    quant = getattr(args, "quant", "none")
    if quant != "none" or args.lora:
        parts.append(" + ".join(x for x in (None if quant == "none" else quant,
                                            f"LoRA r{args.lora}" if args.lora else None) if x))
    if getattr(args, "loss", "none") != "none":
        parts.append(f"{args.loss} loss")
    parts.append(getattr(args, "optimizer", "adamw") + (" in backward" if getattr(args, "in_backward", False) else ""))
    if getattr(args, "precision", "32-true") not in (None, "32-true"):
        parts.append(args.precision)
    return ", ".join(parts)


if __name__ == "__main__":
    main()
