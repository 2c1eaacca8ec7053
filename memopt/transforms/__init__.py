"""One module per technique; importing this package registers them all."""

from . import attention, checkpoint, kv_heads, lora, loss, quant  # noqa: F401
