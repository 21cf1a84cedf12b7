"""Oxford-IIIT Pet as distributed: ``images/<name>.jpg``, ``annotations/trimaps/<name>.png``,
``annotations/{trainval,test}.txt`` (lines ``<name> <class id 1-37> <species 1=cat 2=dog> <breed id>``).

Object mask: the trimap's foreground (value 1) **and** its boundary band (value 3). The
boundary is the uncertain ring around the animal's outline; counting it as object makes the
removed region cover the whole silhouette (fur edges included), so a "removed object" leaves
no animal pixels behind. Background is 2; any other value is an error naming the file.

Splits: ``train`` = ``trainval.txt`` minus a fixed ``val_fraction`` of it (by a hash of the
image name), ``val`` = that held-out part, ``test`` = ``test.txt``. Labels: the 37 breeds
(``target="breed"``, names from the file names, ordered by class id) or cat/dog
(``target="species"``). torchvision's ``OxfordIIITPet`` is not used: it cannot skip bad files
or limit, and its download path must never be triggered here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from masktrain.data.base import Entry, MaskedImageDataset, in_holdout
from masktrain.data.io import check_mask_size, check_values, read_label_map, read_lines, require_dir, require_file
from masktrain.errors import UserError, check

TRIMAP_FOREGROUND, TRIMAP_BACKGROUND, TRIMAP_BOUNDARY = 1, 2, 3
SPECIES = ["cat", "dog"]
TARGETS = ("breed", "species")


def _parse_list(path: Path) -> list[tuple[str, int, int]]:
    """``(image name, class id 1-based, species 1-based)`` per line of a split list."""
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        parts = line.split()
        try:
            name, class_id, species = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise UserError(f"{str(path)!r} line {number}: expected '<image> <class id> <species> <breed id>', got {line[:80]!r}") from None
        if not (class_id >= 1 and species in (1, 2)):
            raise UserError(f"{str(path)!r} line {number}: class id {class_id} / species {species} out of range (class id >= 1, species 1 or 2)")
        rows.append((name, class_id, species))
    return rows


def _breed(name: str) -> str:
    # "american_bulldog_12" -> "american_bulldog"; cats are capitalised in the file names.
    return name.rsplit("_", 1)[0]


class OxfordPetDataset(MaskedImageDataset):
    """Oxford-IIIT Pet with trimap object masks; samples ``(image (3, S, S), label, mask (1, S, S))``.

    Args:
        root: the folder holding ``images/`` and ``annotations/``.
        target: ``breed`` (37 classes) or ``species`` (cat, dog).
        val_fraction: share of ``trainval.txt`` held out as ``val``.
    """

    dataset_name = "oxford_pet"

    def __init__(self, root: str | None, split: str = "train", image_size: int = 224, target: str = "breed",
                 val_fraction: float = 0.1, limit: int | None = None, skip_bad: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__(split, image_size, crop_scale, limit, skip_bad)
        check(target in TARGETS, f"data.dataset.target={target!r} is unknown; choose one of {list(TARGETS)}")
        check(0.0 <= val_fraction < 1.0, f"data.dataset.val_fraction={val_fraction} must be in [0, 1)")
        self.root = require_dir(root, "data=oxford_pet")
        self.target = target
        ann = self.root / "annotations"
        hint = "data.root must hold images/ and annotations/ as in the Oxford-IIIT Pet download"
        lists = {name: _parse_list(require_file(ann / f"{name}.txt", "split list", hint)) for name in ("trainval", "test")}
        breeds: dict[int, str] = {}
        for rows in lists.values():
            for name, class_id, _ in rows:
                breeds.setdefault(class_id, _breed(name))
        check(sorted(breeds) == list(range(1, len(breeds) + 1)),
              f"class ids in {str(ann)!r}/{{trainval,test}}.txt are not 1..N without gaps (found {sorted(breeds)[:8]}…)")
        self.classes = list(SPECIES) if target == "species" else [breeds[i] for i in sorted(breeds)]
        if split == "test":
            rows = lists["test"]
        else:
            rows = [r for r in lists["trainval"] if in_holdout(r[0], val_fraction) == (split == "val")]
        self._collect(rows, key=lambda r: r[0], make=self._entry)

    def _entry(self, row: tuple[str, int, int]) -> Entry:
        name, class_id, species = row
        image = require_file(self.root / "images" / f"{name}.jpg", "image", "it is named in annotations/trainval.txt or test.txt")
        trimap = require_file(self.root / "annotations" / "trimaps" / f"{name}.png", "trimap", f"the mask of image {name!r}")
        return Entry(image, species - 1 if self.target == "species" else class_id - 1, trimap)

    def read_mask(self, entry: Entry, size: tuple[int, int]) -> torch.Tensor:
        trimap = read_label_map(entry.mask, "trimap")
        check_mask_size(trimap, size, entry.mask, "trimap")
        check_values(trimap, (TRIMAP_FOREGROUND, TRIMAP_BACKGROUND, TRIMAP_BOUNDARY), entry.mask, "trimap")
        obj = (trimap == TRIMAP_FOREGROUND) | (trimap == TRIMAP_BOUNDARY)
        return torch.from_numpy(obj.astype(np.float32))[None]


def oxford_pet(split: str, root: str | None = None, **kwargs) -> OxfordPetDataset:
    """Dataset factory for ``data=oxford_pet``."""
    return OxfordPetDataset(root=root, split=split, **kwargs)
