"""Planted models: classifiers whose behaviour is known by construction, to calibrate probes.

Each is a plain deterministic ``nn.Module``, pixel space like every masktrain classifier:
``images (B, 3, H, W) in [0, 1] -> logits (B, K)``, computed from a stated feature of the
input and nothing else (no training; the readers that need class templates are built from
reference object masks drawn from a dataset's *train* split). Ties in the logits resolve to
the lowest class index (``argmax``).

"A hole" below is the set of pixels whose three channels all equal the reader's ``fill``
colour (default black) to within ``tol``: what a constant colour fill (``black``, ``grey``)
leaves (plus, in about 1% of cues images, a few exactly black background pixels where the
clamped background noise saturates). Probe expectations are stated per model for the cues data (``data=cues``:
outline j belongs to classes {j, j−1}, texture m to {m, m−2}; a reader that outputs the cue
index names the class correctly on the variant-0 half of the samples) and use
``object_removal`` (silhouette hole vs. control hole), ``shape_only`` (class-neutral donor
with a silhouette hole; control = another class's silhouette) and ``linear_probe``.

Models: :class:`HoleShapeReader`, :class:`PermutedShapeReader`, :class:`AreaReader`,
:class:`ContextInBoxReader` (with :func:`paint_box_context`), :class:`ContentReader`,
:class:`ConstantModel`, :class:`MemoriserBackgroundReader`, :class:`FillPresenceDetector`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLACK = (0.0, 0.0, 0.0)


def hole_of(images: Tensor, fill: tuple[float, float, float] = BLACK, tol: float = 1e-4) -> Tensor:
    """``(B, 1, H, W)`` float {0, 1}: 1 where every channel equals ``fill`` within ``tol``."""
    colour = torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images - colour).abs() <= tol).all(dim=1, keepdim=True).to(images.dtype)


def outline_descriptor(region: Tensor, radii: int = 16, angles: int = 64, harmonics: int = 10) -> Tensor:
    """Translation-, scale- and rotation-invariant descriptor of binary regions ``(B, 1, H, W)`` -> ``(B, radii·harmonics)``.

    The region is sampled on a polar grid around its centroid, radii up to 1.4·sqrt(area)
    (scale-normalised), and the magnitude of the Fourier transform along the angle (rotation
    invariant) is kept for the first ``harmonics`` frequencies. Empty regions give zeros.
    """
    B, _, H, W = region.shape
    area = region.sum(dim=(1, 2, 3))
    safe = area.clamp_min(1)
    ys = torch.arange(H, dtype=region.dtype, device=region.device).view(1, H, 1)
    xs = torch.arange(W, dtype=region.dtype, device=region.device).view(1, 1, W)
    cy = (region[:, 0] * ys).sum(dim=(1, 2)) / safe
    cx = (region[:, 0] * xs).sum(dim=(1, 2)) / safe
    rho = torch.linspace(0.05, 1.4, radii, dtype=region.dtype, device=region.device).view(1, radii, 1) * safe.sqrt().view(B, 1, 1)
    phi = torch.linspace(0, 2 * math.pi, angles + 1, dtype=region.dtype, device=region.device)[:-1].view(1, 1, angles)
    px = cx.view(B, 1, 1) + rho * torch.cos(phi)
    py = cy.view(B, 1, 1) + rho * torch.sin(phi)
    grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], dim=-1)  # align_corners=False coordinates
    polar = F.grid_sample(region, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]  # (B, R, A)
    spectrum = torch.fft.rfft(polar, dim=-1).abs()[..., :harmonics] / angles
    return (spectrum * (area > 0).view(B, 1, 1)).flatten(1)


def reference_objects(dataset, n: int = 3000) -> tuple[Tensor, Tensor]:
    """Object masks ``(n, 1, H, W)`` and their outline targets ``(n,)`` from ``dataset`` (a train split).

    Target = the outline index for the cues data (``dataset.cues``; the class whose variant 0
    has that outline), the label otherwise (silhouettes: the class is the outline)."""
    masks, targets = [], []
    for i in range(min(n, len(dataset))):
        _, label, mask = dataset[i]
        masks.append(mask)
        targets.append(dataset.cues(i)["outline"] if hasattr(dataset, "cues") else label)
    return torch.stack(masks).float(), torch.tensor(targets, dtype=torch.long)


class HoleShapeReader(nn.Module):
    """Reads ONLY the outline of the hole (the ``fill``-coloured region): nearest-neighbour
    class of its :func:`outline_descriptor` among reference object masks.

    Output: the outline's target (cues: outline j -> class j). No hole: all-zero logits (class 0).
    Expected verdicts — reads shape everywhere the hole's outline is the object's:
    ``shape_only`` toward (accuracy ≈ P(variant 0) ≈ 0.5 on cues, ≈ 1 on silhouettes, control
    ≈ 0, MI high); ``object_removal`` leakage > 0 against the area-matched disk (a disk is no
    class outline) — and also against the bounding box, though there the box's own shape is read;
    ``linear_probe`` above chance. Clean accuracy (no hole) is chance: the shape is read only from holes.
    """

    def __init__(self, ref_objects: Tensor, ref_targets: Tensor, num_classes: int, fill=BLACK, tol: float = 1e-4) -> None:
        super().__init__()
        self.num_classes, self.fill, self.tol = int(num_classes), tuple(fill), float(tol)
        self.register_buffer("ref", outline_descriptor((ref_objects > 0.5).float()))
        self.register_buffer("ref_targets", ref_targets.long())

    def features(self, images: Tensor) -> Tensor:
        return outline_descriptor(hole_of(images, self.fill, self.tol))

    def forward(self, images: Tensor) -> Tensor:
        desc = self.features(images)
        dist = torch.cdist(desc, self.ref)  # (B, N)
        per_class = torch.full((desc.shape[0], self.num_classes), float("inf"), device=desc.device)
        per_class = per_class.scatter_reduce(1, self.ref_targets.expand_as(dist), dist, reduce="amin")
        logits = -per_class
        has_hole = desc.abs().sum(dim=1) > 0
        return torch.where(has_hole[:, None], logits, torch.zeros_like(logits))


class PermutedShapeReader(nn.Module):
    """A :class:`HoleShapeReader` whose outputs are permuted: it predicts ``permutation[c]``
    where the reader predicts ``c`` (default: the derangement c -> c + 1 mod K).

    Expected verdicts: reads shape — ``shape_only`` accuracy ≈ 0 (below chance), MI as high as
    the unpermuted reader's (direction "away"/"other"); ``object_removal`` by accuracy
    ≈ 0 − ≈ 0 (a false negative for accuracy-only verdicts); ``linear_probe`` above chance
    (the features are the reader's)."""

    def __init__(self, reader: HoleShapeReader, permutation: Tensor | None = None) -> None:
        super().__init__()
        self.reader = reader
        k = reader.num_classes
        perm = (torch.arange(k) + 1) % k if permutation is None else permutation.long()
        self.register_buffer("inverse", torch.argsort(perm))

    def features(self, images: Tensor) -> Tensor:
        return self.reader.features(images)

    def forward(self, images: Tensor) -> Tensor:
        # new_logits[:, perm[c]] = logits[:, c]  <=>  new_logits = logits[:, perm^-1]
        return self.reader(images)[:, self.inverse]


class AreaReader(nn.Module):
    """Reads ONLY the hole's pixel area: the class whose mean reference object area is nearest.

    Expected verdicts: does NOT read shape. ``object_removal`` leakage ≈ 0 exactly against the
    area-matched disk (same area -> same prediction), but ≠ 0 against the bounding box (it
    removes 1.3–2.4× the area: a false positive of the bbox control); ``shape_only`` can be above
    chance (area is class-correlated) with the other-class control equally informative about
    the silhouette, so a verdict must not call it a shape reader from accuracy alone."""

    def __init__(self, ref_objects: Tensor, ref_targets: Tensor, num_classes: int, fill=BLACK, tol: float = 1e-4) -> None:
        super().__init__()
        self.num_classes, self.fill, self.tol = int(num_classes), tuple(fill), float(tol)
        area = (ref_objects > 0.5).float().mean(dim=(1, 2, 3))
        means = torch.stack([area[ref_targets == c].mean() for c in range(self.num_classes)])
        self.register_buffer("class_area", means)

    def features(self, images: Tensor) -> Tensor:
        return hole_of(images, self.fill, self.tol).mean(dim=(1, 2, 3))[:, None]

    def forward(self, images: Tensor) -> Tensor:
        return -(self.features(images) - self.class_area[None]).abs()


def class_palette(num_classes: int) -> Tensor:
    """``(K, 3)`` distinct context colours: hues at channel levels in [0.15, 0.85] — never black, and
    not the saturated 0/1 values a clamped background reaches, so plain images never match them."""
    hue = torch.arange(num_classes, dtype=torch.float32) / num_classes
    k = lambda n: (n + hue * 6) % 6  # noqa: E731 - HSV -> RGB with S = V = 1
    rgb = torch.stack([1 - torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1) for n in (5, 3, 1)], dim=1)
    return 0.15 + 0.7 * rgb


