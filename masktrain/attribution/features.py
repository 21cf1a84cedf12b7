"""Interpretable features for LIME / KernelSHAP / ablation: a grid of patches or SLIC superpixels.

Each function returns integer feature ids ``(B, 1, H, W)`` (``torch.long``), numbered
``0 .. n_b - 1`` per image, as Captum's ``feature_mask`` expects.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from masktrain.errors import UserError


def grid_features(images: Tensor, patch: int) -> Tensor:
    """Square ``patch x patch`` cells (the last row/column may be smaller), the same for every image."""
    if patch < 1:
        raise UserError(f"attribution patch size must be >= 1 (got {patch}); set probe_options.attribution.patch")
    B, _, H, W = images.shape
    rows = torch.arange(H, device=images.device) // patch
    cols = torch.arange(W, device=images.device) // patch
    ids = rows[:, None] * ((W + patch - 1) // patch) + cols[None, :]
    return ids.view(1, 1, H, W).expand(B, 1, H, W).contiguous()


def slic_features(images: Tensor, n_segments: int = 50, compactness: float = 10.0) -> Tensor:
    """SLIC superpixels (scikit-image) of each image ``(B, 3, H, W)`` in [0, 1], on the CPU.

    Superpixels depend on the image content; that is the point of them, and it is why
    LIME papers use them. One SLIC call per image (scikit-image has no batched SLIC).
    """
    try:
        from skimage.segmentation import slic
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise UserError("superpixel features need scikit-image: pip install scikit-image") from exc
    out = []
    for img in images.detach().float().cpu().permute(0, 2, 3, 1).numpy():
        labels = slic(img.astype(np.float64), n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
        out.append(np.unique(labels, return_inverse=True)[1].reshape(labels.shape))  # ids 0..n-1, no gaps
    return torch.from_numpy(np.stack(out)).long().unsqueeze(1).to(images.device)


FEATURES = {
    "grid": lambda images, patch, n_segments, compactness: grid_features(images, patch),
    "slic": lambda images, patch, n_segments, compactness: slic_features(images, n_segments, compactness),
}


def make_features(images: Tensor, kind: str = "grid", patch: int = 16, n_segments: int = 50, compactness: float = 10.0) -> Tensor:
    """``(B, 1, H, W)`` feature ids of kind ``grid`` (``patch``) or ``slic`` (``n_segments``, ``compactness``)."""
    if kind not in FEATURES:
        raise UserError(f"attribution features {kind!r} are unknown; choose one of {sorted(FEATURES)}")
    return FEATURES[kind](images, patch, n_segments, compactness)
