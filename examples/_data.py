"""The examples' corpus: the Python standard library's own source files, which every Python install has.

A byte-level BPE is trained on them with the `tokenizers` library, and the token ids are cached on disk
(``~/.cache/memopt`` or ``$XDG_CACHE_HOME/memopt`` by default), so only the first run pays for it (tens of seconds
for the whole library on 2 CPU cores; the second run loads in well under a second). Every 10th file goes to the
validation split: whole files, so validation text was never seen in training.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"
VAL_EVERY = 10  # file i goes to validation when i % VAL_EVERY == VAL_EVERY - 1
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "__pycache__"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memopt"


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's .py files (tests, IDLE and installed packages left out), sorted; with `max_files`, an
    evenly spaced subset of that many."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library path {root}; is this a full Python install?")
    if max_files is not None:
        if max_files < 2 * VAL_EVERY:
            raise ValueError(f"--max-files {max_files} is too few for a validation split; use at least {2 * VAL_EVERY}")
        stride = max(1, len(files) // max_files)
        files = files[::stride][:max_files]
    return files


@dataclass
class Corpus:
    """Token ids of the training and validation files (int64, one EOS token between files) and their tokenizer."""

    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    train: torch.Tensor  # (n_train_tokens,)
    val: torch.Tensor  # (n_val_tokens,)
    files: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __str__(self) -> str:
        return (f"stdlib corpus: {self.files} files, {self.train.numel():,} training and {self.val.numel():,} "
                f"validation tokens, byte-level BPE vocab {self.vocab_size}")


def load_corpus(vocab_size: int = 4096, max_files: int | None = None, cache_dir: str | Path | None = None,
                quiet: bool = False) -> Corpus:
    """Train (or load from the cache) the BPE and the token ids of the standard library's source files.

    Args:
        vocab_size: BPE vocabulary, special token included. The model's embedding and output head are
            vocab x hidden each, so this sets their memory.
        max_files: use an evenly spaced subset of the files (faster first run; the tests use 40).
        cache_dir: where the tokenizer and ids are kept; keyed by Python version, file list and vocab size.
        quiet: do not say when the cache is being built.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = stdlib_files(max_files)
    key = hashlib.sha1(
        repr((sys.version, vocab_size, [(str(p), p.stat().st_size) for p in files])).encode()
    ).hexdigest()[:12]
    cache = Path(cache_dir or default_cache_dir()) / f"stdlib-bpe{vocab_size}-{len(files)}files-{key}"
    if (cache / "ids.pt").is_file():
        ids = torch.load(cache / "ids.pt")
        return Corpus(Tokenizer.from_file(str(cache / "tokenizer.json")), ids["train"], ids["val"], len(files))

    if not quiet:
        print(f"building the tokenizer and token cache in {cache} (once) ...", file=sys.stderr, flush=True)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    train_texts = [t for i, t in enumerate(texts) if i % VAL_EVERY != VAL_EVERY - 1]
    val_texts = [t for i, t in enumerate(texts) if i % VAL_EVERY == VAL_EVERY - 1]
    tokenizer.train_from_iterator(train_texts, trainer)
    eos = tokenizer.token_to_id(EOS)

    def encode(batch: list[str]) -> torch.Tensor:
        out: list[int] = []
        for enc in tokenizer.encode_batch(batch):
            out += enc.ids
            out.append(eos)
        return torch.tensor(out, dtype=torch.int64)

    ids = {"train": encode(train_texts), "val": encode(val_texts)}
    cache.mkdir(parents=True, exist_ok=True)
    # written under temporary names and renamed: concurrent runs (one per FSDP rank) never read half a file
    tmp = f".{os.getpid()}.tmp"
    tokenizer.save(str(cache / ("tokenizer.json" + tmp)))
    torch.save(ids, cache / ("ids.pt" + tmp))
    os.replace(cache / ("tokenizer.json" + tmp), cache / "tokenizer.json")
    os.replace(cache / ("ids.pt" + tmp), cache / "ids.pt")
    return Corpus(tokenizer, ids["train"], ids["val"], len(files))


def random_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len) windows at random offsets of `ids`."""
    if ids.numel() <= seq_len:
        raise ValueError(f"--seq-len {seq_len} is longer than the split ({ids.numel()} tokens); use a shorter "
                         "--seq-len or more --max-files")
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size, 1), generator=generator)
    # gathered, not sliced: a view of the corpus taken while memopt.track runs would count its whole storage
    return ids[starts + torch.arange(seq_len)]


def eval_batches(ids: torch.Tensor, batch_size: int, seq_len: int, n_batches: int) -> list[torch.Tensor]:
    """`n_batches` fixed (batch_size, seq_len) batches of windows spread evenly over `ids` (the same every run)."""
    n = batch_size * n_batches
    if ids.numel() <= seq_len:
        raise ValueError(f"--seq-len {seq_len} is longer than the validation split ({ids.numel()} tokens); use a "
                         "shorter --seq-len or more --max-files")
    starts = torch.linspace(0, ids.numel() - seq_len - 1, n).long().unsqueeze(1)
    return list(ids[starts + torch.arange(seq_len)].split(batch_size))
