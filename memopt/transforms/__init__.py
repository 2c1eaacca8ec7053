"""One module per technique; importing this package registers them all."""

from . import attention, checkpoint, kv_heads, lora, loss, offload, quant  # noqa: F401
