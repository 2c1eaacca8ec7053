"""memopt.estimate on the Llama-2-7B shape, no GPU: the README's estimates table; memopt.plan on it and on the
Llama-3-8B shape.

    python benchmarks/estimate.py               # hidden 4096, 32 layers, intermediate 11008, vocab 32000, seq 2048
    python benchmarks/estimate.py --plan-8b     # also: the Llama-3-8B shape at 12 GiB (seq 4096), timed

One estimate per row (fake tensors: no memory, seconds each), in the precision named in the row: "bf16-true" (bf16
weights, gradients and AdamW state: what `dtype="bfloat16"` means) or "bf16-mixed" (float32 weights, gradients and
AdamW state, bf16 autocast: what most fine-tunes run). Then what `memopt.plan` picks for 24 GiB (bf16-mixed) and,
without LoRA, for 80 GiB. Times are CPU seconds of this process (`time.process_time`: the machine is shared) and wall
seconds.
"""

from __future__ import annotations

import argparse
import time

import transformers

import memopt
from memopt._units import format_bytes

ROWS = (
    ("full fine-tune, AdamW, no checkpointing", "bf16-true", dict()),
    ("full fine-tune, AdamW, no checkpointing", "bf16-mixed", dict()),
    ("full fine-tune, AdamW, checkpoint=True", "bf16-mixed", dict(checkpoint=True)),
    ("full fine-tune, 8-bit AdamW, checkpoint=True", "bf16-true", dict(checkpoint=True, optimizer="adamw8bit")),
    ("full fine-tune, 8-bit AdamW, checkpoint=True", "bf16-mixed", dict(checkpoint=True, optimizer="adamw8bit")),
    ("full fine-tune, 8-bit AdamW, batch 8, no checkpointing", "bf16-true", dict(optimizer="adamw8bit", batch_size=8)),
    ("full fine-tune, 8-bit AdamW, batch 8, checkpoint=True", "bf16-true", dict(optimizer="adamw8bit", batch_size=8,
                                                                                 checkpoint=True)),
    ("full fine-tune, 8-bit AdamW, batch 8, checkpoint=True", "bf16-mixed", dict(optimizer="adamw8bit", batch_size=8,
                                                                                  checkpoint=True)),
    ("full fine-tune, AdamW, checkpoint=True, FSDP2 world size 8 (per rank)", "bf16-mixed",
     dict(checkpoint=True, world_size=8)),
    ("LoRA r16, checkpoint=True", "bf16-true", dict(checkpoint=True, lora=16)),
    ("QLoRA: quant='4bit', lora=16, checkpoint=True", "bf16-true", dict(checkpoint=True, quant="4bit", lora=16)),
    ("QLoRA: quant='4bit', lora=16, checkpoint=True", "bf16-mixed", dict(checkpoint=True, quant="4bit", lora=16)),
    ("generate: 8 sequences x 4096 tokens", "bf16-true", dict(mode="generate", batch_size=8, seq_len=4096)),
)


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-plan", action="store_true")
    p.add_argument("--plan-8b", action="store_true", help="also plan the Llama-3-8B shape at 12 GiB, timed")
    args = p.parse_args(argv)
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      intermediate_size=args.intermediate, num_attention_heads=args.heads,
                                      vocab_size=args.vocab)
    print(f"Llama shape: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab "
          f"{args.vocab}; device='cuda', batch 1 x {args.seq} unless stated")
    print("| step | precision | peak | params | grads | optimizer | activations | autocast | other | CPU time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, precision, kw in ROWS:
        kw = dict(kw)
        est, cpu, _ = _timed(lambda: memopt.estimate(config, batch_size=kw.pop("batch_size", 1),
                                                     seq_len=kw.pop("seq_len", args.seq), precision=precision, **kw))
        b = est.breakdown
        kv = f" (KV cache {format_bytes(est.kv_cache_bytes)})" if est.kv_cache_bytes else ""
        print(f"| {name}{kv} | {precision} | {format_bytes(est.peak_bytes)} | {format_bytes(b['params'])} | "
              f"{format_bytes(b['grads'])} | {format_bytes(b['optimizer'])} | {format_bytes(b['activations'])} | "
              f"{format_bytes(b['autocast'])} | {format_bytes(b['other'])} | {cpu:.0f} s |", flush=True)
    if not args.no_plan:
        for budget, kw in (("24GiB", {}), ("80GiB", dict(allow_lora=False))):
            plan, cpu, wall = _timed(lambda: memopt.plan(config, budget, seq_len=args.seq, precision="bf16-mixed",
                                                         **kw))
            print(plan)
            print(f"({cpu:.0f} s of CPU time, {wall:.0f} s wall)\n", flush=True)
    if args.plan_8b:
        llama3 = transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                          rope_theta=500000.0, max_position_embeddings=8192)
        for kw in (dict(dtype="bfloat16"), dict(precision=["bf16-mixed", "bf16-true"])):
            plan, cpu, wall = _timed(lambda: memopt.plan(llama3, "12GiB", seq_len=4096, **kw))
            print(f"Llama-3-8B shape, batch 1 x seq 4096, 12 GiB, {kw}:")
            print(plan)
            print(f"({cpu:.0f} s of CPU time, {wall:.0f} s wall)\n", flush=True)


if __name__ == "__main__":
    main()
