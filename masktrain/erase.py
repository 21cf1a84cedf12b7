"""Erase rectangles in place: the functional core behind rectangle masks with a colour fill.

Like ``torchvision.transforms.v2.functional.erase`` but for a whole batch at once:
``erase_(images, boxes, colour)`` overwrites, for every sample, the pixels inside its
boxes with that sample's colour, and touches nothing else.

Why not a dense ``torch.where`` with the keep mask: at 224² that reads and writes every
pixel of the batch (plus the mask), while random erasing changes about a fifth of them.
timm's ``RandomErasing`` writes only the erased pixels, from a per-image Python loop; a
dense batched fill cannot beat it on a CPU, whatever the loop overhead, because memory
traffic is the cost. On CPU this module therefore runs a small compiled loop (numba)
that writes exactly the erased pixels for the whole batch in one call, with streaming
stores when the batch is larger than the cache (see :mod:`masktrain.erase_kernels`). On other devices,
or where numba is missing, it falls back to the dense fill, which gives the same result.
"""
from __future__ import annotations

import functools
import glob

import torch
from torch import Tensor

from masktrain.errors import check
from masktrain.optional_kernels import OptionalKernels

KERNELS = OptionalKernels("masktrain.erase_kernels", "masktrain.erase", "the dense fill")


def boxes_to_keep(boxes: Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense keep mask ``(B, 1, H, W)`` (1 = visible) from ``boxes`` ``(B, K, 4)`` = (top, left, height, width).

    Separable: a box is (rows inside) ⊗ (columns inside), so no ``(B, K, H, W)`` tensor is built.
    """
    H, W = size
    if boxes.shape[1] == 0:
        return torch.ones(boxes.shape[0], 1, H, W, dtype=dtype, device=boxes.device)
    top, left, h, w = boxes.unbind(-1)
    ys = torch.arange(H, device=boxes.device)
    xs = torch.arange(W, device=boxes.device)
    rows = (ys >= top[..., None]) & (ys < (top + h)[..., None]) & (w > 0)[..., None]  # (B, K, H)
    cols = (xs >= left[..., None]) & (xs < (left + w)[..., None])  # (B, K, W)
    removed = rows[..., :, None] & cols[..., None, :]
    removed = removed[:, :1] if boxes.shape[1] == 1 else removed.any(dim=1, keepdim=True)
    return (~removed).to(dtype)


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs); 32 MiB where it cannot be read."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()  # e.g. "32768K"
            sizes.append(int(text.rstrip("KMG")) * units.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 2**20)


def _streaming_supported() -> bool:
    # Measured only on x86-64, so only used there.
    kernels = KERNELS.get()
    return kernels is not None and kernels.X86


def _streaming(images: Tensor) -> bool:
    # glibc's memset switches to non-temporal stores at 3/4 of the shared cache: a batch that
    # large is not kept in cache for the model anyway.
    return _streaming_supported() and images.nbytes >= 0.75 * last_level_cache_bytes()


def _can_use_kernel(images: Tensor) -> bool:
    return (
        images.device.type == "cpu"
        and images.dtype in (torch.float32, torch.float64)
        and images.is_contiguous()
        and not images.requires_grad
        and KERNELS.get() is not None
    )


def erase_(images: Tensor, boxes: Tensor, colour: Tensor) -> Tensor:
    """Overwrite the pixels inside ``boxes`` with ``colour``, in place; returns ``images``.

    Args:
        images: ``(B, C, H, W)``.
        boxes: ``(B, K, 4)`` integer (top, left, height, width); a box with height or width
            0 removes nothing; boxes are clipped to the image.
        colour: ``(B, C)`` one colour per sample (or ``(C,)`` for all).
    """
    check(images.dim() == 4, f"erase_ needs images (B, C, H, W), got {tuple(images.shape)}")
    B, C = images.shape[:2]
    check(boxes.dim() == 3 and boxes.shape[0] == B and boxes.shape[2] == 4,
          f"boxes must have shape ({B}, K, 4), got {tuple(boxes.shape)}")
    colour = colour.to(device=images.device, dtype=images.dtype).expand(B, C)
    if boxes.shape[1] == 0:
        return images
    if _can_use_kernel(images):
        try:
            KERNELS.module.erase_rows(images.view(-1).numpy(), B, C, images.shape[2], images.shape[3],
                                boxes.to(torch.int64).contiguous().numpy(), colour.contiguous().numpy(), _streaming(images))
        except KERNELS.module.NumbaError as exc:
            # numba compiles on first call: a numba/llvmlite that cannot build the kernel fails
            # here, before anything is written. The dense fill gives the same result.
            KERNELS.disable(exc)
            return erase_(images, boxes, colour)
        # The write bypassed torch: tell autograd, so a graph that saved ``images`` raises as
        # it would after any in-place op instead of silently using the erased values.
        torch.autograd.graph.increment_version(images)
        return images
    keep = boxes_to_keep(boxes.to(images.device), tuple(images.shape[-2:]), torch.bool)
    return torch.where(keep, images, colour[..., None, None], out=images)
