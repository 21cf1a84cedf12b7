"""``mean``: each image's own mean visible colour in the hole."""
import torch
from torch import Tensor

from masktrain.fills.base import IMAGENET_MEAN, mean_colour, register_fill


@register_fill("mean")
def per_image_mean(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN) -> Tensor:
    """Each image's mean colour over its visible pixels (dataset mean if none is visible)."""
    visible = keep.sum(dim=(2, 3), keepdim=True)
    colour = (images * keep).sum(dim=(2, 3), keepdim=True) / visible.clamp_min(1)
    colour = torch.where(visible > 0, colour, mean_colour(images, mean))
    return colour.expand_as(images)
