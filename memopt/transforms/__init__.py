"""One module per technique; importing this package registers them all."""

from . import attention, checkpoint, lora, loss, offload, quant  # noqa: F401
