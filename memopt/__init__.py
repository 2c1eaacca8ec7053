"""memopt: make PyTorch training fit in memory with one call.

    import memopt
    memopt.apply(model, checkpoint=True)
    print(memopt.applied(model))
    with memopt.track(model, optimizer) as tracker:
        ...one training step...
    print(tracker.report())
"""

from .api import applied, apply, remove
from .config import AttentionConfig, CheckpointConfig, LoraSettings, QuantConfig
from .optim import optimizer
from .tracker import LayerMemory, MemoryReport, compare, track
from .transforms.attention import register_attention

__all__ = [
    "apply", "applied", "remove", "optimizer", "register_attention", "track", "compare",
    "AttentionConfig", "CheckpointConfig", "LoraSettings", "QuantConfig", "MemoryReport", "LayerMemory",
]
__version__ = "0.1.0"
