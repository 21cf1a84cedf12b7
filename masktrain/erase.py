"""Erase rectangles in place: the functional core behind rectangle masks with a colour fill.

Like ``torchvision.transforms.v2.functional.erase`` but for a whole batch at once:
``erase_(images, boxes, colour)`` overwrites, for every sample, the pixels inside its
boxes with that sample's colour, and touches nothing else.

Why not a dense ``torch.where`` with the keep mask: at 224² that reads and writes every
pixel of the batch (plus the mask), while random erasing changes about a fifth of them.
timm's ``RandomErasing`` writes only the erased pixels, from a per-image Python loop; a
dense batched fill cannot beat it on a CPU, whatever the loop overhead, because memory
traffic is the cost. On CPU this module therefore runs a small compiled loop (numba)
that writes exactly the erased pixels for the whole batch in one call. On other devices,
or where numba is missing, it falls back to the dense fill, which gives the same result.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from masktrain.errors import check

_KERNEL: Optional[Callable] = None
_KERNEL_FAILED = False


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


def _compile_kernel() -> Optional[Callable]:
    """The numba loop, compiled once per process (cached on disk); None if numba is unavailable."""
    global _KERNEL, _KERNEL_FAILED
    if _KERNEL is not None or _KERNEL_FAILED:
        return _KERNEL
    try:
        import numba

        @numba.njit(cache=True, nogil=True, boundscheck=False)
        def kernel(flat, B, C, H, W, boxes, colour):  # pragma: no cover - compiled
            # Flat offsets, one contiguous run per (channel, row): no per-row array views.
            for b in range(B):
                for k in range(boxes.shape[1]):
                    top, left, h, w = boxes[b, k, 0], boxes[b, k, 1], boxes[b, k, 2], boxes[b, k, 3]
                    y0, y1 = max(top, 0), min(top + h, H)
                    x0, x1 = max(left, 0), min(left + w, W)
                    if y1 <= y0 or x1 <= x0:
                        continue
                    for c in range(C):
                        v = colour[b, c]
                        plane = (b * C + c) * H * W
                        for y in range(y0, y1):
                            row = plane + y * W
                            flat[row + x0:row + x1] = v

        _KERNEL = kernel
    except Exception as exc:  # noqa: BLE001 - any import/compile problem means: use the dense path
        _KERNEL_FAILED = True
        warnings.warn(f"masktrain.erase: numba unavailable ({exc}); using the dense fill", RuntimeWarning, stacklevel=3)
    return _KERNEL


def _can_use_kernel(images: Tensor) -> bool:
    return (
        images.device.type == "cpu"
        and images.dtype in (torch.float32, torch.float64)
        and images.is_contiguous()
        and not images.requires_grad
        and _compile_kernel() is not None
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
        _KERNEL(images.view(-1).numpy(), B, C, images.shape[2], images.shape[3],
                boxes.to(torch.int64).contiguous().numpy(), colour.contiguous().numpy())
        # The write bypassed torch: tell autograd, so a graph that saved ``images`` raises as
        # it would after any in-place op instead of silently using the erased values.
        torch.autograd.graph.increment_version(images)
        return images
    keep = boxes_to_keep(boxes.to(images.device), tuple(images.shape[-2:]), torch.bool)
    return torch.where(keep, images, colour[..., None, None], out=images)
