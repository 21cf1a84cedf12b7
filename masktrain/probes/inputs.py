"""Probe inputs: control holes (area-matched disk, bounding box, enclosing disk, intact
"broken"; built in :mod:`masktrain.control_holes`), class-neutral donors, silhouette
partners in another class, and how visible a fill is on its donor.

Object masks are ``(B, 1, H, W)`` {0, 1} with 1 = object; every function here returns
keep masks (1 = visible), per the package convention.

Control holes (``objects (B, 1, H, W) -> keep (B, 1, H, W)``) and donors
(``donor(ctx) -> (N, 3, H, W)``) are registries; add one with
``CONTROL_HOLES.register("name", fn)`` or ``@register_donor("name")``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from masktrain.control_holes import area_matched_disk, enclosing_disk, intact_broken_keep
from masktrain.errors import UserError
from masktrain.probes.base import ProbeContext
from masktrain.registry import Registry
from masktrain import rng
from masktrain.rng import SampleRandom


def silhouette_keep(objects: Tensor) -> Tensor:
    """Remove exactly the object: keep ``(B, 1, H, W)``."""
    return 1.0 - (objects > 0.5).float()


def bbox_keep(objects: Tensor) -> Tensor:
    """Remove the object's bounding box (covers the object, carries no shape beyond its extent)."""
    obj = objects > 0.5
    rows, cols = obj.any(dim=3, keepdim=True), obj.any(dim=2, keepdim=True)  # (B,1,H,1), (B,1,1,W)
    H, W = objects.shape[-2:]
    ar_h = torch.arange(H, device=objects.device).view(1, 1, H, 1)
    ar_w = torch.arange(W, device=objects.device).view(1, 1, 1, W)
    big = max(H, W) + 1
    top = torch.where(rows, ar_h, big).amin(dim=2, keepdim=True)
    bottom = torch.where(rows, ar_h, -1).amax(dim=2, keepdim=True)
    left = torch.where(cols, ar_w, big).amin(dim=3, keepdim=True)
    right = torch.where(cols, ar_w, -1).amax(dim=3, keepdim=True)
    inside = (ar_h >= top) & (ar_h <= bottom) & (ar_w >= left) & (ar_w <= right)
    return (~inside).float()


