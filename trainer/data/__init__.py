"""Training and evaluation data: batches (``batches``) and the sources that iterate them in a seeded,
resumable order (``sources``, docs/data.md)."""

from trainer.data.batches import batch_size_of, describe, to_device
from trainer.data.sources import DataError

__all__ = ["DataError", "batch_size_of", "describe", "to_device"]
