"""Memory and time of fine-tuning recipes on the Llama-style bench model: full fine-tune, LoRA, 8-bit + LoRA,
4-bit + LoRA (each with AdamW and 8-bit AdamW), and QLoRA built the transformers + peft way.

    python benchmarks/quant.py            # hidden 512, 6 layers, vocab 8000, batch 4, seq 512, fp32, CPU

Per row: parameter bytes (quantized weights with their quantization state), optimizer-state bytes, step peak
(resident bytes + the highest allocation above them during forward, backward and optimizer step, from the PyTorch
profiler's allocation events), median step time, loss after the timed steps.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import memopt  # noqa: E402
from _common import batch, bench_args, llama, machine, profiled_peak_increment, resident_bytes  # noqa: E402
from memopt._units import format_bytes  # noqa: E402


def _memopt(base, quant=None, lora=None, checkpoint=False, dtype=torch.float32):
    def build():
        import copy

        model = copy.deepcopy(base).to(dtype)
        memopt.apply(model, quant=quant, lora=lora, checkpoint=checkpoint)
        return model

    return build


def _hf_qlora(base, tmp: str, dtype=torch.float32):
    """The transformers + peft recipe: BitsAndBytesConfig (QLoRA settings), prepare_model_for_kbit_training
    (gradient checkpointing on, as its default), get_peft_model on all linear layers."""

    def build():
        import peft
        import transformers

        base.save_pretrained(tmp)
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_config, device_map="cpu", dtype=dtype
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.prepare_model_for_kbit_training(model)
        return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

    return build


def main(argv=None):
    parser = bench_args(__doc__.splitlines()[0])
    parser.set_defaults(steps=2)
    args = parser.parse_args(argv)
    base = llama(args)
    inputs = batch(args)
    tmp = tempfile.mkdtemp()
    recipes = {}
    for opt in ("adamw", "adamw8bit"):
        recipes[f"fp32 full fine-tune, {opt}"] = (_memopt(base), opt)
        recipes[f"LoRA r16, {opt}"] = (_memopt(base, lora=16), opt)
        recipes[f"8-bit + LoRA r16, {opt}"] = (_memopt(base, quant="8bit", lora=16), opt)
        recipes[f"4-bit + LoRA r16, {opt}"] = (_memopt(base, quant="4bit", lora=16), opt)
    recipes["memopt 4-bit + LoRA r16 + checkpoint, adamw"] = (_memopt(base, quant="4bit", lora=16, checkpoint=True), "adamw")
    recipes["transformers+peft QLoRA r16 (+GC), adamw"] = (_hf_qlora(base, tmp), "adamw")
    bf16 = torch.bfloat16
    recipes["bf16: memopt 4-bit + LoRA r16 + checkpoint, adamw"] = (
        _memopt(base, quant="4bit", lora=16, checkpoint=True, dtype=bf16), "adamw")
    recipes["bf16: transformers+peft QLoRA r16 (+GC), adamw"] = (_hf_qlora(base, tmp, bf16), "adamw")

    rows = []
    for name, (build, opt_name) in recipes.items():
        model = build().train()
        opt = memopt.optimizer(model, opt_name, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            return loss.item()

        step()  # warm-up; creates the optimizer state
        resident = resident_bytes(model, opt)
        increment = profiled_peak_increment(step)
        times, loss = [], None
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        rows.append((name, resident["params"], resident["optimizer"], resident["params"] + resident["optimizer"] + increment,
                     statistics.median(times), loss))
        print(f"done: {name}", file=sys.stderr)

    print(f"\nFine-tuning recipes: Llama-style h={args.hidden} L={args.layers} vocab={args.vocab} batch={args.batch} "
          f"seq={args.seq}, fp32 unless marked bf16, one optimizer step")
    print(f"machine: {machine(args.device)}; torch {torch.__version__}")
    print("| recipe | params | optimizer state | step peak | step time | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, p, o, peak, t, loss in rows:
        print(f"| {name} | {format_bytes(p)} | {format_bytes(o)} | {format_bytes(peak)} | {t * 1000:.0f} ms | {loss:.4f} |")
    return rows


if __name__ == "__main__":
    main()
