"""``random_colour``: one uniform random colour per image."""
from torch import Tensor

from masktrain import rng
from masktrain.fills.base import IMAGENET_MEAN, register_colour_fill


@register_colour_fill("random_colour")
def random_colour(images: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """One uniform random colour per image, ``(B, C)``."""
    return rng.rand(generator, images.shape[:2], device=images.device, dtype=images.dtype)
