"""A TensorBoard logger beside the JSONL and CSV files (``pip install tensorboard``)."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    """Writes every logged number as a scalar at its ``step`` (``grad_norm/<param>`` too) and, with
    ``grad_logging.histograms: true``, a histogram of each parameter's gradient as ``grad/<param>``."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "the tensorboard logger needs the tensorboard package: pip install 'trainer[tensorboard]' "
                "(or pip install tensorboard), or remove 'tensorboard' from loggers"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, float]) -> None:
        step = int(record["step"])
        for name, value in record.items():
            if name not in ("step", "epoch"):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_histogram(self, name: str, values, step: int) -> None:
        """Called by gradient logging with ``grad_logging.histograms: true``."""
        self.writer.add_histogram(name, values.detach().float().cpu(), step)

    def close(self) -> None:
        self.writer.close()
