"""``noise``: independent uniform noise per pixel and channel."""
from torch import Tensor

from masktrain import rng
from masktrain.fills.base import IMAGENET_MEAN, register_fill


@register_fill("noise")
def noise(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """Independent uniform noise per pixel and channel, ``(B, C, H, W)``."""
    return rng.rand(generator, images.shape, device=images.device, dtype=images.dtype)
