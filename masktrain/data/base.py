"""What every on-disk dataset shares: a list of entries, splits, ``limit``, ``skip_bad``, and
the joint transform.

A subclass turns its annotation format into :class:`Entry` objects (cheap checks only:
files exist, lists parse) and says how to read one entry's object mask. This class then

- orders candidates by a fixed hash of their key, so ``limit=N`` takes a class-mixed,
  reproducible first N;
- with ``skip_bad=True`` decodes every kept sample once at construction, so a corrupt or
  mis-sized file is skipped, listed in :attr:`skipped` and logged once, instead of failing
  in the middle of training; with ``skip_bad=False`` the first bad file raises a UserError
  naming it (at construction for missing files, at load time for undecodable ones);
- yields ``(image (3, S, S) float [0, 1], label int, object_mask (1, S, S) float {0, 1})``
  with S = ``image_size``, image and mask transformed together.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch.utils.data import Dataset

from masktrain.data.io import open_image, stable_fraction
from masktrain.data.transforms import apply_joint, joint_transform
from masktrain.errors import UserError, check

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
C = TypeVar("C")


@dataclass(frozen=True)
class Entry:
    """One sample on disk: the image file, its label, and what the subclass needs to read its
    object mask (a path, an instance id, an annotation …)."""

    image: Path
    label: int
    mask: Any


def in_holdout(key: str, fraction: float) -> bool:
    """Whether ``key`` falls in the held-out ``fraction`` (the val part of a train list)."""
    return stable_fraction("holdout:" + key) < fraction


class MaskedImageDataset(Dataset):
    """Base class; subclasses set :attr:`classes`, call :meth:`_collect`, and implement
    :meth:`read_mask`.

    Attributes:
        classes: class names; ``label`` indexes this list (or a model's outputs, see
            ``FolderDataset.class_index_file``).
        num_classes: number of labels a model needs.
        entries: the samples of this split, in order.
        skipped: one line per skipped bad sample (``skip_bad=True``), each naming the file.
    """

    dataset_name = "dataset"
    #: True when labels index a larger model's outputs (``class_index_file``): a configured
    #: ``data.num_classes`` then needs only to exceed every label, not equal the class count.
    labels_index_larger_model = False

    def __init__(self, split: str, image_size: int = 224, crop_scale: tuple[float, float] = (0.5, 1.0),
                 limit: int | None = None, skip_bad: bool = False) -> None:
        check(split in SPLITS, f"data split {split!r} is unknown; choose one of {list(SPLITS)}")
        check(int(image_size) >= 8, f"data.dataset.image_size={image_size} must be at least 8")
        check(limit is None or int(limit) >= 1, f"data.dataset.limit={limit} must be a positive number of samples (or null)")
        scale = tuple(float(s) for s in crop_scale)
        check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
              f"data.dataset.crop_scale={list(crop_scale)} must be [min, max] with 0 < min <= max <= 1")
        self.split, self.image_size = split, int(image_size)
        self.limit = int(limit) if limit else None
        self.skip_bad = bool(skip_bad)
        self.transform = joint_transform(split, self.image_size, scale)
        self.classes: list[str] = []
        self.entries: list[Entry] = []
        self.skipped: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- subclass hooks -------------------------------------------------------------------
    def read_mask(self, entry: Entry, size: tuple[int, int]) -> torch.Tensor:
        """The object mask of ``entry`` as float ``(1, H, W)`` in {0, 1}; ``size`` is the
        image's ``(H, W)`` and a mask of another size must raise UserError."""
        raise NotImplementedError

    # -- building -------------------------------------------------------------------------
    def _collect(self, candidates: Iterable[C], key: Callable[[C], str], make: Callable[[C], Entry | None]) -> None:
        """Fill :attr:`entries` from ``candidates`` (already restricted to this split).

        ``make`` turns a candidate into an Entry (raising UserError for a bad one, returning
        None for one the dataset filters out by design); candidates are visited in the
        fixed order of ``stable_fraction(key)`` until ``limit`` entries are kept.
        """
        ordered = sorted(candidates, key=lambda c: (stable_fraction(key(c)), key(c)))
        for candidate in ordered:
            if self.limit is not None and len(self.entries) >= self.limit:
                break
            try:
                entry = make(candidate)
                if entry is not None and self.skip_bad:
                    self.load(entry)  # decode now, so bad files never reach training
            except UserError as exc:
                if not self.skip_bad:
                    raise
                self.skipped.append(str(exc))
                continue
            if entry is not None:
                self.entries.append(entry)
        if self.skipped:
            log.warning("%s %s: skipped %d bad sample(s) (skip_bad=true); first: %s", self.dataset_name, self.split,
                        len(self.skipped), self.skipped[0])
        if not self.entries:
            notes = [f"{len(self.skipped)} skipped as bad"] if self.skipped else []
            if getattr(self, "skipped_small", 0):
                notes.append(f"{self.skipped_small} below min_object_fraction")
            raise UserError(f"data={self.dataset_name} split {self.split!r} has no samples"
                            f"{' (' + ', '.join(notes) + ')' if notes else ''}; check data.root and the split options")

    # -- access ---------------------------------------------------------------------------
    def load(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
        """``entry`` as read from disk, untransformed: image ``(3, H, W)``, mask ``(1, H, W)``."""
        image = open_image(entry.image)
        return image, self.read_mask(entry, tuple(image.shape[-2:]))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        entry = self.entries[index]
        image, mask = self.load(entry)
        image, mask = apply_joint(self.transform, image, mask)
        return image, entry.label, mask

    def summary(self) -> str:
        """One line for logs: sizes and what was skipped."""
        extra = f", {len(self.skipped)} bad skipped" if self.skipped else ""
        return f"{self.dataset_name} {self.split}: {len(self)} samples, {self.num_classes} classes{extra}"
