"""Image grids of samples and masks, written atomically as PNG."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from masktrain.io_utils import atomic_write


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Save ``images`` ``(N, C, H, W)`` in [0, 1] (C = 1 or 3) as one PNG grid; returns the path."""
    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    return atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def sample_grid(dataset, path: str | os.PathLike, count: int = 32, nrow: int = 8) -> Path:
    """Rows of images with their object masks below them, from the first ``count`` samples."""
    images, masks = [], []
    for i in range(min(count, len(dataset))):
        image, _, mask = dataset[i]
        images.append(image)
        masks.append(mask.expand_as(image))
    rows = []
    for start in range(0, len(images), nrow):
        rows += images[start:start + nrow] + masks[start:start + nrow]
    return save_grid(torch.stack(rows), path, nrow=nrow)
