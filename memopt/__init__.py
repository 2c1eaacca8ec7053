"""memopt: make PyTorch training fit in memory with one call.

    import memopt
    memopt.apply(model, checkpoint=True)
    print(memopt.applied(model))
"""

from .api import applied, apply, remove
from .config import AttentionConfig, CheckpointConfig, QuantConfig
from .transforms.attention import register_attention

__all__ = ["apply", "applied", "remove", "register_attention", "AttentionConfig", "CheckpointConfig", "QuantConfig"]
__version__ = "0.1.0"
