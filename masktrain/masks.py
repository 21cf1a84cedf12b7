"""Random keep masks, made in batches on the device from a seeded generator.

Every generator returns a keep mask ``(B, 1, H, W)`` float in {0, 1}, 1 = visible.
Each mask kind is one :class:`MaskKind` in the registry :data:`MASK_KINDS`: its generator,
its box form if it has one, and whether it needs object masks. :class:`RandomKeepMask`
wraps one with a masking probability ``p``. Adding a kind::

    @register_mask("stripes", needs_object_masks=False)
    def stripes(batch_size, size, generator, device="cpu", *, object_masks=None, **params) -> Tensor:
        ...   # keep (B, 1, H, W); draw through masktrain.rng.rand(generator, shape, device)

Random draws go through :func:`masktrain.rng.rand`, so a generator may be a ``torch.Generator``
(training) or a per-sample :class:`masktrain.rng.SampleRandom` (probes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from masktrain.erase import boxes_to_keep
from masktrain import rng
from masktrain.errors import UserError, check, check_range
from masktrain.registry import Registry

MaskGenerator = Callable[..., Tensor]


@dataclass(frozen=True)
class MaskKind:
    """One mask kind: ``generate(batch_size, size, generator, device, **params) -> keep (B, 1, H, W)``;
    ``boxes`` (same signature, same draws) returns its removed rectangles ``(B, K, 4)`` when it has
    a box form; ``needs_object_masks``: ``generate`` reads ``object_masks=(B, 1, H, W)``;
    ``sampler``: the training sampler class used instead of :class:`RandomKeepMask`
    (``sampler(p=..., **params)``, with the same :meth:`RandomKeepMask.inputs`), for a kind that
    changes pixels as well as removing them (``condition``)."""

    name: str
    generate: MaskGenerator
    boxes: Optional[Callable[..., Tensor]] = None
    needs_object_masks: bool = False
    sampler: Optional[Callable[..., "RandomKeepMask"]] = None


MASK_KINDS: Registry[MaskKind] = Registry("mask kind", "mask.kind")


def register_mask(name: str, boxes: Optional[Callable[..., Tensor]] = None,
                  needs_object_masks: bool = False,
                  sampler: Optional[Callable[..., "RandomKeepMask"]] = None) -> Callable[[MaskGenerator], MaskGenerator]:
    """Register a keep-mask generator as mask kind ``name`` (see the module docstring)."""
    def decorate(fn: MaskGenerator) -> MaskGenerator:
        MASK_KINDS.register(name, MaskKind(name, fn, boxes, needs_object_masks, sampler))
        return fn

    return decorate


def _uniform(shape: Sequence[int], lo: float, hi: float, generator, device) -> Tensor:
    return rng.rand(generator, shape, device=device) * (hi - lo) + lo


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


@dataclass(frozen=True)
class MaskedBatch:
    """What a masking method turns into the model input: ``images (B, 3, H, W)`` in [0, 1] and
    ``keep (B, 1, H, W)`` (1 = visible; dense or a :class:`BoxKeep`). ``partner (B,)`` / ``fallback
    (B,)``: for conditions that paste another sample in, who was pasted (index into the pool) and
    which samples had no eligible partner; None otherwise."""

    images: Tensor
    keep: "Tensor | BoxKeep"
    partner: Optional[Tensor] = None
    fallback: Optional[Tensor] = None


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
    n = rng.randint(generator, cmin, cmax + 1, (batch_size, 1), device=device)
    target = _uniform(shape, amin, amax, generator, device) * (H * W)
    log_r = _uniform(shape, math.log(rmin), math.log(rmax), generator, device)
    ratio = torch.exp(log_r)
    h = torch.sqrt(target * ratio).clamp(1, H)
    w = (target / h).clamp(1, W)
    h = (target / w).clamp(1, H)
    h, w = h.round(), w.round()
    top = torch.floor(rng.rand(generator, shape, device=device) * (H - h + 1))
    left = torch.floor(rng.rand(generator, shape, device=device) * (W - w + 1))
    active = torch.arange(cmax, device=device)[None, :] < n  # (B, cmax)
    boxes = torch.stack([top, left, h, w], dim=-1).to(torch.int64)
    return boxes * active[..., None]


@register_mask("rectangles", boxes=rectangle_boxes)
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
    rank = rng.rand(generator, (batch_size, cells), device=device).argsort(dim=1).argsort(dim=1)
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
    low = rng.rand(generator, (batch_size, 1, int(scale), int(scale)), device=device)
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


@register_mask("silhouettes", needs_object_masks=True)
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
    return MASK_KINDS.get(kind).generate(batch_size, tuple(size), generator, device, **params)


class RandomKeepMask:
    """Draws keep masks of one kind and applies each to a sample with probability ``p``.

    Samples not selected get an all-ones (fully visible) keep mask.
    """

    def __init__(self, kind: str = "rectangles", p: float = 0.5, **params) -> None:
        check_range("mask.p", p, 0.0, 1.0)
        self.spec = MASK_KINDS.get(kind)
        self.kind, self.p, self.params = kind, float(p), dict(params)
        # Validate parameters once, at construction, so bad values fail before training starts.
        g = torch.Generator().manual_seed(0)
        dummy = torch.zeros(2, 1, 8, 8) if self.spec.needs_object_masks else None
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
        if lazy and self.spec.boxes is not None:
            boxes = self.spec.boxes(batch_size, tuple(size), generator, device, **self.params)
            if self.p < 1.0:
                chosen = torch.rand(batch_size, 1, 1, 1, generator=generator, device=device) < self.p
                boxes = boxes * chosen.view(batch_size, 1, 1)
            return BoxKeep(boxes, tuple(size))
        keep = make_keep_masks(self.kind, batch_size, size, generator, device, object_masks=object_masks, **self.params)
        if self.p >= 1.0:
            return keep
        chosen = torch.rand(batch_size, 1, 1, 1, generator=generator, device=device) < self.p
        return torch.where(chosen, keep, torch.ones_like(keep))

    def inputs(self, images: Tensor, labels: Tensor, objects: Tensor | None, generator: torch.Generator,
               method, num_classes: int, lazy: bool = False) -> MaskedBatch:
        """The batch as the training / validation step hands it to ``method`` (a
        :class:`masktrain.methods.MaskingMethod`): the images themselves and a keep mask drawn by
        :meth:`__call__` (the same draws). ``labels``, ``method`` and ``num_classes`` are unused
        here; samplers that build the input from the whole batch
        (:class:`masktrain.conditions.ConditionSampler`) need them."""
        keep = self(images.shape[0], images.shape[-2:], generator, images.device, object_masks=objects, lazy=lazy)
        return MaskedBatch(images, keep)

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
