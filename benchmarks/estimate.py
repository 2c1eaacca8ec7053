"""memopt.estimate on the Llama-2-7B shape, no GPU: the README's estimates table.

    python benchmarks/estimate.py           # hidden 4096, 32 layers, intermediate 11008, vocab 32000, bf16, seq 2048

One estimate per row (fake tensors: no memory, seconds each), then what `memopt.plan` picks for 24 GiB and, without
LoRA, for 80 GiB.
"""

from __future__ import annotations

import argparse
import time

import transformers

import memopt
from memopt._units import format_bytes

ROWS = (
    ("bf16 full fine-tune, AdamW, no checkpointing", dict()),
    ("bf16 full fine-tune, AdamW, checkpoint=True", dict(checkpoint=True)),
    ("bf16 full fine-tune, 8-bit AdamW, checkpoint=True", dict(checkpoint=True, optimizer="adamw8bit")),
    ("bf16 full fine-tune, 8-bit AdamW, batch 8, no checkpointing", dict(optimizer="adamw8bit", batch_size=8)),
    ("bf16 full fine-tune, 8-bit AdamW, batch 8, checkpoint=True", dict(optimizer="adamw8bit", batch_size=8,
                                                                       checkpoint=True)),
    ("bf16 full fine-tune, AdamW, checkpoint=True, FSDP2 world size 8 (per rank)", dict(checkpoint=True, world_size=8)),
    ("LoRA r16 (bf16 base), checkpoint=True", dict(checkpoint=True, lora=16)),
    ("QLoRA: quant='4bit', lora=16, checkpoint=True", dict(checkpoint=True, quant="4bit", lora=16)),
    ("generate: 8 sequences x 4096 tokens", dict(mode="generate", batch_size=8, seq_len=4096)),
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-plan", action="store_true")
    args = p.parse_args(argv)
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      intermediate_size=args.intermediate, num_attention_heads=args.heads,
                                      vocab_size=args.vocab)
    print(f"Llama shape: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab "
          f"{args.vocab}; bf16, device='cuda', batch 1 x {args.seq} unless stated")
    print("| step | peak | params | grads | optimizer | activations | other | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw in ROWS:
        kw = dict(kw)
        t0 = time.perf_counter()
        est = memopt.estimate(config, batch_size=kw.pop("batch_size", 1), seq_len=kw.pop("seq_len", args.seq),
                              dtype="bfloat16", **kw)
        b = est.breakdown
        kv = f" (KV cache {format_bytes(est.kv_cache_bytes)})" if est.kv_cache_bytes else ""
        print(f"| {name}{kv} | {format_bytes(est.peak_bytes)} | {format_bytes(b['params'])} | "
              f"{format_bytes(b['grads'])} | {format_bytes(b['optimizer'])} | {format_bytes(b['activations'])} | "
              f"{format_bytes(b['other'])} | {time.perf_counter() - t0:.0f} s |", flush=True)
    if not args.no_plan:
        print(memopt.plan(config, "24GiB", seq_len=args.seq, dtype="bfloat16"))
        print(memopt.plan(config, "80GiB", seq_len=args.seq, dtype="bfloat16", allow_lora=False))


if __name__ == "__main__":
    main()
