"""memopt: make PyTorch training fit in memory with one call.

    import memopt
    memopt.apply(model, checkpoint=True)
    print(memopt.applied(model))
"""

from .api import applied, apply, remove
from .config import AttentionConfig, CheckpointConfig, LoraSettings, LossConfig, QuantConfig
from .optim import optimizer
from .transforms.attention import register_attention
from .transforms.loss import chunked_cross_entropy, register_loss

__all__ = [
    "apply", "applied", "remove", "optimizer", "register_attention", "register_loss", "chunked_cross_entropy",
    "AttentionConfig", "CheckpointConfig", "LoraSettings", "LossConfig", "QuantConfig",
]
__version__ = "0.1.0"
