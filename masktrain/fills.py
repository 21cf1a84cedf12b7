"""Colour fills: replace removed pixels in pixel space, batched on the device.

``fill(images, keep, method)`` returns ``images * keep + colour * (1 - keep)``.
No fill reads removed pixels, so a filled image depends on the visible content and
the mask only (the same guarantee layer masking gives).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from masktrain.erase import erase_
from masktrain.errors import UserError
from masktrain.masks import BoxKeep
from masktrain.tile_fill import tile

IMAGENET_MEAN = (0.485, 0.456, 0.406)

FillFn = Callable[..., Tensor]
FILLS: dict[str, FillFn] = {}


def register_fill(name: str) -> Callable[[FillFn], FillFn]:
    def decorate(fn: FillFn) -> FillFn:
        FILLS[name] = fn
        return fn

    return decorate


def _mean_colour(images: Tensor, mean: Sequence[float]) -> Tensor:
    return torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)


ColourFn = Callable[..., Tensor]
# Fills that put one colour per sample into the hole: ``colour(images, generator, mean) -> (B, C)``.
# These can erase boxes directly (masktrain.erase) without a dense keep mask.
COLOUR_FILLS: dict[str, ColourFn] = {}


def register_colour_fill(name: str) -> Callable[[ColourFn], ColourFn]:
    """Register ``colour(images, generator, mean) -> (B, C)`` as the fill ``name`` too."""

    def decorate(colour: ColourFn) -> ColourFn:
        COLOUR_FILLS[name] = colour

        def dense(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
            return colour(images, generator, mean)[..., None, None].expand_as(images)

        dense.__doc__ = colour.__doc__
        FILLS[name] = dense
        return colour

    return decorate


@register_colour_fill("black")
def black(images: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    return images.new_zeros(images.shape[:2])


@register_colour_fill("grey")
def grey(images: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """The dataset mean colour."""
    return _mean_colour(images, mean).view(1, -1).expand(images.shape[:2])


@register_fill("mean")
def per_image_mean(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """Each image's mean colour over its visible pixels (dataset mean if none is visible)."""
    visible = keep.sum(dim=(2, 3), keepdim=True)
    colour = (images * keep).sum(dim=(2, 3), keepdim=True) / visible.clamp_min(1)
    colour = torch.where(visible > 0, colour, _mean_colour(images, mean))
    return colour.expand_as(images)


@register_colour_fill("random_colour")
def random_colour(images: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """One uniform random colour per image."""
    return torch.rand(images.shape[:2], generator=generator, device=images.device, dtype=images.dtype)


@register_fill("noise")
def noise(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """Independent uniform noise per pixel and channel."""
    return torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)


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
    return torch.where(den > 1e-4, colour, _mean_colour(images, mean).expand_as(images))


register_fill("tile")(tile)  # masktrain.tile_fill: tiles of the image's own visible background


def fill(
    images: Tensor,
    keep: "Tensor | BoxKeep",
    method: str,
    generator: torch.Generator | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    inplace: bool = False,
) -> Tensor:
    """Fill removed pixels of ``images`` ``(B, 3, H, W)`` where ``keep`` ``(B, 1, H, W)`` is 0.

    Returns a ``(B, 3, H, W)`` tensor; visible pixels are returned unchanged. With
    ``inplace=True`` ``images`` itself is overwritten and returned: on the training path
    this avoids allocating a new batch, which dominates the cost at 224².

    ``keep`` may be a :class:`~masktrain.masks.BoxKeep`: a one-colour fill then writes the
    boxes' pixels only (the same result, without reading or writing the rest of the batch).
    """
    if method not in FILLS:
        raise UserError(f"fill {method!r} is unknown; choose one of {sorted(FILLS)}")
    if isinstance(keep, BoxKeep):
        if method in COLOUR_FILLS:
            target = images if inplace else images.clone()
            return erase_(target, keep.boxes, COLOUR_FILLS[method](images, generator, mean))
        keep = keep.dense(images.dtype)
    colour = FILLS[method](images, keep, generator=generator, mean=mean)
    return torch.where(keep.bool(), images, colour, out=images if inplace else None)


class Fill:
    """Transform-class wrapper of :func:`fill`, e.g. ``Fill("grey")(images, keep)``."""

    def __init__(self, method: str, mean: Sequence[float] = IMAGENET_MEAN) -> None:
        if method not in FILLS:
            raise UserError(f"fill {method!r} is unknown; choose one of {sorted(FILLS)}")
        self.method, self.mean = method, tuple(mean)

    def __call__(self, images: Tensor, keep: Tensor, generator: torch.Generator | None = None, inplace: bool = False) -> Tensor:
        return fill(images, keep, self.method, generator, self.mean, inplace)
