"""`memopt.plan`: the cheapest memopt options whose estimated peak fits a budget."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._units import format_bytes, parse_bytes
from .estimator import Estimate, _plain, estimate


@dataclass(frozen=True)
class _Rung:
    name: str
    options: dict[str, Any]
    optimizer: str
    slowdown: float  # predicted step time over plain sdpa training
    source: str  # where the slowdown comes from
    cuda_only: bool = False
    changes_training: bool = False  # LoRA: only adapters train


# Cheapest first. Slowdowns: measured on the bench model with benchmarks/checkpoint.py (selective 1.03x, every-2
# 1.09x, full 1.21x of no checkpointing); the others as published (bitsandbytes' 8-bit optimizers run at AdamW's
# speed; QLoRA-style 4-bit + LoRA about 1.3-1.5x a 16-bit LoRA step on GPUs) and marked as such.
LADDER = (
    _Rung("sdpa", {}, "adamw", 1.00, "baseline"),
    _Rung("selective checkpointing", {"checkpoint": "selective"}, "adamw", 1.03, "measured, benchmarks/checkpoint.py"),
    _Rung("selective checkpointing + 8-bit AdamW", {"checkpoint": "selective"}, "adamw8bit", 1.04,
          "checkpointing measured; 8-bit AdamW ~1.0x (bitsandbytes)"),
    _Rung("every-2 checkpointing + 8-bit AdamW", {"checkpoint": 2}, "adamw8bit", 1.10, "measured + published"),
    _Rung("full checkpointing + 8-bit AdamW", {"checkpoint": "full"}, "adamw8bit", 1.22, "measured + published"),
    _Rung("full checkpointing with CPU offload + 8-bit AdamW", {"checkpoint": "offload"}, "adamw8bit", 1.30,
          "assumed: host copies overlap poorly on small models", cuda_only=True),
    _Rung("8-bit weights + LoRA r16 + full checkpointing", {"checkpoint": "full", "quant": "8bit", "lora": 16},
          "adamw", 1.60, "published (LLM.int8 matmuls are slower than 16-bit ones)", changes_training=True),
    _Rung("4-bit NF4 + LoRA r16 + full checkpointing (QLoRA)", {"checkpoint": "full", "quant": "4bit", "lora": 16},
          "adamw", 1.40, "published (QLoRA)", changes_training=True),
)


@dataclass
class Plan:
    """What `memopt.plan` chose. ``memopt.apply(model, **plan.options)`` and ``memopt.optimizer(model,
    plan.optimizer)`` apply it.

    Attributes:
        fits: whether any rung fit the budget; when not, ``options`` is the rung with the smallest peak and
            ``needed_bytes`` the smallest budget that would do.
        name, options, optimizer, estimate, slowdown (predicted step time over plain SDPA training, with
            ``slowdown_source``), tried: ``[(rung name, peak bytes, fits)]`` in the order searched.
    """

    fits: bool
    budget_bytes: int
    name: str
    options: dict[str, Any]
    optimizer: str
    estimate: Estimate
    slowdown: float
    slowdown_source: str
    needed_bytes: int
    changes_training: bool
    tried: list[tuple[str, int, bool]]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimate"] = {k: v for k, v in self.estimate.to_dict().items() if k != "report"}
        d["options"] = {k: _plain(v) for k, v in self.options.items()}
        return d

    def __str__(self) -> str:
        lines = [f"budget {format_bytes(self.budget_bytes)}:"]
        for name, peak, ok in self.tried:
            lines.append(f"  {'fits ' if ok else 'over '} {format_bytes(peak):>11}  {name}")
        if self.fits:
            opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
            lines.append(f"plan: {self.name}: peak {format_bytes(self.estimate.peak_bytes)}, predicted step time "
                         f"{self.slowdown:.2f}x ({self.slowdown_source})")
            lines.append(f"  memopt.apply(model{', ' + opts if opts else ''}); memopt.optimizer(model, "
                         f"{self.optimizer!r})")
            if self.changes_training:
                lines.append("  note: with LoRA only the adapters train (a different fine-tune than a full one)")
        else:
            lines.append(f"nothing fits: the smallest peak is {format_bytes(self.needed_bytes)} ({self.name}); "
                         f"that is the smallest budget that would do, or lower batch_size/seq_len")
        return "\n".join(lines)


def plan(model: Any, budget: Any = "24GiB", *, batch_size: int = 1, seq_len: int = 512, device: str = "cuda",
         allow_lora: bool = True, mode: str = "train", **kwargs: Any) -> Plan:
    """The cheapest way to make a training step fit `budget`: estimates the rungs of `LADDER` in order of compute
    cost (sdpa; selective checkpointing; 8-bit AdamW; every-2 and full checkpointing; offload (CUDA); 8-bit weights +
    LoRA; 4-bit + LoRA) and returns the first that fits, with its predicted peak and slowdown.

    Args:
        model, batch_size, seq_len, device, **kwargs: as `memopt.estimate` (dtype, world_size, inputs, blocks).
        budget: device memory, e.g. ``"24GiB"``, ``"80GB"`` or bytes.
        allow_lora: also consider the rungs that quantize the weights and train LoRA adapters instead (they change
            what is trained).

        mode: ``"generate"``: how many sequences of `seq_len` fit, and with which KV cache, weights and vLLM
            settings (`memopt.estimation.generate.plan_generate`: new_tokens=, sequences=, kv_caches=,
            allow_quant=, kv_heads=, page_size=, device_memory=); returns a `GeneratePlan`.

    Cost: one `memopt.estimate` per rung tried (it stops at the first that fits).
    """
    if mode == "generate":  # generation: memopt/estimation/generate.py
        from .generate import plan_generate

        return plan_generate(model, budget, seq_len=seq_len, device=device, **kwargs)
    if mode != "train":
        raise ValueError(f"mode={mode!r} is not supported; use 'train' or 'generate'")
    budget_bytes = parse_bytes(budget)
    for key in ("checkpoint", "quant", "lora", "optimizer"):
        if key in kwargs:
            raise ValueError(f"plan(..., {key}=...) is chosen by the plan; pass the other estimate options only")
    tried: list[tuple[str, int, bool]] = []
    best: tuple[_Rung, Estimate] | None = None
    for rung in LADDER:
        if (rung.cuda_only and device != "cuda") or (rung.changes_training and not allow_lora):
            continue
        est = estimate(model, batch_size=batch_size, seq_len=seq_len, device=device, optimizer=rung.optimizer,
                       **rung.options, **kwargs)
        ok = est.peak_bytes <= budget_bytes
        tried.append((rung.name, est.peak_bytes, ok))
        if best is None or est.peak_bytes < best[1].peak_bytes:
            best = (rung, est)
        if ok:
            return Plan(True, budget_bytes, rung.name, dict(rung.options), rung.optimizer, est, rung.slowdown,
                        rung.source, est.peak_bytes, rung.changes_training, tried)
    rung, est = best
    return Plan(False, budget_bytes, rung.name, dict(rung.options), rung.optimizer, est, rung.slowdown, rung.source,
                est.peak_bytes, rung.changes_training, tried)
