"""memopt: make PyTorch training fit in memory with one call.

    import memopt
    memopt.apply(model, checkpoint=True)
    print(memopt.applied(model))
"""

from .api import applied, apply, remove
from .config import AttentionConfig, CheckpointConfig, LoraSettings, QuantConfig
from .optim import optimizer
from .transforms.attention import register_attention

__all__ = [
    "apply", "applied", "remove", "optimizer", "register_attention",
    "AttentionConfig", "CheckpointConfig", "LoraSettings", "QuantConfig",
]
__version__ = "0.1.0"