def broken_keep(objects: Tensor) -> Tensor:
    """The paper's raw "broken" mask: the silhouette rolled by half the image in both directions.

    On objects that fill much of the image it often lands on the object itself (it removes
    object evidence, so it is no control); the registered ``broken`` hole is
    :func:`masktrain.control_holes.intact_broken_keep`, which leaves the object intact."""
    H, W = objects.shape[-2:]
    return silhouette_keep(torch.roll(objects, shifts=(H // 2, W // 2), dims=(2, 3)))


CONTROL_HOLES: Registry[Callable[[Tensor], Tensor]] = Registry("control hole", "probe_options.mask_only.kinds")
CONTROL_HOLES.register("silhouette", silhouette_keep)
#: The shape-free headline control: a disk of the object's exact area at its centroid.
CONTROL_HOLES.register("area_disk", area_matched_disk)
CONTROL_HOLES.register("bbox", bbox_keep)
CONTROL_HOLES.register("enclosing_disk", enclosing_disk)
#: The paper's rolled silhouette, made a control: the least-overlapping roll, object kept intact.
CONTROL_HOLES.register("broken", intact_broken_keep)
#: The paper's raw roll (can remove the object itself; for comparison with the paper only).
CONTROL_HOLES.register("broken_rolled", broken_keep)

# --- donors: class-neutral content, built for all N rows once and cached -------------

DonorFn = Callable[[ProbeContext], Tensor]
DONORS: Registry[DonorFn] = Registry("donor", "probe_options.shape_only.donors")


def register_donor(name: str) -> Callable[[DonorFn], DonorFn]:
    return DONORS.register(name)


@register_donor("grey")
def grey_donor(ctx: ProbeContext) -> Tensor:
    """Constant dataset mean colour."""
    N = ctx.images.shape[0]
    colour = torch.tensor(ctx.mean, dtype=torch.float32).view(1, 3, 1, 1)
    return colour.expand(N, 3, *ctx.size)


@register_donor("noise")
def noise_donor(ctx: ProbeContext) -> Tensor:
    """Uniform per-pixel noise (mean 0.5), one fixed draw per row (seeded per row)."""
    rows = torch.arange(ctx.images.shape[0])
    return ctx.random("donor", "noise", rows, "cpu").rand(ctx.images.shape)


@register_donor("background")
def background_donor(ctx: ProbeContext) -> Tensor:
    """Another image's background without its object (datasets that can render it): row ``i`` gets
    the background of a random row ``j ≠ i`` (:func:`other_row`, seeded per row).

    Not the row's own background: on the ``correct`` subset the row is selected by the model's answer
    on image ``i``, and a donor that keeps image ``i``'s background would carry whatever the model read
    there into the shape-only input (a background reader then scores above chance on that subset).
    With another image's background the donor is independent of the image that selects the row, and
    the input differs from ``object_removal``'s silhouette arm (which keeps the row's own background)."""
    own = own_backgrounds(ctx)
    check_background(ctx.images, ctx.require_objects("donor 'background'"), own)
    rows = torch.arange(own.shape[0])
    return own[other_row(own.shape[0], ctx.random("donor", "background_row", rows, "cpu"))]


def other_row(n: int, random: SampleRandom) -> Tensor:
    """For each of ``n`` rows a uniformly random other row ``(n,)`` int64 (itself only when n = 1)."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    r = rng.randint(random, 0, n - 1, (n, 1), device="cpu")[:, 0]
    return r + (r >= torch.arange(n)).long()


def own_backgrounds(ctx: ProbeContext) -> Tensor:
    """Each row's own background without its object ``(N, 3, H, W)`` (datasets that can render it)."""
    ds, idx = ctx.dataset, ctx.dataset_indices
    render = getattr(ds, "background", None)
    if render is None and _is_shapes(ds):
        render = lambda i: shapes_background(ds, i)  # noqa: E731
    if render is None or idx is None:
        raise UserError(
            f"donor 'background' needs a dataset that renders backgrounds without the object "
            f"({type(ds).__name__} does not); use probe_options.shape_only.donors=[grey,noise]"
        )
    return torch.stack([torch.as_tensor(render(int(i)), dtype=torch.float32) for i in idx.tolist()])


def _is_shapes(ds) -> bool:
    from masktrain.data.shapes import ShapesDataset

    return isinstance(ds, ShapesDataset)


def shapes_background(ds, index: int) -> Tensor:
    """Re-render sample ``index``'s background by replaying its random stream up to the background draw.

    Mirrors the draw order of ``ShapesDataset.sample``; :func:`check_background` verifies it
    against real samples so a change there fails loudly instead of silently.
    """
    rng = ds._rng(index)
    rng.integers(ds.num_classes)
    r = rng.uniform(*ds.radius)
    rng.uniform(r, 1 - r, size=2)
    rng.uniform(0, 2 * np.pi)
    return torch.from_numpy(np.ascontiguousarray(ds._background(rng)))


def check_background(images: Tensor, objects: Tensor, backgrounds: Tensor) -> None:
    """The rendered backgrounds must equal the images wherever there is no object."""
    outside = objects < 0.5
    err = ((images - backgrounds).abs() * outside).amax()
    if float(err) > 1e-4:
        raise RuntimeError(f"background donors do not match the images outside the object (max error {float(err):.3g}); "
                           f"ShapesDataset changed its draw order, update masktrain.probes.inputs.shapes_background")


def other_class_partner(labels: Tensor, random: SampleRandom, tries: int = 64) -> Tensor:
    """For each row, a random row whose label differs: ``(N,)`` int64 (same label only if no other exists).

    ``random``: per-row randomness for the N rows (row i's partner depends on row i's key only)."""
    N = labels.shape[0]
    cand = rng.randint(random, 0, N, (N, tries), device="cpu")
    differs = labels[cand] != labels[:, None]
    first = torch.where(differs.any(dim=1), differs.float().argmax(dim=1), torch.zeros(N, dtype=torch.long))
    return cand.gather(1, first[:, None]).squeeze(1)


def fill_contrast(method, donors: Tensor, keep: Tensor, generator) -> tuple[Tensor, Tensor]:
    """How visible the fill is on its donor, per sample, over the removed pixels.

    Returns ``(contrast (B,), pixel_diff (B,))``: contrast = mean over channels of
    |mean(fill) − mean(donor)| + |std(fill) − std(donor)| — a distribution difference,
    so noise filled into noise scores ~0 although pixels differ; pixel_diff = mean |fill − donor|.
    NaN for methods with no pixel fill (e.g. layer masking, which reads no removed pixel).
    """
    B = donors.shape[0]
    apply = getattr(method, "apply", None)
    if apply is None:
        nan = torch.full((B,), float("nan"))
        return nan, nan.clone()
    filled = apply(donors, keep, generator)
    removed = (1 - keep).expand_as(donors)
    count = removed.sum(dim=(2, 3)).clamp_min(1)

    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        m = (x * removed).sum(dim=(2, 3)) / count
        v = (((x - m[..., None, None]) ** 2) * removed).sum(dim=(2, 3)) / count
        return m, v.sqrt()

    mf, sf = moments(filled)
    md, sd = moments(donors)
    contrast = ((mf - md).abs() + (sf - sd).abs()).mean(dim=1)
    pixel = ((filled - donors).abs() * removed).sum(dim=(1, 2, 3)) / count.sum(dim=1)
    return contrast.cpu(), pixel.cpu()
