"""One module per technique; importing this package registers them all."""

from . import checkpoint  # noqa: F401
