"""transformers architectures with no SDPA attention of their own, through memopt's SDPA (issue 13, item 18).

    python benchmarks/no_sdpa.py --clock cpu      # hidden 512, 6 layers, 8 heads, vocab 8000, batch 4, seq 512, fp32

For each architecture (Llama, which has transformers' SDPA, as the reference; Bloom, GPT-Neo, MPT, Falcon with
ALiBi), one forward+backward: the model as transformers builds it (eager attention), memopt's attention="sdpa"
(the attention modules watched: ALiBi as a float bias, GPT-Neo's where(mask, s, lowest)), and memopt
checkpoint=True with it. Peak by PyTorch's MemTracker on CPU (torch.cuda.max_memory_allocated on CUDA), step time
the median of round-robin steps. What was reported before the change: Bloom's checkpointed peak 0.71x of plain where
the others reached 0.45x (its (batch, heads, seq, seq) matrices stayed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import memopt  # noqa: E402
from _common import bench_args, fresh, machine, run_rows  # noqa: E402
from memopt._units import format_bytes  # noqa: E402


def build(arch: str, args):
    import torch
    import transformers

    h, L, nh, V = args.hidden, args.layers, args.heads, args.vocab
    configs = {
        "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=4 * h,
                                                  num_hidden_layers=L, num_attention_heads=nh,
                                                  max_position_embeddings=args.seq),
        "bloom": lambda: transformers.BloomConfig(vocab_size=V, hidden_size=h, n_layer=L, n_head=nh),
        "gpt_neo": lambda: transformers.GPTNeoConfig(vocab_size=V, hidden_size=h, num_layers=L, num_heads=nh,
                                                     attention_types=[[["global"], L]], max_position_embeddings=args.seq),
        "mpt": lambda: transformers.MptConfig(vocab_size=V, d_model=h, n_layers=L, n_heads=nh, expansion_ratio=4,
                                              max_seq_len=args.seq),
        "falcon_alibi": lambda: transformers.FalconConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L,
                                                          num_attention_heads=nh, alibi=True, multi_query=False,
                                                          new_decoder_architecture=False),
    }
    config = configs[arch]()
    config.use_cache = False
    for key in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embed_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def main(argv=None) -> dict:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["llama", "bloom", "gpt_neo", "mpt", "falcon_alibi"])
    args = parser.parse_args(argv)
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    inputs = {"input_ids": ids, "labels": ids}
    results = {}
    for arch in args.archs:
        base = build(arch, args)
        variants = {
            "eager (transformers)": fresh(base),
            "memopt attention='sdpa'": fresh(base, lambda m: memopt.apply(m)),
            "memopt checkpoint=True": fresh(base, lambda m: memopt.apply(m, checkpoint=True)),
        }
        results[arch] = {r.name: r for r in run_rows(variants, inputs, args)}
    print(f"\nArchitectures without transformers SDPA: h={args.hidden} L={args.layers} heads={args.heads} "
          f"vocab={args.vocab} batch={args.batch} seq={args.seq} fp32, forward+backward")
    clock = " (step time: CPU time of the process, all threads)" if args.clock == "cpu" else ""
    print(f"machine: {machine(args.device)}{clock}")
    print("| architecture | eager peak | sdpa peak | sdpa/eager | checkpoint=True peak | ckpt/eager | eager step | "
          "sdpa step | ckpt step | loss eager | loss sdpa |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch, r in results.items():
        e, s, c = r["eager (transformers)"], r["memopt attention='sdpa'"], r["memopt checkpoint=True"]
        print(f"| {arch} | {format_bytes(e.peak_bytes)} | {format_bytes(s.peak_bytes)} | "
              f"{s.peak_bytes / e.peak_bytes:.2f}x | {format_bytes(c.peak_bytes)} | {c.peak_bytes / e.peak_bytes:.2f}x | "
              f"{e.step_s * 1000:.0f} ms | {s.step_s * 1000:.0f} ms | {c.step_s * 1000:.0f} ms | {e.loss:.4f} | "
              f"{s.loss:.4f} |")
    return results


if __name__ == "__main__":
    main()
