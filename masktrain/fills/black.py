"""``black``: zeros in the hole."""
from torch import Tensor

from masktrain.fills.base import IMAGENET_MEAN, register_colour_fill


@register_colour_fill("black")
def black(images: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """Black: ``(B, C)`` zeros."""
    return images.new_zeros(images.shape[:2])