def paint_box_context(images: Tensor, objects: Tensor, labels: Tensor, palette: Tensor) -> Tensor:
    """Images whose pixels inside the object's bounding box but outside the object are painted
    in the class colour ``palette[label]`` (class-coloured context next to the object)."""
    from masktrain.probes.inputs import bbox_keep

    box = (bbox_keep(objects) < 0.5) & (objects < 0.5)
    colour = palette[labels].view(-1, 3, 1, 1).to(images)
    return torch.where(box, colour, images)


class ContextInBoxReader(nn.Module):
    """Reads ONLY class-coloured context: logits[c] = share of pixels exactly equal to
    ``palette[c]``. On :func:`paint_box_context` images that context lies inside the bounding
    box, around the object; elsewhere (plain cues images) the logits are 0 (class 0).

    Expected verdicts: does NOT read shape. On painted images: ``object_removal`` with a
    bounding-box control is a false positive (the silhouette hole leaves the context, the box
    removes it: leakage ≈ clean accuracy ≈ 1); against the area-matched disk leakage ≈ 0 (the disk
    removes a little of the context at most). ``shape_only`` on class-neutral donors: chance."""

    def __init__(self, palette: Tensor, tol: float = 1e-4) -> None:
        super().__init__()
        self.register_buffer("palette", palette.float())
        self.tol = float(tol)

    def features(self, images: Tensor) -> Tensor:
        match = ((images[:, None] - self.palette.view(1, -1, 3, 1, 1)).abs() <= self.tol).all(dim=2)  # (B, K, H, W)
        return match.float().mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


