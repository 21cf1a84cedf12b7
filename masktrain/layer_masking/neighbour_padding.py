"""Neighbour padding and mask pooling, computed from the mask once and applied per channel.

Neighbour padding (one round): every removed position takes the mean of the visible
positions among its 3×3 neighbourhood (centre included, zero padding at the image
border, denominator ``count + 1e-5`` as in the paper's ``fast_fmm``), then becomes
visible for the next round; positions with no visible neighbour stay 0. The fill is
detached (no gradient through it).

A round is linear in the activations with coefficients that depend on the mask only:
``a <- a + c * box3x3(a)`` with ``c = (1 - m) / (box3x3(m) + eps)``, so the coefficients
are computed once per mask (``(B, 1, h, w)``, shared by all channels) and the per-channel
work is one depthwise 3×3 convolution and one multiply-add.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from masktrain.layer_masking.masked import MaskCache

FILL_EPS = 1e-5  # the paper's denominator epsilon; kept so fixture logits match


SEPARABLE_MAX_CHANNELS = 8  # below this, shifted adds beat the depthwise conv (NCHW, CPU: up to 45x)


def _box_filter(channels: int, like: Tensor) -> Tensor:
    return torch.ones(channels, 1, 3, 3, dtype=like.dtype, device=like.device)


def _box_sum_separable(a: Tensor) -> Tensor:
    """3×3 neighbourhood sums (zero padding) as four shifted adds.

    oneDNN's NCHW depthwise convolution is very slow for few channels (the input image,
    the 1-channel masks): 35 ms against 0.8 ms for ``(8, 3, 224, 224)`` on one CPU thread.
    """
    p = F.pad(a, (1, 1, 1, 1))
    rows = p[..., :, :-2] + p[..., :, 1:-1]
    rows += p[..., :, 2:]
    out = rows[..., :-2, :] + rows[..., 1:-1, :]
    out += rows[..., 2:, :]
    return out


def box_sum(a: Tensor, cache: Optional[MaskCache] = None) -> Tensor:
    """3×3 neighbourhood sums of ``a`` ``(B, C, h, w)`` per channel, zero padding at the border."""
    channels = a.shape[1]
    if channels <= SEPARABLE_MAX_CHANNELS:
        return _box_sum_separable(a)
    make = lambda: _box_filter(channels, a)  # noqa: E731
    box = make() if cache is None else cache.const(("box", channels, a.dtype, a.device), make)
    return F.conv2d(a, box, padding=1, groups=channels)


def fill_coefficients(mask: Tensor, rounds: int) -> List[Tensor]:
    """Per-round coefficients ``c_r`` ``(B, 1, h, w)`` for ``rounds`` rounds of padding from ``mask``."""
    coeffs: List[Tensor] = []
    m = mask
    for _ in range(rounds):
        count = box_sum(m)  # exact: small integers
        coeffs.append((1 - m) / (count + FILL_EPS))
        m = (m + count).clamp_(0, 1)
    return coeffs


def neighbour_pad(a: Tensor, mask: Tensor, rounds: int, cache: MaskCache) -> Tensor:
    """``a`` ``(B, C, h, w)`` (zero where ``mask`` is 0) with ``rounds`` rounds of neighbour padding.

    Gradients flow to the visible entries of ``a`` only (the fills are detached).
    """
    if rounds <= 0:
        return a
    coeffs = cache.get(mask, ("fill", rounds), lambda: fill_coefficients(mask, rounds))
    for r, c in enumerate(coeffs):
        with torch.no_grad():  # the fill carries no gradient
            sums = box_sum(a, cache)
        # one fused pass a + c * sums; after the first round ``a`` is our own tensor, which
        # nothing saves for backward (addcmul's gradient for it is the identity), so update it in place
        a = torch.addcmul(a, sums, c) if r == 0 else a.addcmul_(sums, c)
    return a


def rounds_for_kernel(kernel_size: Sequence[int], dilation: Sequence[int]) -> int:
    """Rounds needed before a convolution: the paper uses the kernel width; fewer give the same output.

    Every position of a window that touches a visible pixel lies within ``extent - 1`` of it
    (Chebyshev distance), and filled values never change in later rounds, so
    ``min(k, extent - 1)`` rounds give exactly the paper's k-round result (a 1×1 conv needs none).
    """
    kh, kw = kernel_size
    dh, dw = dilation
    needed = max((kh - 1) * dh, (kw - 1) * dw)
    return min(kw, needed)


def pool_mask(
    mask: Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int] = (1, 1),
    ceil_mode: bool = False,
) -> Tensor:
    """Max-pool a keep mask ``(B, 1, h, w)`` with a layer's geometry: 1 where a window saw a visible pixel."""
    if kernel_size == (1, 1) and padding == (0, 0) and not ceil_mode:
        return mask if stride == (1, 1) else mask[:, :, :: stride[0], :: stride[1]]
    ph, pw = padding
    if ph > kernel_size[0] // 2 or pw > kernel_size[1] // 2:
        # max_pool2d refuses large padding; zero padding is right for a {0, 1} mask.
        mask = F.pad(mask, (pw, pw, ph, ph))
        padding = (0, 0)
    return F.max_pool2d(mask, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
