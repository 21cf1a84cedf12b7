"""Control holes for object removal: holes that remove evidence but carry no outline.

Object masks are ``(B, 1, H, W)`` {0, 1} float with 1 = object; every function returns a
keep mask ``(B, 1, H, W)`` float {0, 1} (1 = visible), per the package convention. All are
batched tensor code on the objects' device (no per-sample Python loop).

- :func:`area_matched_disk` — the shape-free control: a digital disk with exactly the
  object's pixel area at the object's centroid. It depends on (area, centroid) only, so
  two objects of different classes with equal area and centroid get the same hole: the
  hole carries the object's size and position and nothing of its outline.
- :func:`enclosing_disk` — the shape-free hole that removes the *whole* object: the
  smallest disk about the centroid that contains it (larger than the object; the area
  ratio depends on the outline, so it is not area-matched).
- :func:`intact_broken_keep` — the paper's "broken" mask (the silhouette rolled across
  the image) made a real control: rolled by whichever of a few shifts overlaps the object
  least, and with every object pixel kept visible, so the object is intact by construction.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def area_matched_disk(objects: Tensor) -> Tensor:
    """Keep mask removing a disk of the object's exact pixel area at its centroid.

    How it is built, per image: ``A`` = number of object pixels, ``(cy, cx)`` = their
    centroid (pixel-centre coordinates). The ideal radius is ``r = sqrt(A / π)``; the centre
    is shifted (clipped) so that the ideal disk lies inside the image, or to the image
    centre when ``2r`` exceeds a side. The hole is then the ``A`` pixels whose centres are
    nearest to that centre (stable sort, so on a ring of equal distance that is only partly
    needed the lower row-major index wins). Hence:

    - the area matches **exactly** (``A`` pixels removed) for every ``A ≤ H·W``; an empty
      object gives no hole;
    - the hole is the best discrete disk: every pixel within ``r − 1`` of the centre is
      removed and none beyond ``r + 1`` (the nearest-``A`` set differs from a thresholded
      disk only on its boundary ring), except near the border when ``2r`` approaches a side;
    - it is a function of ``(A, centroid)`` only — no outline information.

    Note: the disk is not the object's support, so part of the object (e.g. a crescent's
    horns) can stay visible; this control removes as much, not the same, evidence.

    Args:
        objects: ``(B, 1, H, W)`` {0, 1} (1 = object).
    Returns:
        keep ``(B, 1, H, W)`` float {0, 1}, 0 on the disk.
    """
    obj = (objects > 0.5).to(torch.float64)
    B, _, H, W = obj.shape
    dev = objects.device
    area = obj.sum(dim=(1, 2, 3))  # (B,)
    ys = torch.arange(H, device=dev, dtype=torch.float64).view(1, H, 1)
    xs = torch.arange(W, device=dev, dtype=torch.float64).view(1, 1, W)
    safe = area.clamp_min(1)
    cy = (obj[:, 0] * ys).sum(dim=(1, 2)) / safe
    cx = (obj[:, 0] * xs).sum(dim=(1, 2)) / safe
    r = torch.sqrt(area / math.pi)

    # Keep the ideal disk inside the image: centre in [r - 0.5, side - 0.5 - r] (pixel edges at -0.5 and side - 0.5).
    def clip(c: Tensor, side: int) -> Tensor:
        lo, hi = r - 0.5, side - 0.5 - r
        return torch.where(lo <= hi, torch.minimum(torch.maximum(c, lo), hi), torch.full_like(c, (side - 1) / 2))

    cy, cx = clip(cy, H), clip(cx, W)
    d2 = (ys - cy.view(B, 1, 1)) ** 2 + (xs - cx.view(B, 1, 1)) ** 2  # (B, H, W)
    order = torch.argsort(d2.view(B, H * W), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H * W, device=dev).expand(B, H * W))
    removed = rank < area.to(torch.long).view(B, 1)
    return (~removed).view(B, 1, H, W).to(objects.dtype if objects.dtype.is_floating_point else torch.float32)


def enclosing_disk(objects: Tensor) -> Tensor:
    """Keep mask removing every pixel within ``R`` of the object's centroid, where ``R`` is the
    distance of the farthest object pixel: a disk that covers the whole object (clipped by the
    image border). Carries the object's extent, not its outline; an empty object gives no hole.

    Args:
        objects: ``(B, 1, H, W)`` {0, 1} (1 = object).
    Returns:
        keep ``(B, 1, H, W)`` float {0, 1}.
    """
    obj = (objects > 0.5).to(torch.float64)
    B, _, H, W = obj.shape
    ys = torch.arange(H, device=objects.device, dtype=torch.float64).view(1, 1, H, 1)
    xs = torch.arange(W, device=objects.device, dtype=torch.float64).view(1, 1, 1, W)
    area = obj.sum(dim=(1, 2, 3), keepdim=True)
    safe = area.clamp_min(1)
    cy, cx = (obj * ys).sum(dim=(2, 3), keepdim=True) / safe, (obj * xs).sum(dim=(2, 3), keepdim=True) / safe
    d2 = (ys - cy) ** 2 + (xs - cx) ** 2
    reach = torch.where(obj > 0, d2, torch.full_like(d2, -1.0)).amax(dim=(2, 3), keepdim=True)
    removed = (d2 <= reach) & (area > 0)
    return (~removed).to(torch.float32)


def default_shifts(H: int, W: int) -> list[tuple[int, int]]:
    """The rolls :func:`intact_broken_keep` tries: the paper's (H/2, W/2) first, then half and
    quarter shifts along one or both axes."""
    h2, w2, h4, w4 = H // 2, W // 2, H // 4, W // 4
    return [(h2, w2), (h2, 0), (0, w2), (h2, w4), (h4, w2), (h2, -w4), (-h4, w2), (h4, w4), (-h4, -w4), (h4, -w4), (-h4, w4)]


def intact_broken_keep(objects: Tensor, shifts: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """The "broken" control that never touches the object.

    The paper's broken mask rolls the silhouette by half the image in both directions; on
    objects that fill much of the image the rolled hole often lands on the object itself
    (then it removes object evidence and is no control). Here, per image, the silhouette is
    rolled by each of ``shifts`` (default :func:`default_shifts`), the roll that overlaps the
    object least is taken (the first on ties, so the paper's shift whenever it is clean), and
    every object pixel is then kept visible: ``keep = max(1 − rolled, object)``. The object is
    therefore **intact by construction**; the hole is the silhouette's shape wherever it does
    not meet the object (its area is ``A − overlap``; :func:`broken_overlap` reports the share).

    Args:
        objects: ``(B, 1, H, W)`` {0, 1} (1 = object).
        shifts: ``(dy, dx)`` rolls to try, in order of preference.
    Returns:
        keep ``(B, 1, H, W)`` float {0, 1}; 1 on every object pixel.
    """
    obj = (objects > 0.5).float()
    rolled = _best_roll(obj, shifts)
    return torch.maximum(1.0 - rolled, obj)


def broken_overlap(objects: Tensor, shifts: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """Share of the rolled silhouette that fell on the object (and so was kept visible by
    :func:`intact_broken_keep`), per image ``(B,)``; 0 means the hole is the full silhouette."""
    obj = (objects > 0.5).float()
    rolled = _best_roll(obj, shifts)
    return (rolled * obj).sum(dim=(1, 2, 3)) / obj.sum(dim=(1, 2, 3)).clamp_min(1)


def _best_roll(obj: Tensor, shifts: Sequence[tuple[int, int]] | None) -> Tensor:
    """The least-overlapping roll of each object over ``shifts``: ``(B, 1, H, W)`` {0, 1}."""
    H, W = obj.shape[-2:]
    shifts = list(shifts) if shifts is not None else default_shifts(H, W)
    candidates = torch.stack([torch.roll(obj, s, dims=(2, 3)) for s in shifts], dim=1)  # (B, S, 1, H, W)
    overlap = (candidates * obj[:, None]).sum(dim=(2, 3, 4))  # (B, S)
    best = overlap.argmin(dim=1)  # first minimum on ties
    return candidates[torch.arange(obj.shape[0], device=obj.device), best]
