"""Built-in synthetic dataset: the class is carried by the object's silhouette.

Each sample is ``(image (3, H, W) float [0, 1], label int, object_mask (1, H, W) float {0, 1})``,
generated on the fly and deterministic from ``(seed, split, index)``. The background is
smooth colour noise independent of the class; the object has one random solid colour
(redrawn until it contrasts with the background under it), random scale, rotation and
position. ``texture_reliability`` puts the class's own stripe texture on that share of
objects (the others get a random class's texture) for cue-competition studies.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from masktrain.errors import UserError, check, check_range

# Inside-tests in canonical coordinates (u, v) in [-1, 1]², v pointing down. Each shape
# must look different under every rotation (no square + diamond pair).
Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polygon(points: list[tuple[float, float]]) -> Shape:
    pts = np.asarray(points, dtype=np.float64)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        # Even-odd ray casting, vectorised over pixels.
        result = np.zeros(u.shape, dtype=bool)
        n = len(pts)
        for i in range(n):
            (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % n]
            crosses = (y1 > v) != (y2 > v)
            x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
            result ^= crosses & (u < x_at)
        return result

    return inside


def _star(points: int = 5, inner: float = 0.45) -> Shape:
    vertices = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = math.pi * i / points - math.pi / 2
        vertices.append((r * math.cos(a), r * math.sin(a)))
    return _polygon(vertices)


SHAPES: dict[str, Shape] = {
    "disk": lambda u, v: u**2 + v**2 <= 0.85,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.72,
    "triangle": _polygon([(0.0, -0.95), (0.95, 0.7), (-0.95, 0.7)]),
    "star": _star(5, 0.45),
    "cross": lambda u, v: ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.95)),
    "crescent": lambda u, v: (u**2 + v**2 <= 0.9) & ((u - 0.45) ** 2 + v**2 > 0.5),
    "ring": lambda u, v: (u**2 + v**2 <= 0.95) & (u**2 + v**2 >= 0.3),
    "heart": lambda u, v: (((1.15 * u) ** 2 + (-1.15 * v + 0.1) ** 2 - 1) ** 3 - (1.15 * u) ** 2 * (-1.15 * v + 0.1) ** 3) <= 0,
    "L": lambda u, v: ((u >= -0.75) & (u <= -0.2) & (np.abs(v) <= 0.9)) | ((u >= -0.75) & (u <= 0.75) & (v >= 0.35) & (v <= 0.9)),
    "arrow": lambda u, v: ((u >= -0.95) & (u <= 0.15) & (np.abs(v) <= 0.22)) | ((u > 0.15) & (u <= 0.95) & (np.abs(v) <= 0.75 * (0.95 - u) / 0.8)),
    "hexagon": _polygon([(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]),
    "T": lambda u, v: ((np.abs(u) <= 0.9) & (v >= -0.9) & (v <= -0.4)) | ((np.abs(u) <= 0.25) & (v >= -0.9) & (v <= 0.9)),
    "hourglass": _polygon([(-0.8, -0.9), (0.8, -0.9), (0.08, 0.0), (0.8, 0.9), (-0.8, 0.9), (-0.08, 0.0)]),
    "semicircle": lambda u, v: (u**2 + v**2 <= 0.95) & (v >= 0.05),
    "star4": _star(4, 0.35),
    "ellipse": lambda u, v: (u / 0.95) ** 2 + (v / 0.45) ** 2 <= 1,
}

SPLITS = {"train": 0, "val": 1, "test": 2}


def background_grid(rng: np.random.Generator, cells: int) -> np.ndarray:
    """The random part of :func:`smooth_background`: a ``(1, 3, cells, cells)`` float32 grid
    of uniform colours (one ``rng.random`` draw)."""
    return rng.random((1, 3, cells, cells), dtype=np.float32)


def upsample_backgrounds(grids: np.ndarray, size: int) -> np.ndarray:
    """Grids ``(B, 3, cells, cells)`` bicubically upsampled to backgrounds ``(B, 3, size, size)``
    in [0, 1]. Every output pixel depends only on its own grid, so a batch gives each sample
    the same bits as upsampling it alone (tests/test_cues_batched.py checks this)."""
    bg = F.interpolate(torch.from_numpy(grids), size=(size, size), mode="bicubic", align_corners=False).numpy()
    # numpy's clip, not torch's clamp_: the same min/max bits, but no parallel region (a
    # batch is large enough for torch to wake its threads, which costs more than the clip).
    return np.clip(bg, 0, 1, out=bg)


def smooth_background(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Class-independent smooth colour noise ``(3, size, size)`` in [0, 1]: a ``cells``² grid of
    uniform colours, bicubically upsampled (one ``rng.random`` draw)."""
    return upsample_backgrounds(background_grid(rng, cells), size)[0]


