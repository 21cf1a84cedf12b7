"""Training callbacks and plugins: atomic checkpoints, masked-sample grids, final metrics."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from masktrain.io_utils import atomic_write
from masktrain.viz import save_grid


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into a temp file beside ``path``, then rename: a kill never leaves a truncated file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes each checkpoint atomically."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)


class MaskedSampleGrid(L.Callback):
    """Each epoch, a grid of masked training samples: a PNG in ``<run>/samples/`` and an image in W&B."""

    def __init__(self, directory: str | os.PathLike, every_n_epochs: int = 1) -> None:
        self.directory = Path(directory)
        self.every_n_epochs = max(1, int(every_n_epochs))

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = getattr(pl_module, "last_masked_batch", None)
        if batch is None or trainer.current_epoch % self.every_n_epochs:
            return
        path = save_grid(batch.float().cpu(), self.directory / f"epoch_{trainer.current_epoch:03d}.png")
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):
                log_image(key="train/masked_samples", images=[str(path)], step=trainer.global_step)
