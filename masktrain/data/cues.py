"""The study dataset: class evidence in the object's content *and* its outline.

Each sample is ``(image (3, H, W) float [0, 1], label int, object_mask (1, H, W) float {0, 1})``,
generated on the fly and deterministic from ``(seed, split, index)`` like ``data=silhouettes``
(:mod:`masktrain.data.shapes`): smooth class-independent colour noise as background, one
object at random scale, rotation and position.

Two cues, each shared by two classes, so that neither alone decides the class:

- **outline**: one of K shapes (:data:`OUTLINES`; the disk is not among them: it is the
  class-neutral outline, and the shape of the area-matched control hole);
- **content**: one of K sinusoidal gratings (``ceil(K/2)`` orientations × 2 periods) in two
  random contrasting colours, random phase — the colours carry no class information.

Class ``k`` is drawn as one of two variants, (outline ``k``, texture ``k``) or
(outline ``k+1``, texture ``k+2``) (mod K). Outline ``j`` therefore belongs to classes
{j, j−1} and texture ``m`` to {m, m−2}; the 2K (outline, texture) pairs are distinct, so
the pair decides the class while each cue alone narrows it to two. A model that reaches
high clean accuracy must read both (a one-cue model is capped at 50%), and an object whose
outline is filled with class-neutral content — a silhouette hole — is *not* an ordinary
object of the task: it carries half the class evidence and none of its texture.

Variants (``variant=`` or the factory's split names) re-render the *test* samples — the
same label, variant, position, scale, rotation, colours and background — with one cue
changed, for cue analysis (:mod:`masktrain.data.cue_eval`):

- ``content_only``: the class texture inside a class-neutral outline (a disk of the
  same radius);
- ``outline_only``: the class outline filled with one solid colour (no texture);
- ``cue_conflict``: the texture of the sample's class A inside an outline of another
  class B, chosen so that the outline's two classes and the texture's two classes are
  disjoint. ``label`` is A (the content class); :meth:`CuesDataset.cues` gives both.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from masktrain.data.shapes import SHAPES, SPLITS, background_grid, shape_masks, upsample_backgrounds
from masktrain.errors import check, check_range

#: Class outlines, in class order (the disk, ellipse, hexagon and semicircle are left out:
#: the disk is the neutral outline and the others are too close to it).
OUTLINES: list[str] = ["triangle", "star", "cross", "crescent", "ring", "heart", "L", "arrow", "T", "hourglass", "star4", "square"]
NEUTRAL_OUTLINE = "disk"
VARIANTS = ("clean", "content_only", "outline_only", "cue_conflict")
#: Factory split names that render the test split with a cue variant.
CUE_SPLITS = VARIANTS[1:]
#: Most bytes of rendered val/test batches a dataset keeps (:meth:`CuesDataset.__getitems__`).
EVAL_CACHE_BYTES = 256 * 2**20


def class_cues(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The (outline, texture) index of each class variant: two ``(K, 2)`` int arrays,
    ``outline[k, v]`` and ``texture[k, v]`` for class ``k``, variant ``v``."""
    k = np.arange(num_classes)
    outline = np.stack([k, (k + 1) % num_classes], axis=1)
    texture = np.stack([k, (k + 2) % num_classes], axis=1)
    return outline, texture


def classes_with_outline(num_classes: int) -> np.ndarray:
    """``(K, K)`` bool: entry ``[j, c]`` is True when outline ``j`` belongs to class ``c``."""
    outline, _ = class_cues(num_classes)
    table = np.zeros((num_classes, num_classes), dtype=bool)
    for v in range(2):
        table[outline[:, v], np.arange(num_classes)] = True
    return table


def classes_with_texture(num_classes: int) -> np.ndarray:
    """``(K, K)`` bool: entry ``[m, c]`` is True when texture ``m`` belongs to class ``c``."""
    _, texture = class_cues(num_classes)
    table = np.zeros((num_classes, num_classes), dtype=bool)
    for v in range(2):
        table[texture[:, v], np.arange(num_classes)] = True
    return table