def shape_masks(names: list[str], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-tests of a batch: ``names[i]`` evaluated on ``u[i], v[i]`` (``(B, H, W)`` canonical
    coordinates), as bool ``(B, H, W)``. One call per distinct shape over all its samples (the
    tests are elementwise, so each sample's bits equal a call on it alone)."""
    out = np.zeros(u.shape, dtype=bool)
    names_arr = np.asarray(names)
    for name in dict.fromkeys(names):
        rows = np.flatnonzero(names_arr == name)
        out[rows] = SHAPES[name](u[rows], v[rows])
    return out


class ShapesDataset(Dataset):
    """Synthetic silhouettes: K classes, ``length`` samples of ``image_size``² pixels.

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint random streams).
        num_classes: K ≤ len(SHAPES); class k is ``list(SHAPES)[k]``.
        radius: object radius range as a fraction of the side.
        min_contrast: minimum RGB distance between object colour and the background under it.
        texture_reliability: share of objects carrying their class's stripe texture.
        epoch: train samples are fresh every epoch (``set_epoch``); val/test ignore it.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 8000,
        image_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        radius: tuple[float, float] = (0.30, 0.45),
        min_contrast: float = 0.3,
        background_cells: int = 4,
        texture_reliability: float = 0.0,
        epoch: int = 0,
    ) -> None:
        check(split in SPLITS, f"data split {split!r} is unknown; choose one of {list(SPLITS)}")
        check(2 <= num_classes <= len(SHAPES), f"data.num_classes={num_classes} must be between 2 and {len(SHAPES)} for the shapes dataset")
        check(length >= 1, f"dataset length {length} must be positive")
        check(image_size >= 8, f"data.image_size={image_size} must be at least 8")
        check_range("data.texture_reliability", texture_reliability, 0.0, 1.0)
        check_range("data.radius", tuple(radius), 0.0, 0.5, lo_open=True)
        self.split, self.length, self.image_size = split, int(length), int(image_size)
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.radius, self.min_contrast = (float(radius[0]), float(radius[1])), float(min_contrast)
        self.background_cells, self.texture_reliability = int(background_cells), float(texture_reliability)
        self.epoch = int(epoch)
        self.classes = list(SHAPES)[: self.num_classes]
        n = self.image_size
        centres = (np.arange(n) + 0.5) / n
        self._gy, self._gx = np.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        epoch = self.epoch if self.split == "train" else 0
        return np.random.default_rng([self.seed, SPLITS[self.split], epoch, index])

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        return smooth_background(rng, self.image_size, self.background_cells)

    def _texture(self, rng: np.random.Generator, cls: int) -> np.ndarray:
        """Stripes with a class-specific angle and period, as a 0/1 pattern ``(H, W)``."""
        angle = math.pi * cls / self.num_classes
        period = 0.12 + 0.06 * (cls % 3)
        phase = rng.random()
        t = (self._gx * math.cos(angle) + self._gy * math.sin(angle)) / period + phase
        return (np.floor(t) % 2).astype(np.float32)

    def sample(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = self._rng(index)
        label = int(rng.integers(self.num_classes))
        r = rng.uniform(*self.radius)
        cx, cy = rng.uniform(r, 1 - r, size=2)
        theta = rng.uniform(0, 2 * math.pi)
        du, dv = (self._gx - cx) / r, (self._gy - cy) / r
        c, s = math.cos(theta), math.sin(theta)
        u, v = c * du + s * dv, -s * du + c * dv
        mask = SHAPES[self.classes[label]](u, v).astype(np.float32)
        bg = self._background(rng)
        under = (bg * mask).sum(axis=(1, 2)) / max(mask.sum(), 1.0)
        for _ in range(64):
            colour = rng.random(3).astype(np.float32)
            if np.linalg.norm(colour - under) >= self.min_contrast:
                break
        obj = np.broadcast_to(colour[:, None, None], bg.shape)
        if self.texture_reliability > 0:
            informative = rng.random() < self.texture_reliability
            tex_cls = label if informative else int(rng.integers(self.num_classes))
            tex = self._texture(rng, tex_cls)
            obj = obj * (0.55 + 0.45 * tex) + (1 - colour[:, None, None]) * (0.45 * (1 - tex))
        image = bg * (1 - mask) + obj * mask
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), label, torch.from_numpy(mask[None])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.sample(index)


def shapes(split: str, lengths: dict[str, int] | None = None, root: str | None = None, **kwargs) -> ShapesDataset:
    """Dataset factory used by the datamodule: ``lengths`` maps split name to sample count
    (``root`` is accepted and ignored: the data is generated)."""
    lengths = dict(lengths or {"train": 8000, "val": 1000, "test": 2000})
    check(split in lengths, f"data.dataset.lengths has no entry for split {split!r}")
    return ShapesDataset(split=split, length=int(lengths[split]), **kwargs)
