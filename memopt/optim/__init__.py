"""memopt.optimizer: an optimizer over the trainable parameters only, with small state and the step in backward
where asked.

    registry.py     the optimizers memopt knows, each with its state size and layout (read by the estimator)
    in_backward.py  the optimizer step fused into backward (gradients freed as soon as they are applied)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .in_backward import InBackwardOptimizer, owner_of
from .registry import OPTIMIZERS, OptimizerSpec, spec_for


def optimizer(model: nn.Module, name: str = "adamw", *, in_backward: bool = False, cpu_offload: bool = False,
              **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer over `model`'s trainable parameters only (frozen and quantized weights get no state).

    State per trainable parameter, measured on a small fp32 Llama (hidden 256, 2 layers, vocab 512: 2.4M
    parameters; tests/test_optim.py checks each layout byte for byte against the real optimizer; exact layouts in
    ``memopt.optim.OPTIMIZERS[name].state_layout``):

    ====================== =========== ===========================================================================
    name                   bytes/param what
    ====================== =========== ===========================================================================
    ``"adamw"``            8.00        torch AdamW: two moments in the parameter's dtype (4 for bf16 parameters)
    ``"adamw8bit"``        2.04        bitsandbytes AdamW8bit: two uint8 moments + an fp32 absmax per 256 values
                                       (2.03 for large tensors); tensors under ``min_8bit_size`` (4096) keep fp32
    ``"paged_adamw8bit"``  2.04        the same in CUDA unified memory, paged to the host under pressure; CUDA only
    ``"adamw4bit"``        1.07        torchao AdamW4bit: 4-bit moments + an fp32 scale per 128 values (1.06 for
                                       large tensors); needs ``memopt[optim]``; ``bf16_stochastic_round=True`` for
                                       bf16 weights updated in place
    ``"adafactor"``        0.03        torch.optim.Adafactor: factored second moment (one value per row and per
                                       column), no first moment; default lr 1e-2, its updates differ from Adam's
    ``"sgd"``              0           torch SGD (4 with momentum)
    ====================== =========== ===========================================================================

    Args:
        model: the model, after `memopt.apply`.
        name: one of the names above.
        in_backward: update each parameter as soon as its gradient is accumulated in backward and free the
            gradient right after: gradient memory falls from the trainable parameters' size to a few parameters'
            worth (the step's peak loses up to 1x the trainable bytes), for every name above. Same updates as the
            ordinary optimizer. ``step()`` and ``zero_grad()`` keep working and do no update; LR schedulers,
            ``state_dict()``/``load_state_dict()``, checkpointing (the hooks fire in the recompute's backward),
            LoRA, FSDP2 and transformers' ``Trainer`` (``optimizers=(opt, None)``, with ``max_grad_norm=0``) work.
            Refused, with an error where they happen: gradient accumulation (a second backward before ``step()``)
            and ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` over these parameters (there is no
            global norm once gradients are applied one at a time). Time: one optimizer call per parameter.
        cpu_offload: keep the optimizer state (and the fp32 update) in host memory and step on the CPU, with
            torchao's ``CPUOffloadOptimizer`` (needs ``memopt[optim]``): GPU memory loses the whole state
            (8 bytes per parameter for AdamW), for a device-to-host copy of each gradient and a host-to-device copy
            of each parameter per step, and the CPU's AdamW time. With ``in_backward=True`` the gradients move to
            the host during backward and are freed on the GPU as they go (the update itself runs in ``step()``).
            CUDA only: a CPU model's state is in host memory already (ValueError).
        **kwargs: passed to the optimizer (lr, weight_decay, betas, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.optimizer expects an nn.Module, got {type(model).__name__}")
    spec = spec_for(name)
    for flag, value in (("in_backward", in_backward), ("cpu_offload", cpu_offload)):
        if not isinstance(value, bool):
            raise TypeError(f"memopt.optimizer({flag}={value!r}) must be True or False")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: quantized weights are frozen; add lora=r to train")
    if spec.cuda_only and not all(p.is_cuda for p in params):
        raise ValueError(
            f"optimizer={name!r} pages its state through CUDA unified memory, so it needs the parameters on a CUDA "
            "device; on CPU use 'adamw8bit'"
        )
    owned = next((owner_of(p) for p in params if owner_of(p) is not None), None)
    if owned is not None:
        raise ValueError(
            f"the model's parameters are already updated in backward by {owned!r}; call .remove() on it before "
            "building another optimizer over them"
        )
    kwargs = {**spec.defaults, **kwargs}
    if cpu_offload:
        return _cpu_offloaded(spec, params, in_backward, kwargs)
    spec.require()
    cls = spec.load()
    if in_backward:
        return InBackwardOptimizer(params, lambda ps: cls(ps, **kwargs), name=name)
    return cls(params, **kwargs)


def _cpu_offloaded(spec: OptimizerSpec, params: list, in_backward: bool, kwargs: dict) -> torch.optim.Optimizer:
    devices = sorted({p.device.type for p in params})
    if devices != ["cuda"]:
        raise ValueError(
            f"memopt.optimizer(cpu_offload=True) moves the optimizer state from a CUDA device to host memory; this "
            f"model's trainable parameters are on {devices}, where the state is in host memory already: drop "
            "cpu_offload=True (or move the model to CUDA first)"
        )
    if spec.cuda_only:
        raise ValueError(f"cpu_offload=True with optimizer={spec.name!r}: it already pages its state to the host; "
                         "use 'adamw8bit' or 'adamw' with cpu_offload=True")
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ImportError('memopt.optimizer(cpu_offload=True) uses torchao\'s CPUOffloadOptimizer, and torchao is not '
                          'installed: pip install "memopt[optim]" (or pip install torchao)')
    spec.require()
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, spec.load(), offload_gradients=in_backward, **kwargs)


__all__ = ["optimizer", "InBackwardOptimizer", "OPTIMIZERS", "OptimizerSpec", "owner_of"]
