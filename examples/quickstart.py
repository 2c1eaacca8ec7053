"""memopt in one minute, on CPU: a small Llama-style model, one training step before and after `memopt.apply`.

    python examples/quickstart.py [--checkpoint full|selective|2|offload] [--seq-len 512]

Prints what memopt did to each layer and the step's peak memory before and after, measured by PyTorch's own
MemTracker (parameters, gradients, activations, temporaries).
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers
from torch.distributed._tools.mem_tracker import MemTracker

import memopt
from memopt._units import format_bytes


def peak(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, int], float]:
    """Peak bytes by category of one forward+backward, and the loss."""
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(k).split(".")[-1].lower(): v for k, v in snapshot.items()}, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="full", help="full | selective | offload | N (every N-th block)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    checkpoint = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint

    config = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))

    before, loss_before = peak(copy.deepcopy(model), ids)
    memopt.apply(model, checkpoint=checkpoint)
    after, loss_after = peak(model, ids)

    print(memopt.applied(model))
    print(f"\none training step, batch {args.batch_size} x seq {args.seq_len}, fp32, CPU (PyTorch MemTracker):")
    print(f"{'':14}{'before':>12}{'after':>12}")
    for key in ("param", "grad", "act", "temp", "total"):
        print(f"{key:14}{format_bytes(before[key]):>12}{format_bytes(after[key]):>12}")
    print(f"{'loss':14}{loss_before:>12.4f}{loss_after:>12.4f}")
    print(f"\npeak memory: {after['total'] / before['total']:.2f}x of the unmodified step")


if __name__ == "__main__":
    main()