class ContentReader(nn.Module):
    """Reads ONLY the object's content: the cues grating whose frequency carries the most
    power in the image (background and constant fills are smooth, so the power is the
    visible texture's). Predicts the texture index m (class m, variant 0).

    Expected verdicts: does NOT read shape. ``shape_only``: chance (donors and fills have no
    grating); ``object_removal``: the silhouette hole removes all texture, the area-matched disk
    can leave some of it visible (a crescent's horns), so leakage ≤ 0 against the disk, ≈ 0
    against the bbox; ``linear_probe``: chance. Clean accuracy ≈ 0.5 (the variant-0 half)."""

    def __init__(self, dataset) -> None:
        super().__init__()
        n, k = dataset.image_size, dataset.num_classes
        n_orient = math.ceil(k / 2)
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        waves = []
        for m in range(k):
            angle = math.pi * (m // 2) / n_orient
            t = 2 * math.pi * (gx * math.cos(angle) + gy * math.sin(angle)) / dataset.periods[m % 2]
            waves.append(torch.polar(torch.ones_like(t), t))
        self.register_buffer("waves", torch.stack(waves).to(torch.complex64))  # (K, H, W)

    def features(self, images: Tensor) -> Tensor:
        centred = (images - images.mean(dim=(2, 3), keepdim=True)).to(torch.complex64)  # (B, 3, H, W)
        proj = torch.einsum("bchw,khw->bck", centred, self.waves.conj())
        return proj.abs().pow(2).sum(dim=1) / images[0, 0].numel()  # (B, K) power per grating

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images).log1p()


