"""``tile``: removed pixels take the values of tiles of the image's own visible background.

IN-9's ``only_bg_t`` (Xiao et al., 2020) and Hard ImageNet fill an object's bounding box
with copies of background from elsewhere in the same image, so the hole holds natural
image statistics of that image instead of a colour. Here, for every image:

1. the bounding box of the removed region is found (rows / columns with a removed pixel);
2. the four strips outside that box -- above, below, left of and right of it, each
   spanning the whole image in the other direction -- hold visible pixels only, by
   construction; the strip with the largest area is chosen (first of top, bottom, left,
   right on ties);
3. the box is tiled with that strip, periodically along the strip's short direction:
   a removed pixel ``(y, x)`` takes the strip pixel ``(top_strip_row((y - y0) mod t), x)``
   for a top strip of ``t`` rows, and likewise for the others, so the tile starts at the
   box's own edge.

When the removed region touches all four sides (no strip exists, e.g. a background removed
around an object), the image's mean visible colour fills it (the dataset mean when nothing
is visible), as :func:`masktrain.fills.mean.per_image_mean` does.

The fill never reads a removed pixel (every source lies in a strip outside the removed
region's box), and it is one batched gather: no per-sample Python loop.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from masktrain.fills.base import IMAGENET_MEAN, mean_colour, register_fill


def _extent(removed_any: Tensor) -> tuple[Tensor, Tensor]:
    """First and one-past-last index where ``removed_any`` ``(B, N)`` is true; (0, 0) when never."""
    n = removed_any.shape[1]
    idx = torch.arange(n, device=removed_any.device)
    has = removed_any.any(dim=1)
    first = torch.where(removed_any, idx, n).amin(dim=1)
    last = torch.where(removed_any, idx, -1).amax(dim=1) + 1
    return torch.where(has, first, 0), torch.where(has, last, 0)


@register_fill("tile")
def tile(images: Tensor, keep: Tensor, generator: torch.Generator | None = None,
         mean: Sequence[float] = IMAGENET_MEAN) -> Tensor:
    """Fill values ``(B, 3, H, W)`` for removed pixels of ``images`` ``(B, 3, H, W)`` where
    ``keep`` ``(B, 1, H, W)`` is 0 (1 = visible); deterministic, ``generator`` is unused.

    Values at visible positions are tiles too (every value comes from a visible pixel of the
    same image); :func:`masktrain.fills.fill` keeps the visible pixels themselves.
    """
    B, C, H, W = images.shape
    removed = keep[:, 0] < 0.5  # (B, H, W)
    y0, y1 = _extent(removed.any(dim=2))
    x0, x1 = _extent(removed.any(dim=1))
    # Strip sizes: rows above / below the box, columns left / right of it.
    sizes = torch.stack([y0, H - y1, x0, W - x1], dim=1)  # (B, 4)
    areas = sizes * torch.tensor([W, W, H, H], device=images.device)
    choice = areas.argmax(dim=1)  # first maximum: top, bottom, left, right
    size = sizes.gather(1, choice[:, None])[:, 0]
    has_strip = size > 0
    period = size.clamp_min(1)

    # The source row depends on (b, y) only and the source column on (b, x) only, so the gather
    # index is one broadcast sum of two small tables. Every source lies in the chosen strip, which
    # spans the image and holds visible pixels only -- for visible positions too, so no position
    # ever reads a removed pixel (fill() keeps the visible ones anyway).
    ys = torch.arange(H, device=images.device)[None]  # (1, H)
    xs = torch.arange(W, device=images.device)[None]  # (1, W)
    p = period[:, None]
    c = choice[:, None]
    row_from = torch.where(c == 0, 0, y1[:, None]) + torch.remainder(ys - y0[:, None], p)  # top / bottom strip
    col_from = torch.where(c == 2, 0, x1[:, None]) + torch.remainder(xs - x0[:, None], p)  # left / right strip
    src_y = torch.where(c < 2, row_from, ys).clamp(0, H - 1)  # (B, H)
    src_x = torch.where(c < 2, xs, col_from).clamp(0, W - 1)  # (B, W)
    flat = (src_y[:, :, None] * W + src_x[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    tiled = images.reshape(B, C, H * W).gather(2, flat).view(B, C, H, W)

    visible = keep.sum(dim=(2, 3), keepdim=True)
    colour = torch.where(keep > 0.5, images, 0.0).sum(dim=(2, 3), keepdim=True) / visible.clamp_min(1)
    colour = torch.where(visible > 0, colour, mean_colour(images, mean))
    return torch.where(has_strip.view(B, 1, 1, 1), tiled, colour.expand_as(images))
