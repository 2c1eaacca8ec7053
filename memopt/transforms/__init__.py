"""One module per technique; importing this package registers them all."""

from . import attention, checkpoint, quant  # noqa: F401
