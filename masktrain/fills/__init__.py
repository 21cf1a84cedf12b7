"""Pixel-space fills: replace removed pixels, batched on the device.

``fill(images, keep, method, **options)`` returns ``images * keep + fill * (1 - keep)``
with ``images`` ``(B, 3, H, W)`` in [0, 1] and ``keep`` ``(B, 1, H, W)``, 1 = visible.
No fill reads removed pixels, so a filled image depends on the visible content and the
mask only (the same guarantee layer masking gives).

Every fill is one :class:`FillSpec` in the registry :data:`FILLS`, one file per fill in
this package. Adding a fill is one file that registers it::

    from masktrain.fills import register_fill, register_colour_fill

    @register_fill("stripes")                        # a dense fill
    def stripes(images, keep, generator=None, mean=IMAGENET_MEAN, period: int = 4) -> Tensor:
        ...                                          # -> (B, 3, H, W); options come from fill(..., period=8)

    @register_colour_fill("red")                     # one colour per sample: (B, 3)
    def red(images, generator=None, mean=IMAGENET_MEAN) -> Tensor: ...

A one-colour fill also gets the box fast path (rectangles are erased in place without a
dense mask, :mod:`masktrain.erase`) and its dense form for free. Random fills draw through
:func:`masktrain.rng.rand` so they accept a ``torch.Generator`` (training) or a per-sample
:class:`masktrain.rng.SampleRandom` (probes). Every fill is also a masking method
(:mod:`masktrain.methods`).
"""
from __future__ import annotations

from masktrain.fills.base import (FILLS, IMAGENET_MEAN, Fill, FillSpec, fill, mean_colour, register_colour_fill,
                                  register_fill)

# One module per fill; importing registers it.
from masktrain.fills import black, grey, mean, random_colour, noise, blur, tile  # noqa: E402,F401
from masktrain.fills import noisy_linear  # noqa: E402,F401

__all__ = ["FILLS", "IMAGENET_MEAN", "Fill", "FillSpec", "fill", "mean_colour", "register_fill", "register_colour_fill"]
