"""``blur``: a heavy blur of the visible surroundings (normalised convolution)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from masktrain.fills.base import IMAGENET_MEAN, mean_colour, register_fill


def _gaussian_kernel(sigma: float, device, dtype) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _band_matrix(n: int, kernel: Tensor) -> Tensor:
    """``(n, n)`` matrix ``M`` with ``(x @ M)[i] = sum_j kernel[j - i + r] * x[j]``: a zero-padded 1-D convolution."""
    r = kernel.numel() // 2
    i = torch.arange(n, device=kernel.device)
    offset = i[:, None] - i[None, :] + r
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)], kernel.new_zeros(()))


def _separable_blur(x: Tensor, sigma: float) -> Tensor:
    """Zero-padded separable Gaussian blur of ``(B, C, H, W)``, as two matrix products with banded
    matrices: the same sums as a depthwise convolution, 5-7x faster on a CPU (one GEMM per axis)."""
    k = _gaussian_kernel(sigma, x.device, x.dtype)
    H, W = x.shape[-2:]
    return _band_matrix(H, k).T @ (x @ _band_matrix(W, k))


@register_fill("blur")
def blur(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN, sigma_fraction: float = 0.1) -> Tensor:
    """A heavy blur of the *visible* surroundings (normalised convolution), sigma = 10% of the side.

    Blurring the original image would leak the removed content through its low
    frequencies; normalising by the blurred mask fills holes from visible pixels only.
    Where no visible pixel is within reach, the dataset mean colour is used.
    """
    sigma = max(1.0, sigma_fraction * min(images.shape[-2:]))
    num = _separable_blur(images * keep, sigma)
    den = _separable_blur(keep, sigma)
    colour = num / den.clamp_min(1e-6)
    return torch.where(den > 1e-4, colour, mean_colour(images, mean).expand_as(images))
