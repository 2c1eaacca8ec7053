"""`memopt.estimate` and `memopt.plan`: will it fit? Answered before renting the GPU, without allocating.

    fake_step.py    the model on fake tensors, bitsandbytes stand-ins, a step's loss and batch
    optimizers.py   the optimizers' state layouts and steps: one entry per optimizer
    profile.py      one fake step, and what adds up to it exactly (the optimizer's part, the depth)
    estimator.py    `estimate`: the real step under FakeTensorMode through `memopt.apply` and the tracker
    planner.py      `plan`: the search space (a registry of dimensions) and the search
    generate.py     `estimate(..., mode="generate")`: prefill and decode with the KV cache kind asked for
    kv_cache.py     the KV cache of generation: `KVCacheConfig`, sizes, the transformers cache objects
"""

from .._units import parse_bytes
from ..precision import PRECISIONS, Precision, dtype_from_name
from .estimator import DEVICES, MODES, Estimate, estimate
from .fake_step import build_model, find_loss, load_config, quantized_layout, step_loss
from .generate import GenerateEstimate
from .kv_cache import KVCacheConfig, kv_cache_bytes, kv_cache_config
from .optimizers import OPTIMIZERS, OptimizerSpec, adamw8bit_state_bytes
from .planner import SEARCH_SPACE, Dimension, Option, Plan, plan, register_option

__all__ = ["DEVICES", "MODES", "OPTIMIZERS", "PRECISIONS", "SEARCH_SPACE", "Dimension", "Estimate",
           "GenerateEstimate", "KVCacheConfig", "Option", "OptimizerSpec", "Plan", "Precision",
           "adamw8bit_state_bytes", "build_model", "dtype_from_name", "estimate", "find_loss", "kv_cache_bytes",
           "kv_cache_config", "load_config", "parse_bytes", "plan", "quantized_layout", "register_option",
           "step_loss"]
