"""Foreground/background conditions: the Backgrounds Challenge (IN-9) variants and *Mask of truth*'s.

Names follow IN-9 (Xiao et al., "Noise or Signal", 2020; MadryLab/backgrounds_challenge):

============  ===================================================================
original      the image
only_fg       the background removed (the object kept)
no_fg         the object removed with its silhouette
only_bg_b     the object's bounding box removed
only_bg_t     the object's bounding box filled with tiles of the image's own background
              (the ``tile`` fill, whatever the method: nothing is left removed)
only_fg_b     only the object's bounding box kept (Mask of truth, Sourget et al. 2024)
mixed_same    the object pasted on the background of another image of the same class
mixed_rand    ... of another image drawn from all classes (never the image itself)
mixed_next    ... of an image of the next class, ``(label + 1) mod num_classes``
============  ===================================================================

Every condition is computed on the device from a batch ``images (B, 3, H, W)`` in [0, 1],
``labels (B,)``, ``objects (B, 1, H, W)`` in {0, 1} (1 = object) and returns
``(images', keep)``: the masking method then makes the model input from them, e.g.
``method.logits(model, *apply_condition(...))``. Removal therefore goes through the method:
under ``black`` the conditions are IN-9's released images (which are black-filled), under
``layer`` the removed region is layer-masked (``only_fg`` = background masked away).

Mixed conditions follow IN-9's construction: the partner's background is its ``only_bg_t``
image, i.e. the partner's object *bounding box* is removed (here: by the method), and the
object pixels of image i are pasted over it. Under a fill method the partner's box is filled
from the partner alone (before pasting, so a fill such as ``mean``, ``blur`` or ``tile`` never
sees image i's object) and nothing is left removed; under ``layer`` the pasted image carries
the raw partner pixels and ``keep = object_i OR outside box_j`` (partner box masked, i's object
visible). Under ``tile`` this reproduces IN-9's mixed sets exactly up to the tiling rule
(:mod:`masktrain.fills.tile`).

Partners are drawn per sample, not per batch: a uniform number from a 32-bit integer hash of
``(seed, row)`` picks the k-th eligible member of the pool, so with a fixed pool (e.g. a whole
test set passed as ``pool``) a sample's partner does not depend on the batch size or order.
Without ``pool`` the batch itself is the pool (training). When a sample has no eligible partner
(a class alone in its batch), any other pool member is used instead, and the sample is
reported in :attr:`Conditioned.fallback`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from masktrain.errors import UserError, check, check_range
from masktrain.fills import IMAGENET_MEAN, fill
from masktrain.masks import MaskedBatch, register_mask
from masktrain.methods import FillMethod, MaskingMethod, get_method
from masktrain.registry import Registry
from masktrain.rng import derive_seed

PARTNER_KINDS = ("same", "rand", "next")


@dataclass(frozen=True)
class Pool:
    """Candidate partners: ``images (N, 3, H, W)``, ``labels (N,)``, ``objects (N, 1, H, W)``, and
    ``rows (N,)`` int64 ids in the same id space as the batch's ``rows`` (so a sample is never its
    own partner)."""

    images: Tensor
    labels: Tensor
    objects: Tensor
    rows: Tensor


@dataclass(frozen=True)
class Conditioned(MaskedBatch):
    """The output of :func:`apply_condition`: ``images (B, 3, H, W)`` and ``keep (B, 1, H, W)``
    (1 = visible) for the method; ``partner (B,)`` indices into the pool (-1 for single-image
    conditions) and ``fallback (B,)`` bool, samples that had no eligible partner."""

    images: Tensor
    keep: Tensor
    partner: Tensor
    fallback: Tensor


ConditionFn = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Condition:
    """One registered condition.

    ``fn(images, objects, method, generator, partner_images, partner_objects) -> (images, keep)``;
    ``partner``: None or one of :data:`PARTNER_KINDS`; ``keep_only``: the condition only removes
    pixels (images unchanged), so it can also be drawn as a training mask from objects alone.
    """

    name: str
    fn: ConditionFn
    partner: str | None
    keep_only: bool
    description: str


CONDITIONS: Registry[Condition] = Registry("condition", "mask.condition / probes.backgrounds.conditions")


def register_condition(name: str, description: str, partner: str | None = None,
                       keep_only: bool = False) -> Callable[[ConditionFn], ConditionFn]:
    def decorate(fn: ConditionFn) -> ConditionFn:
        CONDITIONS.register(name, Condition(name, fn, partner, keep_only, description))
        return fn

    return decorate


def get_condition(name: str) -> Condition:
    """The condition ``name``; one UserError listing the choices when unknown."""
    return CONDITIONS.get(name)


# -- geometry ---------------------------------------------------------------------------------
def object_box(objects: Tensor) -> Tensor:
    """The bounding box of each object mask ``(B, 1, H, W)`` as a float mask (1 inside the box);
    an empty object gives an empty box."""
    obj = objects[:, 0] > 0.5
    rows, cols = obj.any(dim=2), obj.any(dim=1)  # (B, H), (B, W)
    H, W = obj.shape[-2:]
    r = torch.arange(H, device=objects.device)
    c = torch.arange(W, device=objects.device)
    r0 = torch.where(rows, r, H).amin(dim=1)[:, None]
    r1 = torch.where(rows, r, -1).amax(dim=1)[:, None]
    c0 = torch.where(cols, c, W).amin(dim=1)[:, None]
    c1 = torch.where(cols, c, -1).amax(dim=1)[:, None]
    in_rows = (r[None] >= r0) & (r[None] <= r1)
    in_cols = (c[None] >= c0) & (c[None] <= c1)
    return (in_rows[:, :, None] & in_cols[:, None, :]).to(objects.dtype)[:, None]


def _binary(objects: Tensor) -> Tensor:
    return (objects > 0.5).to(torch.float32)


# -- single-image conditions ------------------------------------------------------------------
@register_condition("original", "the image", keep_only=True)
def _original(images, objects, method, generator, *_):
    return images, torch.ones_like(objects)


@register_condition("only_fg", "background removed, object kept", keep_only=True)
def _only_fg(images, objects, method, generator, *_):
    return images, objects


@register_condition("no_fg", "object removed with its silhouette", keep_only=True)
def _no_fg(images, objects, method, generator, *_):
    return images, 1.0 - objects


@register_condition("only_bg_b", "object's bounding box removed", keep_only=True)
def _only_bg_b(images, objects, method, generator, *_):
    return images, 1.0 - object_box(objects)


@register_condition("only_bg_t", "object's bounding box tiled with the image's own background")
def _only_bg_t(images, objects, method, generator, *_):
    # IN-9 fills the box with tiles whatever the model; nothing is left for the method to remove.
    return fill(images, 1.0 - object_box(objects), "tile"), torch.ones_like(objects)


@register_condition("only_fg_b", "only the object's bounding box kept", keep_only=True)
def _only_fg_b(images, objects, method, generator, *_):
    return images, object_box(objects)


# -- mixed conditions -------------------------------------------------------------------------
def _mixed(images, objects, method, generator, partner_images, partner_objects):
    partner_keep = 1.0 - object_box(partner_objects)
    if isinstance(method, FillMethod):
        # Fill the partner's box from the partner alone, as IN-9 builds only_bg_t first.
        background = method.render(partner_images, partner_keep, generator)
        return torch.where(objects > 0.5, images, background), torch.ones_like(objects)
    # Methods that carry the mask (layer): raw pixels, the partner box masked, i's object visible.
    pasted = torch.where(objects > 0.5, images, partner_images)
    return pasted, torch.maximum(objects, partner_keep)


for _kind, _text in (("same", "the same class"), ("rand", "any class (another image)"), ("next", "the next class")):
    register_condition(f"mixed_{_kind}", f"object on the background of an image of {_text}", partner=_kind)(_mixed)


# -- partners ---------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (int64 arithmetic, products stay below 2^63)."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def sample_uniform(seed: int, rows: Tensor) -> Tensor:
    """One uniform number in [0, 1) per row, fixed by ``(seed, row)`` alone (float64, ``rows``' device)."""
    base = derive_seed(int(seed), 0x15) & _MASK32
    return _hash32(_hash32(rows.to(torch.int64)) ^ base).to(torch.float64) / float(1 << 32)


def _pick(candidates: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the ``floor(u * count)``-th true entry per row of ``candidates (B, N)``; (-1, False) if none."""
    count = candidates.sum(dim=1)
    k = torch.floor(u * count).to(torch.int64).clamp_max((count - 1).clamp_min(0))
    hit = candidates & (candidates.cumsum(dim=1) == (k + 1)[:, None])
    found = count > 0
    return torch.where(found, hit.to(torch.int8).argmax(dim=1), -1), found


def partner_indices(kind: str, labels: Tensor, rows: Tensor, seed: int, pool_labels: Tensor,
                    pool_rows: Tensor, num_classes: int, uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(indices (B,) into the pool, fallback (B,) bool)``: each sample's partner of ``kind``
    (``same``: same label; ``rand``: any other pool member; ``next``: label + 1 mod num_classes),
    never the sample itself (same row). A sample without an eligible partner takes a ``rand``
    partner (``fallback`` true); with no other pool member at all, itself.

    ``uniform (B,)`` float64 in [0, 1): the number that picks each sample's partner (the
    ``floor(u * count)``-th eligible pool member, in pool order); default
    :func:`sample_uniform` of ``(seed, rows)``."""
    check(kind in PARTNER_KINDS, f"partner kind {kind!r} is unknown; choose one of {list(PARTNER_KINDS)}")
    labels, pool_labels = labels.to(torch.int64), pool_labels.to(pool_rows.device, torch.int64)
    other = pool_rows[None, :] != rows[:, None]  # (B, N)
    if kind == "same":
        eligible = other & (pool_labels[None, :] == labels[:, None])
    elif kind == "next":
        eligible = pool_labels[None, :] == ((labels + 1) % int(num_classes))[:, None]
    else:
        eligible = other
    u = sample_uniform(seed, rows) if uniform is None else uniform.to(rows.device, torch.float64)
    check(u.shape == rows.shape, f"partner uniforms of shape {tuple(u.shape)} do not match rows of shape {tuple(rows.shape)}")
    index, found = _pick(eligible, u)
    spare, spare_found = _pick(other, u)
    self_index = (pool_rows[None, :] == rows[:, None]).to(torch.int8).argmax(dim=1)
    index = torch.where(found, index, torch.where(spare_found, spare, self_index))
    return index, ~found


def apply_condition(
    name: str,
    images: Tensor,
    labels: Tensor,
    objects: Tensor,
    method: "MaskingMethod | str" = "black",
    *,
    seed: int = 0,
    rows: Tensor | None = None,
    pool: Pool | None = None,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    uniform: Tensor | None = None,
) -> Conditioned:
    """Condition ``name`` of a batch, for ``method`` (a :class:`MaskingMethod` or its name).

    ``rows (B,)`` int64: sample ids that seed the partner draw (default ``arange(B)``); ``pool``:
    the candidate partners (default: the batch, with ids ``rows``); ``num_classes`` for
    ``mixed_next`` (default: largest label seen + 1); ``generator`` for random fills;
    ``uniform (B,)``: the partner-picking numbers instead of the ``(seed, rows)`` hash (training
    draws them from its step generator, see :class:`ConditionSampler`).
    """
    condition = get_condition(name)
    method = get_method(method, mean) if isinstance(method, str) else method
    check(objects is not None, f"condition {name!r} needs object masks; use a dataset that provides them")
    check(images.dim() == 4 and objects.shape == (images.shape[0], 1, *images.shape[-2:]),
          f"object masks of shape {tuple(objects.shape)} do not match images of shape {tuple(images.shape)}")
    B = images.shape[0]
    objects = _binary(objects).to(images.dtype)
    none = torch.full((B,), -1, dtype=torch.int64, device=images.device)
    no_fallback = torch.zeros(B, dtype=torch.bool, device=images.device)
    if condition.partner is None:
        out, keep = condition.fn(images, objects, method, generator, None, None)
        return Conditioned(out, keep, none, no_fallback)
    rows = torch.arange(B, device=images.device) if rows is None else rows.to(images.device, torch.int64)
    if pool is None:
        pool = Pool(images, labels, objects, rows)
    if num_classes is None:
        num_classes = int(max(int(labels.max()), int(pool.labels.max()))) + 1
    index, fallback = partner_indices(condition.partner, labels.to(images.device), rows, seed,
                                      pool.labels.to(images.device), pool.rows.to(images.device), num_classes, uniform)
    # Index the pool where it lives, then move the b partners: a test-set pool stays on the CPU.
    on_pool = index.to(pool.images.device)
    partner_images = pool.images[on_pool].to(images.device)
    partner_objects = _binary(pool.objects[on_pool].to(images.device)).to(images.dtype)
    out, keep = condition.fn(images, objects, method, generator, partner_images, partner_objects)
    return Conditioned(out, keep, index, fallback)


# -- training: every condition as a mask kind ------------------------------------------------
KEEP_ONLY = tuple(n for n, c in CONDITIONS.items() if c.keep_only)


class ConditionSampler:
    """``mask.kind=condition``: the training (and validation) input of a condition, made by
    :func:`apply_condition` -- the same function the ``backgrounds`` probe evaluates with, so the
    model trains on exactly what it is tested on (for ``layer`` the keep mask is the condition's).

    Each sample gets the condition with probability ``p`` (else the image itself, all visible).
    Draws from the step's generator, in this order, so a run repeats per (seed, rank, step) and
    resumes exactly: for a mixed condition ``B`` float64 uniforms that pick the partners from the
    batch (the batch is the pool; ids ``arange(B)``, so a sample is never its own partner); then,
    when ``p < 1``, ``B`` uniforms that choose the samples; then whatever a random fill draws.

    A sample without an eligible partner in its batch (``mixed_same``: its class has one member
    there; ``mixed_next``: no image of class ``(y + 1) mod K``) gets a random other image of the
    batch as the background -- the rule the probe uses on a test set -- and is counted in
    :attr:`MaskedBatch.fallback` (logged as ``train/partner_fallback``). Labels stay the object's.
    """

    def __init__(self, p: float = 1.0, condition: str = "no_fg", **unknown) -> None:
        check(not unknown, f"mask.kind=condition takes mask.condition and mask.p only; remove {sorted(unknown)}")
        check_range("mask.p", p, 0.0, 1.0)
        try:
            self.spec = get_condition(str(condition))
        except UserError:
            raise UserError(f"mask.condition={condition!r}: condition {condition!r} is unknown; "
                            f"choose one of [{', '.join(CONDITIONS.names())}]") from None
        self.kind, self.condition, self.p = "condition", self.spec.name, float(p)

    def inputs(self, images: Tensor, labels: Tensor, objects: Tensor | None, generator: torch.Generator,
               method: MaskingMethod, num_classes: int, lazy: bool = False) -> Conditioned:
        """The conditioned batch ``(images (B, 3, H, W), keep (B, 1, H, W), partner (B,), fallback
        (B,))`` for ``method`` (the mixed conditions under a fill fill the partner's box before the
        paste); ``lazy`` is accepted for :meth:`RandomKeepMask.inputs`' signature."""
        if objects is None:
            raise UserError(f"mask.kind=condition (mask.condition={self.condition}) needs object masks; "
                            "use a dataset that provides them")
        B, device = images.shape[0], images.device
        uniform = torch.rand(B, generator=generator, device=device, dtype=torch.float64) if self.spec.partner else None
        c = apply_condition(self.condition, images, labels, objects, method, num_classes=int(num_classes),
                            generator=generator, uniform=uniform)
        if self.p >= 1.0:
            return c
        chosen = (torch.rand(B, generator=generator, device=device) < self.p).view(B, 1, 1, 1)
        return Conditioned(torch.where(chosen, c.images, images), torch.where(chosen, c.keep, torch.ones_like(c.keep)),
                           torch.where(chosen.view(B), c.partner, -1), c.fallback & chosen.view(B))

    def __repr__(self) -> str:
        return f"ConditionSampler(condition={self.condition!r}, p={self.p})"


@register_mask("condition", needs_object_masks=True, sampler=ConditionSampler)
def condition_mask(batch_size: int, size: tuple[int, int], generator: torch.Generator,
                   device: torch.device | str = "cpu", *, condition: str = "no_fg",
                   object_masks: Tensor | None = None) -> Tensor:
    """The keep mask alone of a condition that only removes pixels (``original``, ``only_fg``,
    ``no_fg``, ``only_bg_b``, ``only_fg_b``), from object masks ``(B, 1, H, W)``; returns keep
    ``(B, 1, H, W)``. Training builds every condition, pixel-changing ones too, through
    :class:`ConditionSampler`; this generator serves callers that want a keep mask only."""
    spec = get_condition(str(condition))
    if not spec.keep_only:
        raise UserError(f"mask.condition={condition!r} changes pixels, so it has no keep mask alone; "
                        f"use ConditionSampler (training: mask=condition) or one of {list(KEEP_ONLY)}")
    if object_masks is None:
        raise UserError(f"mask.kind=condition (mask.condition={condition}) needs object masks; use a dataset that provides them")
    check(tuple(object_masks.shape[-2:]) == tuple(size),
          f"object masks {tuple(object_masks.shape[-2:])} do not match image size {tuple(size)}")
    objects = _binary(object_masks).to(device)
    return spec.fn(objects, objects, None, None)[1]
