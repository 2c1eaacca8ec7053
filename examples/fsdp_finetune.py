"""The causal-LM fine-tune of finetune_causal_lm.py on several processes: memopt.apply, then FSDP2 `fully_shard` of
each block and of the root, so each rank holds 1/world of the parameters, gradients and optimizer state.

    torchrun --nproc-per-node 2 examples/fsdp_finetune.py                       # gloo on CPU, NCCL on GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/fsdp_finetune.py   # the same under accelerate (CPU too)
    torchrun --nproc-per-node 2 examples/fsdp_finetune.py --check               # also train unsharded, compare

--batch-size is the global batch, split evenly over the ranks, so the losses are those of a single-process run on
the same batches (fp32 rounding apart: the ranks' gradients are summed in a different order); --check trains an
unsharded copy of the model in rank 0's process on the same global batches and prints the largest loss difference.
(Without --multi_gpu, accelerate launch starts a single process.)
Every rank tracks its run with `memopt.track`. At the end rank 0 prints the loss of every step, a per-rank table
(peak, and the parameter, gradient and optimizer bytes each rank holds: they fall as 1/world), and rank 0's
per-block memory report. --precision bf16-mixed runs the forward under torch.autocast (float32 shards, bf16
compute), as `memopt.estimate(precision="bf16-mixed", world_size=N)` assumes; "16-mixed" would need FSDP's
ShardedGradScaler and is refused.
"""

from __future__ import annotations

import copy
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import memopt
from _data import load_corpus, random_batch
from finetune_causal_lm import DTYPES, block_depth, build_model, check_args, cosine_schedule, parser, train_step
from memopt._units import format_bytes
from memopt.precision import precision_config


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from the launcher's environment (torchrun, accelerate launch); without a
    launcher, a group of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def blocks_of(model: nn.Module) -> list[str]:
    """FQNs of the blocks to shard one by one: those memopt checkpoints, else the first ModuleList's children."""
    found = list(memopt.applied(model).touched("checkpoint"))
    if found:
        return found
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return [f"{name}.{i}" for i in range(len(module))]
    raise ValueError(f"no repeated blocks found in {type(model).__name__} to shard; pass --checkpoint full so that "
                     "memopt finds them")


