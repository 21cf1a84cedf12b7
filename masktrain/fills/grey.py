"""``grey``: the dataset mean colour in the hole."""
from torch import Tensor

from masktrain.fills.base import IMAGENET_MEAN, mean_colour, register_colour_fill


@register_colour_fill("grey")
def grey(images: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """The dataset mean colour, ``(B, C)``."""
    return mean_colour(images, mean).view(1, -1).expand(images.shape[:2])
