"""ImageNet-S / Pixel-ImageNet style folders: ``images/<class>/<name>.<jpg|jpeg|png>`` with
``masks/<class>/<name>.png``.

Masks: any nonzero pixel is object, whatever the file holds: 0/255, 0/1, a class id (grey or
palette PNG), or ImageNet-S's RGB encoding (class id = R + 256 G; a grey RGB file reads as
grey). With ``strict_binary=True`` a mask must hold only 0/1 or only 0/255, so a stray
class-id or anti-aliased mask is reported instead of silently thresholded.

Classes are the sorted folder names; labels are their positions, or the indices given by
``class_index_file`` so an ImageNet-1k model can be probed on a subset of its classes:

- JSON: ``{"<class folder>": <model output index>, ...}``;
- text: one class per line, ``<class folder> <index>``, or just ``<class folder> [anything]``
  (index = 0-based line number, as in ImageNet's ``LOC_synset_mapping.txt``).

Splits are a fixed function of each file's relative path (a hash), so they never change
when files are added elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from masktrain.data.base import Entry, MaskedImageDataset
from masktrain.data.io import read_lines, read_object_mask, require_dir, stable_fraction
from masktrain.errors import UserError, check

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _split_of(relative: str, val_fraction: float, test_fraction: float) -> str:
    u = stable_fraction(relative)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def read_class_index(path: str | Path) -> dict[str, int]:
    """``{class name: model output index}`` from a JSON object or a text list (see module doc)."""
    path = Path(path)
    check(path.is_file(), f"data.dataset.class_index_file={str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
            return {str(k): int(v) for k, v in raw.items()}
        except (ValueError, AttributeError, TypeError) as exc:
            raise UserError(f"data.dataset.class_index_file={str(path)!r} is not a JSON object of class name -> integer index") from exc
    index = {}
    for number, line in enumerate(read_lines(path)):
        parts = line.split()
        explicit = len(parts) == 2 and parts[1].lstrip("-").isdigit()
        index[parts[0]] = int(parts[1]) if explicit else number
    check(index, f"data.dataset.class_index_file={str(path)!r} lists no classes")
    return index


def class_indices(classes: list[str], class_index_file: str | Path | None) -> tuple[dict[str, int], bool]:
    """``({class: label}, labels_index_larger_model)``: labels in folder order, or the model output
    indices of ``class_index_file`` (an ImageNet-1k model on a subset: labels index a larger head)."""
    if not class_index_file:
        return {c: i for i, c in enumerate(classes)}, False
    index = read_class_index(class_index_file)
    unknown = [c for c in classes if c not in index]
    check(not unknown, f"classes {unknown[:5]} are missing from data.dataset.class_index_file={str(class_index_file)!r}")
    return {c: index[c] for c in classes}, True


class FolderDataset(MaskedImageDataset):
    """Class folders with per-image masks; samples ``(image (3, S, S), label, mask (1, S, S))``.

    Args:
        root: folder holding ``images/`` and ``masks/``.
        val_fraction / test_fraction: shares of the files (by hash of ``<class>/<file>``).
        class_index_file: optional class name -> model output index map (JSON or text).
        strict_binary: masks must be exactly 0/1 or 0/255.
    """

    dataset_name = "folder"

    def __init__(self, root: str | None, split: str = "train", image_size: int = 224, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, class_index_file: str | None = None, strict_binary: bool = False,
                 limit: int | None = None, skip_bad: bool = False, crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__(split, image_size, crop_scale, limit, skip_bad)
        check(0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1,
              f"data.dataset.val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 with a sum <= 1")
        self.root = require_dir(root, "data=folder")
        images_dir, self.masks_dir = self.root / "images", self.root / "masks"
        check(images_dir.is_dir() and self.masks_dir.is_dir(),
              f"data.root={str(self.root)!r} needs images/<class>/ and masks/<class>/ folders")
        folders = sorted(p for p in images_dir.iterdir() if p.is_dir())
        check(folders, f"{str(images_dir)!r} has no class folders")
        self.strict_binary = bool(strict_binary)
        self.classes = [p.name for p in folders]
        self.class_to_index, self.labels_index_larger_model = class_indices(self.classes, class_index_file)
        candidates: list[tuple[Path, str]] = []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                message = f"class folder {str(folder)!r} is empty (no .jpg, .jpeg or .png images); remove it or add images"
                if not self.skip_bad:
                    raise UserError(message)
                self.skipped.append(message)
            candidates += [(f, folder.name) for f in files if _split_of(f"{folder.name}/{f.name}", val_fraction, test_fraction) == split]
        self._collect(candidates, key=lambda c: f"{c[1]}/{c[0].name}", make=self._entry)

    @property
    def num_classes(self) -> int:
        return max(self.class_to_index.values()) + 1

    @property
    def samples(self) -> list[tuple[Path, Path, int]]:
        """``(image path, mask path, label)`` per sample, in order."""
        return [(e.image, e.mask, e.label) for e in self.entries]

    def _entry(self, candidate: tuple[Path, str]) -> Entry:
        image, cls = candidate
        mask = self.masks_dir / cls / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"image {str(image)!r} has no mask at {str(mask)!r}")
        return Entry(image, self.class_to_index[cls], mask)

    def read_mask(self, entry: Entry, size: tuple[int, int]) -> torch.Tensor:
        return read_object_mask(entry.mask, size, self.strict_binary)


def folder(split: str, root: str | None = None, **kwargs) -> FolderDataset:
    """Dataset factory for ``data=folder``."""
    return FolderDataset(root=root, split=split, **kwargs)