class ConstantModel(nn.Module):
    """Input-blind: always class ``cls``.

    Expected verdicts: nothing reads shape, every probe at its null (accuracy = the class's
    share, MI 0, leakage 0, linear probe chance) — any "significant" verdict is a false positive."""

    def __init__(self, num_classes: int, cls: int = 0) -> None:
        super().__init__()
        self.num_classes, self.cls = int(num_classes), int(cls)

    def features(self, images: Tensor) -> Tensor:
        return torch.zeros(images.shape[0], 1, device=images.device)

    def forward(self, images: Tensor) -> Tensor:
        logits = torch.zeros(images.shape[0], self.num_classes, device=images.device)
        logits[:, self.cls] = 1.0
        return logits


def _fingerprint(images: Tensor, projection: Tensor) -> Tensor:
    return images.flatten(1).double() @ projection


def background_class(images: Tensor, num_classes: int) -> Tensor:
    """The class :class:`MemoriserBackgroundReader` reads from the top-left pixel (always
    background in the cues and silhouettes data): ``floor(K · frac(7.31 R + 3.17 G + 1.93 B))``."""
    px = images[:, :, 0, 0].double()
    value = 7.31 * px[:, 0] + 3.17 * px[:, 1] + 1.93 * px[:, 2]
    return (torch.frac(value) * num_classes).long().clamp_(0, num_classes - 1)


class MemoriserBackgroundReader(nn.Module):
    """Input-blind to the object: memorises the labels of ``images`` (exact pixel
    fingerprints — give it half the clean evaluation images) and otherwise predicts
    :func:`background_class`, a function of one background pixel.

    Expected verdicts: does NOT read shape on ``subset: all``; but the clean-correct rows are the
    memorised ones plus those whose background happens to name their class, and the
    ``background`` donor keeps that background, so ``shape_only`` on the ``correct`` subset is a
    false positive (accuracy above ``chance_independent``) unless donors are independent of the
    image that selects the row."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        g = torch.Generator().manual_seed(seed)
        projection = torch.randn(images[0].numel(), 16, generator=g, dtype=torch.float64)
        self.register_buffer("projection", projection)
        self.register_buffer("keys", _fingerprint(images, projection))
        self.register_buffer("labels", labels.long())

    def features(self, images: Tensor) -> Tensor:
        return images[:, :, 0, 0]

    def forward(self, images: Tensor) -> Tensor:
        pred = background_class(images, self.num_classes)
        if self.keys.shape[0]:
            dist, idx = torch.cdist(_fingerprint(images, self.projection), self.keys).min(dim=1)
            pred = torch.where(dist < 1e-6 * self.keys.abs().max(), self.labels[idx], pred)
        return F.one_hot(pred, self.num_classes).float()


class FillPresenceDetector(nn.Module):
    """Detects a fill: when at least ``min_pixels`` pixels have the ``fill`` colour it answers
    ``fill_class``; otherwise it defers to ``base`` (e.g. a :class:`ContentReader`, for clean accuracy).

    Expected verdicts: does NOT read shape — silhouette and control holes both contain a fill,
    so ``object_removal`` leakage = 0 and ``shape_only`` is constant (MI 0, accuracy = the
    class's share); the missingness curve collapses onto ``fill_class`` (top-class share → 1).
    (The cues background is clamped bicubic noise: about 1% of clean images hold a few exactly
    black pixels, at most 13 in 500 test images — hence ``min_pixels = 16``.)"""

    def __init__(self, base: nn.Module, num_classes: int, fill=BLACK, fill_class: int = 0, min_pixels: int = 16, tol: float = 1e-4) -> None:
        super().__init__()
        self.base, self.num_classes = base, int(num_classes)
        self.fill, self.fill_class, self.min_pixels, self.tol = tuple(fill), int(fill_class), int(min_pixels), float(tol)

    def features(self, images: Tensor) -> Tensor:
        return hole_of(images, self.fill, self.tol).sum(dim=(1, 2, 3))[:, None]

    def forward(self, images: Tensor) -> Tensor:
        base = F.one_hot(self.base(images).argmax(dim=1), self.num_classes).float()
        filled = self.features(images)[:, 0] >= self.min_pixels
        constant = F.one_hot(torch.full_like(filled, self.fill_class, dtype=torch.long), self.num_classes).float()
        return torch.where(filled[:, None], constant, base)


def fingerprint_rows(images: Tensor, every: int = 2) -> np.ndarray:
    """Indices of the rows a memoriser is given: every ``every``-th one (half by default)."""
    return np.arange(0, images.shape[0], every)
