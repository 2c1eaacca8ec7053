"""memopt: make PyTorch training fit in memory with one call.

    import memopt
    memopt.apply(model, checkpoint=True)
    print(memopt.applied(model))
    with memopt.track(model, optimizer) as tracker:
        ...one training step...
    print(tracker.report())
    print(memopt.estimate("config.json", batch_size=1, seq_len=2048, dtype="bfloat16", checkpoint=True))
"""

from .api import applied, apply, remove
from .config import (AttentionConfig, CheckpointConfig, KVHeadsConfig, LoraSettings, LossConfig, OffloadConfig,
                     QuantConfig)
from .estimation import Estimate, KVCacheConfig, Plan, estimate, plan
from .optim import optimizer
from .tracker import LayerMemory, MemoryReport, compare, track
from .transforms.attention import register_attention
from .transforms.kv_heads import KVLayout, register_kv_heads
from .transforms.loss import chunked_cross_entropy, register_loss

__all__ = [
    "apply", "applied", "remove", "optimizer", "register_attention", "register_loss", "chunked_cross_entropy",
    "track", "compare", "estimate", "plan", "Estimate", "Plan", "KVCacheConfig",
    "AttentionConfig", "CheckpointConfig", "LoraSettings", "LossConfig", "OffloadConfig", "QuantConfig",
    "MemoryReport", "LayerMemory", "KVHeadsConfig", "KVLayout", "register_kv_heads",
]
__version__ = "0.1.0"
