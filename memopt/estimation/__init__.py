"""`memopt.estimate` and `memopt.plan`: will it fit? Answered before renting the GPU, without allocating.

    fake_step.py   the model on fake tensors, bitsandbytes stand-ins, a step's loss
    estimator.py   `estimate`: the real step under FakeTensorMode through `memopt.apply` and the tracker
    planner.py     `plan`: the cheapest options that fit a budget
    generate.py    `estimate(..., mode="generate")`: prefill and decode with the KV cache kind asked for
    kv_cache.py    the KV cache of generation: `KVCacheConfig`, sizes, the transformers cache objects
"""

from .._units import parse_bytes
from .estimator import DEVICES, MODES, OPTIMIZERS, Estimate, dtype_from_name, estimate
from .fake_step import adamw8bit_state_bytes, build_model, load_config, quantized_layout, step_loss
from .generate import GenerateEstimate
from .kv_cache import KVCacheConfig, kv_cache_bytes, kv_cache_config
from .planner import LADDER, Plan, plan

__all__ = ["DEVICES", "LADDER", "MODES", "OPTIMIZERS", "Estimate", "GenerateEstimate", "KVCacheConfig", "Plan", "adamw8bit_state_bytes", "build_model",
           "dtype_from_name", "estimate", "kv_cache_bytes", "kv_cache_config", "load_config", "parse_bytes", "plan", "quantized_layout",
           "step_loss"]