class CuesDataset(torch.utils.data.Dataset):
    """Objects whose class is carried jointly by outline and texture (module docstring).

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint random streams).
        variant: ``clean`` or one of :data:`CUE_SPLITS` (cue analysis; any split, usually test).
        num_classes: K, 5 ≤ K ≤ len(OUTLINES) (below 5 an outline's and a texture's class pairs always overlap, so no clean cue conflict exists); class k is named after its two outlines, ``"<outline k>/<outline k+1>"`` (e.g. ``cross/crescent``), so a figure's label matches either shape drawn.
        radius: object radius range as a fraction of the side.
        min_contrast: minimum RGB distance between the object's mean colour and the background under it.
        texture_contrast: minimum RGB distance between the grating's two colours.
        periods: the two grating periods, as fractions of the side.
        epoch: train samples are fresh every epoch (``set_epoch``); val/test ignore it.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 8000,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        variant: str = "clean",
        radius: tuple[float, float] = (0.32, 0.45),
        min_contrast: float = 0.3,
        texture_contrast: float = 0.5,
        periods: tuple[float, float] = (0.125, 0.25),
        background_cells: int = 4,
        epoch: int = 0,
    ) -> None:
        check(split in SPLITS, f"data split {split!r} is unknown; choose one of {list(SPLITS)}")
        check(variant in VARIANTS, f"data.dataset.variant={variant!r} is unknown; choose one of {list(VARIANTS)}")
        check(5 <= num_classes <= len(OUTLINES), f"data.num_classes={num_classes} must be between 5 and {len(OUTLINES)} for the cues dataset")
        check(length >= 1, f"dataset length {length} must be positive")
        check(image_size >= 8, f"data.image_size={image_size} must be at least 8")
        check_range("data.radius", tuple(radius), 0.0, 0.5, lo_open=True)
        check_range("data.texture_contrast", texture_contrast, 0.0, 1.5)
        check(len(periods) == 2 and all(p > 0 for p in periods), f"data.periods={list(periods)} must be two positive fractions of the side")
        self.split, self.variant, self.length, self.image_size = split, variant, int(length), int(image_size)
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.radius, self.min_contrast = (float(radius[0]), float(radius[1])), float(min_contrast)
        self.texture_contrast, self.periods = float(texture_contrast), (float(periods[0]), float(periods[1]))
        self.background_cells, self.epoch = int(background_cells), int(epoch)
        self.outlines = OUTLINES[: self.num_classes]
        self.classes = [f"{self.outlines[k]}/{self.outlines[(k + 1) % self.num_classes]}" for k in range(self.num_classes)]
        self._outline_of, self._texture_of = class_cues(self.num_classes)
        self._outline_classes = classes_with_outline(self.num_classes)
        self._texture_classes = classes_with_texture(self.num_classes)
        n = self.image_size
        centres = (np.arange(n) + 0.5) / n
        self._gy, self._gx = np.meshgrid(centres, centres, indexing="ij")
        # Rendered val/test batches by their index tuple: those splits do not change with the epoch,
        # and the trainer fetches the same validation batches every epoch.
        self._eval_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._eval_cache_bytes = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        epoch = self.epoch if self.split == "train" else 0
        key = [self.seed, SPLITS[self.split], epoch, index]
        return np.random.default_rng(key + [stream] if stream else key)

    def texture(self, texture: int, phase: float) -> np.ndarray:
        """Grating ``texture`` as a pattern ``(H, W)`` in [0, 1]: orientation ``π·(m // 2) / ceil(K/2)``,
        period ``periods[m % 2]`` (fractions of the side), phase in cycles."""
        n_orient = math.ceil(self.num_classes / 2)
        angle = math.pi * (texture // 2) / n_orient
        period = self.periods[texture % 2]
        t = (self._gx * math.cos(angle) + self._gy * math.sin(angle)) / period + phase
        return (0.5 + 0.5 * np.sin(2 * math.pi * t)).astype(np.float32)

    def _draw(self, index: int, upsample: bool = True) -> dict:
        """Every random choice of sample ``index`` (the variants re-render these). ``upsample=False``
        leaves ``bg`` as None and the background's grid in ``grid`` (the batch upsamples all at once)."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        label = int(rng.integers(self.num_classes))
        variant = int(rng.integers(2))
        r = rng.uniform(*self.radius)
        cx, cy = rng.uniform(r, 1 - r, size=2)
        theta = rng.uniform(0, 2 * math.pi)
        grid = background_grid(rng, self.background_cells)
        phase = rng.random()
        bg = upsample_backgrounds(grid, self.image_size)[0] if upsample else None
        return {"rng": rng, "label": label, "outline": int(self._outline_of[label, variant]),
                "texture": int(self._texture_of[label, variant]), "r": r, "cx": cx, "cy": cy,
                "theta": theta, "grid": grid, "bg": bg, "phase": phase}

    def _conflict_outline(self, index: int, label: int, texture: int) -> tuple[int, int]:
        """``(outline, outline class B)`` for the cue-conflict variant: an outline of a class B ≠ A
        whose classes are disjoint from the texture's (a separate stream: the other draws are unchanged)."""
        rng = self._rng(index, stream=1)
        tex_classes = self._texture_classes[texture]
        for _ in range(256):
            other = int(rng.integers(self.num_classes))
            outline = int(self._outline_of[other, int(rng.integers(2))])
            if other != label and not (self._outline_classes[outline] & tex_classes).any():
                return outline, other
        raise RuntimeError("no disjoint conflict outline found")  # cannot happen for K >= 5

    def _mask(self, d: dict, shape: str) -> np.ndarray:
        du, dv = (self._gx - d["cx"]) / d["r"], (self._gy - d["cy"]) / d["r"]
        c, s = math.cos(d["theta"]), math.sin(d["theta"])
        u, v = c * du + s * dv, -s * du + c * dv
        return SHAPES[shape](u, v).astype(np.float32)

    def _masks(self, draws: list[dict], shapes: list[str]) -> np.ndarray:
        """:meth:`_mask` of a batch, ``(B, H, W)`` float32: the same elementwise operations in the
        same order on ``(B, H, W)`` arrays, so each row has the bits of its own :meth:`_mask`
        (cos/sin stay per-sample Python scalars: numpy's vector sin may round differently)."""
        col = lambda key: np.array([d[key] for d in draws], dtype=np.float64)[:, None, None]
        cx, cy, r = col("cx"), col("cy"), col("r")
        c = np.array([math.cos(d["theta"]) for d in draws])[:, None, None]
        s = np.array([math.sin(d["theta"]) for d in draws])[:, None, None]
        # In place (same operations, same order, fewer (B, H, W) temporaries: half the time).
        du = np.subtract(self._gx, cx)
        du /= r
        dv = np.subtract(self._gy, cy)
        dv /= r
        u = c * du
        u += s * dv
        v = -s * du
        v += c * dv
        return shape_masks(shapes, u, v).astype(np.float32)

    def _colours(self, rng: np.random.Generator, under: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The grating's two colours ``(3,)`` float32: redrawn until they contrast with each other
        and their mean with ``under`` (the background's mean colour under the clean object)."""
        for _ in range(64):
            c1, c2 = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
            if np.linalg.norm(c1 - c2) >= self.texture_contrast and np.linalg.norm((c1 + c2) / 2 - under) >= self.min_contrast:
                break
        return c1, c2

    def _cues_of(self, index: int, d: dict) -> dict:
        label, outline, texture = d["label"], d["outline"], d["texture"]
        outline_class, content_class = label, label
        if self.variant == "content_only":
            outline, outline_class = None, None
        elif self.variant == "outline_only":
            texture, content_class = None, None
        elif self.variant == "cue_conflict":
            outline, outline_class = self._conflict_outline(index, label, texture)
        return {"label": label, "outline": outline, "texture": texture, "outline_class": outline_class, "content_class": content_class}

    def cues(self, index: int) -> dict:
        """The cues of sample ``index`` as rendered by this dataset's variant:
        ``{"label", "outline", "texture", "outline_class", "content_class"}`` — outline/texture are
        cue indices (``None`` when neutral), ``outline_class``/``content_class`` the class whose
        cue it is (B and A in ``cue_conflict``; equal to ``label`` otherwise, ``None`` when neutral)."""
        return self._cues_of(index, self._draw(index, upsample=False))

    def _shape_of(self, cue: dict) -> str:
        return NEUTRAL_OUTLINE if cue["outline"] is None else self.outlines[cue["outline"]]

    def _render(self, index: int, with_object: bool = True) -> tuple[np.ndarray, int, np.ndarray]:
        """One sample, rendered alone: the reference :meth:`render_batch` must match bit for bit."""
        d = self._draw(index)
        rng, bg = d["rng"], d["bg"]
        cue = self._cues_of(index, d)
        # The colours are drawn against the *clean* mask so every variant of a sample has the same colours.
        clean = self._mask(d, self.outlines[d["outline"]])
        under = (bg * clean).sum(axis=(1, 2)) / max(clean.sum(), 1.0)
        c1, c2 = self._colours(rng, under)
        mask = self._mask(d, self._shape_of(cue))
        if not with_object:
            return bg, d["label"], mask
        if cue["texture"] is None:
            obj = np.broadcast_to(((c1 + c2) / 2)[:, None, None], bg.shape)
        else:
            g = self.texture(cue["texture"], d["phase"])[None]
            obj = c1[:, None, None] * (1 - g) + c2[:, None, None] * g
        image = bg * (1 - mask) + obj * mask
        return image, d["label"], mask

    def render_batch(self, indices: Sequence[int], with_object: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples ``indices`` rendered together: images ``(B, 3, H, W)`` float32, labels ``(B,)``
        int64, object masks ``(B, H, W)`` float32 — row ``i`` bit-identical to ``_render(indices[i])``.

        Every random draw still comes from the sample's own generator, in the same order; the
        pixel work (background upsampling, outline tests, gratings, compositing) runs once over
        the batch. The background's mean colour under the object (which decides the colour
        redraws) is summed per sample, as in :meth:`_render`, so its rounding cannot differ.
        """
        indices = [int(i) for i in indices]
        draws = [self._draw(i, upsample=False) for i in indices]
        cues = [self._cues_of(i, d) for i, d in zip(indices, draws)]
        labels = np.array([d["label"] for d in draws], dtype=np.int64)
        bg = upsample_backgrounds(np.concatenate([d["grid"] for d in draws]), self.image_size)
        clean_shapes = [self.outlines[d["outline"]] for d in draws]
        shapes = [self._shape_of(c) for c in cues]
        clean = self._masks(draws, clean_shapes)
        mask = clean if shapes == clean_shapes else self._masks(draws, shapes)
        c1 = np.empty((len(draws), 3), dtype=np.float32)
        c2 = np.empty_like(c1)
        for i, d in enumerate(draws):
            under = (bg[i] * clean[i]).sum(axis=(1, 2)) / max(clean[i].sum(), 1.0)
            c1[i], c2[i] = self._colours(d["rng"], under)
        if not with_object:
            return bg, labels, mask
        obj = np.empty_like(bg)
        textured = np.array([c["texture"] is not None for c in cues])
        if (~textured).any():
            obj[~textured] = ((c1[~textured] + c2[~textured]) / 2)[:, :, None, None]
        if textured.any():
            rows = np.flatnonzero(textured)
            g = self._textures([cues[i]["texture"] for i in rows], [draws[i]["phase"] for i in rows])[:, None]
            obj[rows] = c1[rows, :, None, None] * (1 - g) + c2[rows, :, None, None] * g
        m = mask[:, None]
        return bg * (1 - m) + obj * m, labels, mask

    def _textures(self, textures: list[int], phases: list[float]) -> np.ndarray:
        """:meth:`texture` of a batch, ``(B, H, W)``; angles' cos/sin per sample as there."""
        n_orient = math.ceil(self.num_classes / 2)
        angles = [math.pi * (m // 2) / n_orient for m in textures]
        ca = np.array([math.cos(a) for a in angles])[:, None, None]
        sa = np.array([math.sin(a) for a in angles])[:, None, None]
        period = np.array([self.periods[m % 2] for m in textures])[:, None, None]
        phase = np.array(phases, dtype=np.float64)[:, None, None]
        t = self._gx * ca  # in place, in texture()'s order: ((gx·cos + gy·sin) / period + phase) · 2π
        t += self._gy * sa
        t /= period
        t += phase
        t *= 2 * math.pi
        np.sin(t, out=t)
        t *= 0.5
        t += 0.5
        return t.astype(np.float32)

    def sample(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        image, label, mask = self._render(index)
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), label, torch.from_numpy(mask[None])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.sample(index)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """The DataLoader's batched fetch (torch calls it when a dataset defines it): the samples
        ``[self[i] for i in indices]``, bit for bit, rendered as one batch (:meth:`render_batch`);
        a list of ``(image, label, mask)`` as the default collate expects. A subclass that
        renders samples its own way (overrides ``__getitem__`` or ``sample``) is fetched one by one."""
        if type(self).__getitem__ is not CuesDataset.__getitem__ or type(self).sample is not CuesDataset.sample:
            return [self[i] for i in indices]
        images, labels, masks = self._rendered(indices)
        images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        masks = torch.from_numpy(np.ascontiguousarray(masks[:, None]))
        return [(images[i], int(labels[i]), masks[i]) for i in range(len(labels))]

    def _rendered(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`render_batch` of ``indices``; val/test batches come from a cache after their first
        fetch (up to :data:`EVAL_CACHE_BYTES`), as copies, so a caller that writes into a batch
        cannot change a later one. Train batches are fresh every epoch and never cached."""
        if self.split == "train":
            return self.render_batch(indices)
        key = tuple(int(i) for i in indices)
        hit = self._eval_cache.get(key)
        if hit is None:
            hit = self.render_batch(key)
            size = sum(a.nbytes for a in hit)
            if self._eval_cache_bytes + size > EVAL_CACHE_BYTES:
                return hit
            self._eval_cache[key] = hit
            self._eval_cache_bytes += size
        return tuple(a.copy() for a in hit)

    def background(self, index: int) -> torch.Tensor:
        """Sample ``index``'s background without its object ``(3, H, W)`` (the probes' ``background`` donor)."""
        bg, _, _ = self._render(index, with_object=False)
        return torch.from_numpy(np.ascontiguousarray(bg, dtype=np.float32))

    def backgrounds(self, indices: Sequence[int]) -> torch.Tensor:
        """:meth:`background` of many samples at once, ``(B, 3, H, W)``, bit-identical per row."""
        bg, _, _ = self.render_batch(indices, with_object=False)
        return torch.from_numpy(np.ascontiguousarray(bg, dtype=np.float32))

    def outline_classes(self, outline: int) -> np.ndarray:
        """``(K,)`` bool: the classes outline ``outline`` belongs to."""
        return self._outline_classes[outline]

    def texture_classes(self, texture: int) -> np.ndarray:
        """``(K,)`` bool: the classes texture ``texture`` belongs to."""
        return self._texture_classes[texture]


def cues(split: str, lengths: dict[str, int] | None = None, root: str | None = None, **kwargs) -> CuesDataset:
    """Dataset factory used by the datamodule: ``lengths`` maps split name to sample count;
    the split names ``content_only``, ``outline_only``, ``cue_conflict`` give that variant of
    the test split (``lengths`` entry of the same name, else the test length). ``root`` is
    accepted and ignored: the data is generated."""
    lengths = dict(lengths or {"train": 8000, "val": 1000, "test": 2000})
    if split in CUE_SPLITS:
        check(kwargs.get("variant", "clean") == "clean", f"split {split!r} is a variant already; leave data.dataset.variant unset")
        kwargs["variant"] = split
        length = lengths.get(split, lengths.get("test"))
        split = "test"
    else:
        check(split in lengths, f"data.dataset.lengths has no entry for split {split!r}")
        length = lengths[split]
    check(length is not None, "data.dataset.lengths has no test entry for the cue splits")
    return CuesDataset(split=split, length=int(length), **kwargs)
