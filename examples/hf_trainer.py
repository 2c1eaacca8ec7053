"""The causal-LM fine-tune of finetune_causal_lm.py with transformers' `Trainer`: memopt.apply on the model, memory
in the training logs with `memopt.integrations.MemoryCallback`.

    python examples/hf_trainer.py                                  # tiny preset, 200 steps, checkpoint=full
    python examples/hf_trainer.py --quant 4bit --lora 16 --optimizer adamw8bit
    python examples/hf_trainer.py --precision bf16-mixed            # TrainingArguments(bf16=True): autocast

The Trainer logs ``memory/peak_MiB`` and ``memory/<category>_MiB`` (params, grads, optimizer, activations,
other, at each interval's peak) beside the loss every --logging-steps; at the end the callback writes
memory_report.json, memory_report.txt and memory.png to --out. It prints what memopt did, the run's memory report
(one row per block), the logged losses and peaks, and the validation loss before and after training.

--precision maps to what Trainer takes: "bf16-mixed" is ``TrainingArguments(bf16=True)`` and "16-mixed"
``fp16=True`` (float32 weights, autocast and, for fp16, a GradScaler, both run by accelerate; on CPU too), the
"-true" ones build the model in that dtype with neither flag.
"""

from __future__ import annotations

import statistics

import torch
import transformers

import memopt
from _data import load_corpus
from finetune_causal_lm import DTYPES, block_depth, build_model, check_args, parser
from memopt.integrations import MemoryCallback

# --precision -> TrainingArguments' flags: the mixed precisions are Trainer's bf16= / fp16= (autocast, GradScaler)
TRAINER_PRECISION = {"32-true": {}, "bf16-true": {}, "16-true": {}, "bf16-mixed": {"bf16": True},
                     "16-mixed": {"fp16": True}}


class Windows(torch.utils.data.Dataset):
    """`n` windows of `seq_len` tokens at random offsets of `ids` (fixed by `seed`), as Trainer batches them:
    ``{"input_ids": (seq_len,), "labels": (seq_len,)}``; the model shifts the labels itself."""

    def __init__(self, ids: torch.Tensor, n: int, seq_len: int, seed: int) -> None:
        if ids.numel() <= seq_len:
            raise ValueError(f"--seq-len {seq_len} is longer than the split ({ids.numel()} tokens); use a shorter "
                             "--seq-len or more --max-files")
        g = torch.Generator().manual_seed(seed)
        self.ids, self.offsets = ids, torch.arange(seq_len)
        self.starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # gathered, not sliced: a view of the corpus taken while MemoryCallback tracks would count its whole storage
        window = self.ids[self.starts[i] + self.offsets]
        return {"input_ids": window, "labels": window}


def main(argv: list[str] | None = None) -> transformers.Trainer:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--logging-steps", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--out", default="runs/hf_trainer", help="Trainer output_dir; the memory report goes here")
    args = p.parse_args(argv)
    check_args(p, args)

    corpus = load_corpus(args.vocab_size, args.max_files, args.cache_dir)
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model_config, corpus.vocab_size, args.seq_len, DTYPES[args.dtype], args.device)
        memopt.apply(model, checkpoint=args.checkpoint, attention=None if args.attention == "none" else "sdpa",
                     quant=None if args.quant == "none" else args.quant, lora=args.lora or None)
        optimizer = memopt.optimizer(model, args.optimizer, lr=args.lr)
    except (ValueError, TypeError, ImportError, NotImplementedError) as exc:
        p.error(str(exc))

    callback = MemoryCallback(plot=True, depth=block_depth(model))
    training_args = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=min(100, max(1, args.steps // 10)), max_grad_norm=1.0,
        logging_steps=args.logging_steps or max(1, args.steps // 10), save_strategy="no", report_to="none",
        use_cpu=args.device.type == "cpu", seed=args.seed, dataloader_num_workers=0,
        **TRAINER_PRECISION[args.precision],
    )  # no gradient_checkpointing=True here: memopt checkpoints the blocks
    trainer = transformers.Trainer(
        model=model, args=training_args,
        train_dataset=Windows(corpus.train, args.steps * args.batch_size, args.seq_len, args.seed),
        eval_dataset=Windows(corpus.val, args.eval_batches * args.batch_size, args.seq_len, args.seed),
        optimizers=(optimizer, None), callbacks=[callback],
    )
    print(corpus)
    print(f"precision: {args.precision} (TrainingArguments {TRAINER_PRECISION[args.precision] or 'defaults'}, "
          f"parameters {args.dtype})")
    val_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    val_after = trainer.evaluate()["eval_loss"]

    depth = block_depth(model)
    print("\n" + str(memopt.applied(model)))
    print(f"\nmemory of the Trainer run (MemoryCallback, {args.out}/memory_report.txt), one row per block:\n")
    print(callback.report.table(depth=depth))
    logs = [h for h in trainer.state.log_history if "loss" in h and "memory/peak_MiB" in h]
    print("\n| step | loss | memory/peak_MiB | activations_MiB | other_MiB |")
    print("|---:|---:|---:|---:|---:|")
    for h in logs:
        print(f"| {h['step']} | {h['loss']:.4f} | {h['memory/peak_MiB']:.2f} | {h['memory/activations_MiB']:.2f} "
              f"| {h['memory/other_MiB']:.2f} |")
    if logs:
        print(f"\ntraining loss: {logs[0]['loss']:.4f} (first log) -> {logs[-1]['loss']:.4f} (last); "
              f"peak {statistics.fmean(h['memory/peak_MiB'] for h in logs):.2f} MiB on average per interval")
    print(f"validation loss: {val_before:.4f} before -> {val_after:.4f} after training")
    print(f"wrote {args.out}/memory_report.json, {args.out}/memory_report.txt, {args.out}/memory.png")
    return trainer


if __name__ == "__main__":
    main()
