"""Random keep masks, made in batches on the device from a seeded generator.

Every generator returns a keep mask ``(B, 1, H, W)`` float in {0, 1}, 1 = visible.
Generators are plain functions registered by name in :data:`MASK_GENERATORS`;
:class:`RandomKeepMask` wraps one with a masking probability ``p``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from masktrain.erase import boxes_to_keep
from masktrain.errors import UserError, check, check_range

MaskGenerator = Callable[..., Tensor]
MASK_GENERATORS: dict[str, MaskGenerator] = {}
# Kinds drawn from the batch's object masks (a dataset without them cannot use these).
OBJECT_MASK_KINDS: set[str] = {"silhouettes"}


def register_mask(name: str) -> Callable[[MaskGenerator], MaskGenerator]:
    def decorate(fn: MaskGenerator) -> MaskGenerator:
        MASK_GENERATORS[name] = fn
        return fn

    return decorate


def _uniform(shape: Sequence[int], lo: float, hi: float, generator: torch.Generator, device) -> Tensor:
    return torch.rand(*shape, generator=generator, device=device) * (hi - lo) + lo


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    value = tuple(value)
    check(len(value) == 2, f"{name}={list(value)!r} must be a number or a [min, max] pair")
    return float(value[0]), float(value[1])


class BoxKeep:
    """A keep mask given by its removed rectangles, materialised only when needed.

    ``boxes`` ``(B, K, 4)`` int64 rows (top, left, height, width), height or width 0 = no
    box; ``size`` = (H, W). Fills with one colour per sample erase the boxes directly
    (:func:`masktrain.erase.erase_`); everything else calls :meth:`dense`. Slicing
    (``keep[:32]``) selects samples, as on a dense mask.
    """

    def __init__(self, boxes: Tensor, size: tuple[int, int]) -> None:
        self.boxes, self.size = boxes, (int(size[0]), int(size[1]))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.boxes.shape[0], 1, *self.size))

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, index) -> "BoxKeep":
        boxes = self.boxes[index]
        check(boxes.dim() == 3, "BoxKeep supports selecting samples only (keep[i:j] or keep[indices])")
        return BoxKeep(boxes, self.size)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Keep ``(B, 1, H, W)``, 1 = visible."""
        return boxes_to_keep(self.boxes, self.size, dtype)

    def __repr__(self) -> str:
        return f"BoxKeep(batch={len(self)}, boxes={self.boxes.shape[1]}, size={self.size})"


def as_dense(keep: "Tensor | BoxKeep") -> Tensor:
    """A dense keep mask ``(B, 1, H, W)`` from either form."""
    return keep.dense() if isinstance(keep, BoxKeep) else keep


def rectangle_boxes(
    batch_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    *,
    count: Sequence[int] | int = (1, 1),
    area: Sequence[float] | float = (0.02, 0.33),
    aspect: Sequence[float] | float = (0.3, 3.3),
    object_masks: Tensor | None = None,
) -> Tensor:
    """The boxes of :func:`rectangles`: ``(B, max count, 4)`` int64 (top, left, height, width), unused = 0."""
    H, W = size
    cmin, cmax = (int(c) for c in _pair(count, "count"))
    amin, amax = _pair(area, "area")
    rmin, rmax = _pair(aspect, "aspect")
    check_range("mask.area", (amin, amax), 0.0, 1.0, lo_open=True)
    check(cmin >= 0 and cmax >= cmin, f"mask.count={[cmin, cmax]!r} must be 0 <= min <= max")
    check(rmin > 0 and rmax >= rmin, f"mask.aspect={[rmin, rmax]!r} must be 0 < min <= max")
    if cmax == 0:
        return torch.zeros(batch_size, 0, 4, dtype=torch.int64, device=device)
    shape = (batch_size, cmax)
    n = torch.randint(cmin, cmax + 1, (batch_size, 1), generator=generator, device=device)
    target = _uniform(shape, amin, amax, generator, device) * (H * W)
    log_r = _uniform(shape, math.log(rmin), math.log(rmax), generator, device)
    ratio = torch.exp(log_r)
    h = torch.sqrt(target * ratio).clamp(1, H)
    w = (target / h).clamp(1, W)
    h = (target / w).clamp(1, H)
    h, w = h.round(), w.round()
    top = torch.floor(torch.rand(shape, generator=generator, device=device) * (H - h + 1))
    left = torch.floor(torch.rand(shape, generator=generator, device=device) * (W - w + 1))
    active = torch.arange(cmax, device=device)[None, :] < n  # (B, cmax)
    boxes = torch.stack([top, left, h, w], dim=-1).to(torch.int64)
    return boxes * active[..., None]


