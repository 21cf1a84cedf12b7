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

Under ``no_grad`` on CPU an NCHW map of at least 28² positions (or at most 8 channels) is padded
by the compiled kernel of :mod:`masktrain.layer_masking.padding_kernels`: all rounds for one
``(h, w)`` plane while it is in cache, one pass per round, parallel over planes with torch's
thread count; it gives the same bits as the torch shifted-add path, which runs when numba cannot
compile (one warning), for channels-last maps (oneDNN's channels-last depthwise conv is fast) and
for small maps (the depthwise conv).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from masktrain.layer_masking.masked import MaskCache
from masktrain.optional_kernels import OptionalKernels, numba_threads_like_torch

KERNELS = OptionalKernels("masktrain.layer_masking.padding_kernels", "masktrain.layer_masking neighbour padding",
                          "the torch padding")

FILL_EPS = 1e-5  # the paper's denominator epsilon; kept so fixture logits match


SEPARABLE_MAX_CHANNELS = 8  # up to this many channels, shifted adds beat the depthwise conv (NCHW, CPU: up to 45x)
# From this many positions per map, shifted adds beat oneDNN's NCHW depthwise 3×3 conv on CPU at any
# channel count (one thread, batch 8: (144, 56²) 3.4 ms vs 43 ms, (96, 112²) 16 ms vs 63 ms,
# (240, 28²) 0.9 ms vs 1.5 ms; at 14² and below the conv is faster).
SHIFTED_MIN_POSITIONS = 28 * 28


def _box_filter(channels: int, like: Tensor) -> Tensor:
    return torch.ones(channels, 1, 3, 3, dtype=like.dtype, device=like.device)


def _box_sum_shifted(a: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """3×3 neighbourhood sums (zero padding) as shifted adds along W, then along H.

    ``rows`` and ``out`` are buffers shaped like ``a`` (``out`` is returned). Six passes over
    contiguous rows, no padded copy: oneDNN's NCHW depthwise convolution is far slower on
    CPU for large maps and for few channels (35 ms against 0.8 ms for ``(8, 3, 224, 224)``).
    """
    torch.add(a[..., 1:], a[..., :-1], out=rows[..., 1:])
    rows[..., :1].copy_(a[..., :1])
    rows[..., :-1] += a[..., 1:]
    torch.add(rows[..., 1:, :], rows[..., :-1, :], out=out[..., 1:, :])
    out[..., :1, :].copy_(rows[..., :1, :])
    out[..., :-1, :] += rows[..., 1:, :]
    return out


def _channels_last(a: Tensor) -> bool:
    return a.dim() == 4 and a.shape[1] > 1 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last)


def _workspace(a: Tensor, cache: Optional[MaskCache]) -> Tuple[Tensor, Tensor]:
    """Two buffers shaped like ``a``: reused within a forward when no autograd graph can hold them."""
    make = lambda: (torch.empty_like(a, memory_format=torch.contiguous_format),  # noqa: E731
                    torch.empty_like(a, memory_format=torch.contiguous_format))
    if cache is None or torch.is_grad_enabled():
        return make()
    return cache.const(("box_workspace", tuple(a.shape), a.dtype, a.device), make)


def box_sum(a: Tensor, cache: Optional[MaskCache] = None) -> Tensor:
    """3×3 neighbourhood sums of ``a`` ``(B, C, h, w)`` per channel, zero padding at the border.

    Under ``no_grad`` the result may be a per-forward buffer that the next ``box_sum`` of the
    same shape overwrites: use it before calling again.
    """
    channels = a.shape[1]
    if channels <= SEPARABLE_MAX_CHANNELS or (
            a.device.type == "cpu" and not _channels_last(a) and a.shape[-2] * a.shape[-1] >= SHIFTED_MIN_POSITIONS):
        return _box_sum_shifted(a, *_workspace(a, cache))
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


def rounds_per_image(mask: Tensor, rounds: int) -> List[int]:
    """For each image, how many of the ``rounds`` padding rounds can change it.

    A round changes nothing in an image that is all visible (before that round) or has no
    visible position at all (its box sums are 0), and an image stays so in later rounds, so
    the count is the number of leading rounds in which the image is partly visible.
    """
    b = mask.shape[0]
    flat = mask.reshape(b, -1)
    visible_any = flat.amax(dim=1) > 0
    m, active = mask, []
    for _ in range(rounds):
        active.append((m.reshape(b, -1).amin(dim=1) == 0) & visible_any)
        m = (m + box_sum(m)).clamp_(0, 1)
    return torch.stack(active).sum(dim=0).tolist()


# Neighbour padding under no_grad on CPU works through the map in chunks of about this many bytes
# (a run of images, or a channel block of one image), all rounds per chunk while it is in cache:
# one thread, batch 8, two rounds on (96, 112²): 23 ms against 42 ms for whole-map passes.
CHUNK_BYTES = 4 << 20


def _chunks(needed: List[int], channels: int, image_bytes: int, shifted: bool):
    """``(images, channels, rounds)`` slices covering the images with ``needed[b] > 0``."""
    b, batch = 0, len(needed)
    while b < batch:
        if needed[b] == 0:
            b += 1
            continue
        if shifted and image_bytes > CHUNK_BYTES:
            block = max(1, channels * CHUNK_BYTES // image_bytes)
            for c0 in range(0, channels, block):
                yield slice(b, b + 1), slice(c0, c0 + block), needed[b]
            b += 1
            continue
        span = max(1, CHUNK_BYTES // image_bytes) if shifted else batch
        end = b
        while end < batch and end - b < span and needed[end] > 0:
            end += 1
        yield slice(b, end), slice(None), max(needed[b:end])
        b = end


def _pad_compiled(a: Tensor, mask: Tensor, rounds: int, needed: List[int], coeffs: List[Tensor], cache: MaskCache,
                  dirty: bool) -> bool:
    """Pad ``a`` in place with the compiled kernel (:mod:`.padding_kernels`); False when it does not apply.

    Called only for the maps the torch path would run as shifted adds (where it gives the same bits; on
    smaller maps torch's depthwise conv sums in another order, and oneDNN is fast there anyway), and of
    those it takes the C-contiguous float32/64 ones.
    """
    if a.dtype not in (torch.float32, torch.float64) or not a.is_contiguous() or mask.dtype != a.dtype:
        return False
    kernels = KERNELS.get()
    if kernels is None:
        return False

    def stacked():
        return (torch.stack([c[:, 0] for c in coeffs]).contiguous(), mask[:, 0].contiguous(),
                torch.tensor(needed, dtype=torch.int64))

    c, m, n = cache.get(mask, ("fill_stacked", rounds), stacked)
    try:
        with numba_threads_like_torch():
            kernels.pad_nchw(a.detach().numpy(), m.detach().numpy(), c.detach().numpy(), n.numpy(), dirty)
    except kernels.NumbaError as exc:  # numba compiles on first call; ``a`` is not written before that
        KERNELS.disable(exc)
        return False
    return True


def neighbour_pad(a: Tensor, mask: Tensor, rounds: int, cache: MaskCache, in_place: bool = False,
                  dirty: bool = False) -> Tensor:
    """``a`` ``(B, C, h, w)`` with ``rounds`` rounds of neighbour padding from ``mask`` ``(B, 1, h, w)``.

    ``a`` must be zero where ``mask`` is 0, unless ``dirty``: then it is zeroed there first (in
    every image the padding changes; an image that is all visible or all removed is returned
    as it is, its removed positions are never read by a visible output).
    Gradients flow to the visible entries of ``a`` only (the fills are detached).
    ``in_place``: ``a`` is the caller's own tensor (read by nothing else, saved by no autograd
    node), so it is updated in place instead of copied first.
    """
    if rounds <= 0:
        return a
    if torch.is_grad_enabled() or a.device.type != "cpu":
        coeffs = cache.get(mask, ("fill", rounds), lambda: fill_coefficients(mask, rounds))
        if dirty:
            a, in_place = a * mask, True
        for r, c in enumerate(coeffs):
            with torch.no_grad():  # the fill carries no gradient
                sums = box_sum(a, cache)
            # one fused pass a + c * sums; after the first round ``a`` is our own tensor, which
            # nothing saves for backward (addcmul's gradient for it is the identity), so update it in place
            a = a.addcmul_(sums, c) if r > 0 or in_place else torch.addcmul(a, sums, c)
        return a
    # no_grad on CPU: skip images the padding cannot change (masks grow with every k×k conv, so
    # deep layers are often all visible) and pad the rest chunk by chunk while it is in cache.
    needed = cache.get(mask, ("rounds_per_image", rounds), lambda: rounds_per_image(mask, rounds))
    if max(needed) == 0:
        return a
    coeffs = cache.get(mask, ("fill", rounds), lambda: fill_coefficients(mask, rounds))
    if not in_place:
        a = a.clone()
    batch, channels, h, w = a.shape
    # A channels-last map (ConvNeXt's residual stream, after its permutes) takes oneDNN's fast
    # channels-last depthwise conv: (8, 144, 56, 56) 1.9 ms against 7.8 ms NCHW, one thread.
    shifted = not _channels_last(a) and (channels <= SEPARABLE_MAX_CHANNELS or h * w >= SHIFTED_MIN_POSITIONS)
    if shifted and _pad_compiled(a, mask, rounds, needed, coeffs, cache, dirty):
        return a
    for images, chans, n in _chunks(needed, channels, a[0].numel() * a.element_size(), shifted):
        sub = a[images, chans]
        if dirty:
            sub.mul_(mask[images])
        for c in coeffs[:n]:
            sub.addcmul_(box_sum(sub, cache), c[images])
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