def local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors`: a DTensor's local shard, each storage once (FSDP2's gradients of one
    block are views of one reduce-scatter buffer)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        st = t.untyped_storage()
        seen[id(st) if st.data_ptr() == 0 else st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter (and buffer), gradient and optimizer-state bytes on this rank, measured now."""
    params = [p for p in model.parameters()] + list(model.buffers())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"params": local_bytes(params), "grads": local_bytes(grads), "optimizer": local_bytes(state)}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], quant=False, device=False)  # each rank's GPU, or the CPU
    p.set_defaults(steps=50)
    p.add_argument("--check", action="store_true",
                   help="also train an unsharded copy on rank 0 (one process, same global batches) and compare losses")
    args = p.parse_args(argv)
    check_args(p, args)
    precision = precision_config(args.precision)
    if precision.grad_scaler:
        p.error("--precision 16-mixed needs FSDP's ShardedGradScaler, which this example does not wire in; use "
                "bf16-mixed")
    rank, world, device = init_distributed()
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} (the global batch) must be a multiple of the {world} processes")

    if rank == 0:
        corpus = load_corpus(args.vocab_size, args.max_files, args.cache_dir)  # builds the cache once
    dist.barrier()
    if rank != 0:
        corpus = load_corpus(args.vocab_size, args.max_files, args.cache_dir, quiet=True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank, before sharding
    try:
        model = build_model(args.model_config, corpus.vocab_size, args.seq_len, DTYPES[args.dtype], device).train()
        memopt.apply(model, checkpoint=args.checkpoint, attention=None if args.attention == "none" else "sdpa",
                     lora=args.lora or None)
        blocks = blocks_of(model)
    except ValueError as exc:
        p.error(str(exc))
    reference = copy.deepcopy(model) if args.check and rank == 0 else None

    mesh = init_device_mesh(device.type, (world,))
    for fqn in blocks:
        fully_shard(model.get_submodule(fqn), mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embedding, final norm, head
    optimizer = memopt.optimizer(model, "adamw", lr=args.lr)
    scheduler = cosine_schedule(optimizer, args.steps)

    g = torch.Generator().manual_seed(args.seed)
    per_rank = args.batch_size // world
    losses = []
    with memopt.track(model, optimizer) as tracker:
        for _ in range(args.steps):
            ids = random_batch(corpus.train, args.batch_size, args.seq_len, g)  # (global batch, seq), same on all ranks
            mine = ids[rank * per_rank : (rank + 1) * per_rank].to(device)
            optimizer.zero_grad(set_to_none=True)  # first: the last step's gradients stay to be measured
            with precision.autocast(device.type):
                loss = model(input_ids=mine, labels=mine).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            loss = loss.detach()
            dist.all_reduce(loss)  # sum of the ranks' means (gloo has no AVG)
            losses.append(loss.item() / world)
    report = tracker.report()
    held = resident(model, optimizer)

    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "peak": report.peak_bytes, **held,
                                  "tracker_grads": report.total("grad_bytes")})
    if rank == 0:
        print(corpus)
        print(f"{world} process(es), {dist.get_backend()}, FSDP2 fully_shard of {len(blocks)} blocks and the root; "
              f"global batch {args.batch_size} x seq {args.seq_len} ({per_rank} per rank), {args.steps} steps")
        print("\n" + str(memopt.applied(model)))
        print("\n| step | loss |")
        print("|---:|---:|")
        for i, loss in enumerate(losses):
            print(f"| {i + 1} | {loss:.6f} |")
        k = min(10, max(1, len(losses) // 2))
        print(f"\ntraining loss: {statistics.fmean(losses[:k]):.4f} (mean of the first {k} steps) -> "
              f"{statistics.fmean(losses[-k:]):.4f} (last {k})")
        print("\nper rank (memopt.track peak; parameters, gradients and optimizer state as held by the rank):")
        print("| rank | peak | params | grads | optimizer | params+grads+optimizer |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            total = r["params"] + r["grads"] + r["optimizer"]
            print(f"| {r['rank']} | {format_bytes(r['peak'])} | {format_bytes(r['params'])} | {format_bytes(r['grads'])} "
                  f"| {format_bytes(r['optimizer'])} | {format_bytes(total)} |")
        print(f"per-rank params+grads+optimizer bytes: {rows[0]['params'] + rows[0]['grads'] + rows[0]['optimizer']}")
        print("\nrank 0's memory (memopt.track), one row per block:\n")
        print(report.table(depth=block_depth(model)))
        if rows[0]["tracker_grads"] != rows[0]["grads"]:
            print(f"note: the grad column sums each parameter's gradient storage ({rows[0]['tracker_grads']} B); "
                  f"FSDP2's gradients of a block share one reduce-scatter buffer, {rows[0]['grads']} B in all")
    if reference is not None:
        ref_losses = train_reference(reference, corpus, args)
        diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        print(f"\nunsharded single-process run on the same global batches: loss {ref_losses[0]:.6f} -> "
              f"{ref_losses[-1]:.6f}; largest loss difference from the {world}-process run: {diff:.2e}")
    dist.barrier()
    dist.destroy_process_group()


def train_reference(model: nn.Module, corpus, args) -> list[float]:
    """The same training, unsharded, in this process, on the whole global batch."""
    optimizer = memopt.optimizer(model, "adamw", lr=args.lr)
    scheduler = cosine_schedule(optimizer, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    device = next(model.parameters()).device
    return [train_step(model, optimizer, random_batch(corpus.train, args.batch_size, args.seq_len, g).to(device),
                       scheduler, clip=1.0, precision=precision_config(args.precision)).item()
            for _ in range(args.steps)]


if __name__ == "__main__":
    main()