@register_mask("rectangles")
def rectangles(
    batch_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    **params,
) -> Tensor:
    """Random-erasing style rectangles.

    Each sample gets ``count`` rectangles (uniform integer in the range), each covering
    ``area`` of the image (uniform fraction) with a log-uniform aspect ratio h/w. A
    rectangle that would not fit keeps its area and changes its aspect to fit, so the
    requested area is what is removed (up to rounding and overlaps). Parameters ``count``,
    ``area``, ``aspect``: see :func:`rectangle_boxes`, which draws the boxes.

    Returns: keep ``(B, 1, H, W)``.
    """
    return boxes_to_keep(rectangle_boxes(batch_size, size, generator, device, **params), tuple(size))


# Generators that can also return their masks as boxes (same draws, same masks).
BOX_GENERATORS: dict[str, Callable[..., Tensor]] = {"rectangles": rectangle_boxes}


@register_mask("patches")
def patches(
    batch_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    *,
    patch_size: int = 8,
    fraction: Sequence[float] | float = (0.0, 0.5),
    object_masks: Tensor | None = None,
) -> Tensor:
    """Hide-and-Seek style grid: ``patch_size`` × ``patch_size`` cells, of which exactly
    ``round(f · cells)`` are removed, f uniform in ``fraction`` per sample.

    Returns: keep ``(B, 1, H, W)``.
    """
    H, W = size
    fmin, fmax = _pair(fraction, "fraction")
    check_range("mask.fraction", (fmin, fmax), 0.0, 1.0)
    check(int(patch_size) >= 1, f"mask.patch_size={patch_size!r} must be a positive integer")
    s = int(patch_size)
    gh, gw = math.ceil(H / s), math.ceil(W / s)
    cells = gh * gw
    f = _uniform((batch_size, 1), fmin, fmax, generator, device)
    k = torch.round(f * cells)
    rank = torch.rand(batch_size, cells, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    keep_cells = (rank >= k).float().view(batch_size, 1, gh, gw)
    keep = keep_cells.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
    return keep[:, :, :H, :W].contiguous()


@register_mask("blobs")
def blobs(
    batch_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    *,
    area: Sequence[float] | float = (0.1, 0.4),
    scale: int = 8,
    object_masks: Tensor | None = None,
) -> Tensor:
    """Thresholded smooth noise: low-resolution noise (``scale`` cells across) upsampled
    bicubically, thresholded per sample at the quantile that removes ``area`` of the image
    (exact up to 64×64, within about 1% of the image above).

    Returns: keep ``(B, 1, H, W)``.
    """
    H, W = size
    amin, amax = _pair(area, "area")
    check_range("mask.area", (amin, amax), 0.0, 1.0, lo_open=True)
    check(int(scale) >= 2, f"mask.scale={scale!r} must be an integer >= 2")
    low = torch.rand(batch_size, 1, int(scale), int(scale), generator=generator, device=device)
    field = F.interpolate(low, size=(H, W), mode="bicubic", align_corners=False)
    a = _uniform((batch_size,), amin, amax, generator, device)
    # The field is smooth, so its quantile on a strided subsample (<= 64² points) is the
    # full-resolution quantile to within a fraction of a percent, at a fraction of the cost.
    stride = max(1, min(H, W) // 64)
    sample = field[:, :, ::stride, ::stride].reshape(batch_size, -1)
    k = torch.clamp(torch.round(a * sample.shape[1]).long(), 1, sample.shape[1])
    threshold = sample.sort(dim=1).values.gather(1, (k - 1)[:, None])
    removed = field.view(batch_size, -1) <= threshold
    return (~removed).float().view(batch_size, 1, H, W)


@register_mask("silhouettes")
def silhouettes(
    batch_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    *,
    object_masks: Tensor | None = None,
) -> Tensor:
    """Remove the object silhouette of another sample in the batch.

    Shape-realistic but class-uninformative: sample i receives the object mask of
    sample ``(i + s) mod B`` for one random shift ``s`` in [1, B), so no sample ever
    gets its own silhouette.

    object_masks: ``(B, 1, H, W)``, 1 = object. Returns: keep ``(B, 1, H, W)``.
    """
    if object_masks is None:
        raise UserError("mask.kind=silhouettes needs object masks; use a dataset that provides them")
    check(tuple(object_masks.shape[-2:]) == tuple(size), f"object masks {tuple(object_masks.shape[-2:])} do not match image size {tuple(size)}")
    if batch_size < 2:
        return torch.ones(batch_size, 1, *size, device=device)
    shift = int(torch.randint(1, batch_size, (1,), generator=generator, device=device).item())
    donor = torch.roll(object_masks, shifts=shift, dims=0)
    return 1.0 - (donor > 0.5).float()


def make_keep_masks(
    kind: str,
    batch_size: int,
    size: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    **params,
) -> Tensor:
    """Dispatch to a registered generator by name. Returns keep ``(B, 1, H, W)``."""
    if kind not in MASK_GENERATORS:
        raise UserError(f"mask.kind={kind!r} is unknown; choose one of {sorted(MASK_GENERATORS)}")
    return MASK_GENERATORS[kind](batch_size, tuple(size), generator, device, **params)


class RandomKeepMask:
    """Draws keep masks of one kind and applies each to a sample with probability ``p``.

    Samples not selected get an all-ones (fully visible) keep mask.
    """

    def __init__(self, kind: str = "rectangles", p: float = 0.5, **params) -> None:
        check_range("mask.p", p, 0.0, 1.0)
        if kind not in MASK_GENERATORS:
            raise UserError(f"mask.kind={kind!r} is unknown; choose one of {sorted(MASK_GENERATORS)}")
        self.kind, self.p, self.params = kind, float(p), dict(params)
        # Validate parameters once, at construction, so bad values fail before training starts.
        g = torch.Generator().manual_seed(0)
        dummy = torch.zeros(2, 1, 8, 8) if kind in OBJECT_MASK_KINDS else None
        make_keep_masks(kind, 2, (8, 8), g, "cpu", object_masks=dummy, **self.params)

    def __call__(
        self,
        batch_size: int,
        size: tuple[int, int],
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        object_masks: Tensor | None = None,
        lazy: bool = False,
    ) -> "Tensor | BoxKeep":
        """Returns keep ``(B, 1, H, W)``; with ``lazy=True`` a :class:`BoxKeep` where the kind
        has a box form (the same masks from the same draws), so a colour fill can erase the
        boxes without building the dense mask."""
        if lazy and self.kind in BOX_GENERATORS:
            boxes = BOX_GENERATORS[self.kind](batch_size, tuple(size), generator, device, **self.params)
            if self.p < 1.0:
                chosen = torch.rand(batch_size, 1, 1, 1, generator=generator, device=device) < self.p
                boxes = boxes * chosen.view(batch_size, 1, 1)
            return BoxKeep(boxes, tuple(size))
        keep = make_keep_masks(self.kind, batch_size, size, generator, device, object_masks=object_masks, **self.params)
        if self.p >= 1.0:
            return keep
        chosen = torch.rand(batch_size, 1, 1, 1, generator=generator, device=device) < self.p
        return torch.where(chosen, keep, torch.ones_like(keep))

    def __repr__(self) -> str:
        return f"RandomKeepMask(kind={self.kind!r}, p={self.p}, {self.params})"


def validate_keep(keep: Tensor, images: Tensor | None = None, name: str = "keep mask") -> Tensor:
    """Check a user-supplied keep mask: shape ``(B, 1, H, W)`` matching the images, values in {0, 1}."""
    check(keep.dim() == 4 and keep.shape[1] == 1, f"{name} must have shape (B, 1, H, W), got {tuple(keep.shape)}")
    if images is not None:
        check(
            keep.shape[0] == images.shape[0] and keep.shape[-2:] == images.shape[-2:],
            f"{name} of shape {tuple(keep.shape)} does not match images of shape {tuple(images.shape)}",
        )
    check(bool(((keep == 0) | (keep == 1)).all()), f"{name} is not binary: values must be exactly 0 or 1 (1 = visible)")
    return keep.float()
