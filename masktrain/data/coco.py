"""COCO instances: ``annotations/instances_<set>.json`` (read with pycocotools) and images in
``<set>/`` (e.g. ``train2017/``, ``val2017/``).

Each image becomes one sample about its **largest non-crowd instance** (by the
annotation's ``area``): the label is its category as a contiguous index over the file's
categories sorted by id (:attr:`classes` holds their names), the object mask is that
instance's segmentation (polygon or RLE, rasterised by pycocotools at the image size
recorded in the JSON). Crowd regions are never the object. Images with no instance of at
least ``min_object_fraction`` of the image are left out and counted in
:attr:`skipped_small`.

Splits: ``train`` = ``train_set`` minus a fixed ``val_fraction`` (hash of the file name),
``val`` = that held-out part, ``test`` = ``test_set`` (COCO's test sets have no public masks).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from masktrain.data.base import Entry, MaskedImageDataset, in_holdout
from masktrain.data.io import require_dir, require_file
from masktrain.errors import UserError, check

log = logging.getLogger(__name__)


def load_coco(path: Path):
    """A pycocotools ``COCO`` index of ``path``, with a UserError naming a bad file."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as exc:
        raise UserError(f"annotation file {str(path)!r} is not a COCO instances JSON ({type(exc).__name__}: {str(exc)[:120]})") from exc


class COCODataset(MaskedImageDataset):
    """COCO largest-instance samples ``(image (3, S, S), label, mask (1, S, S))``.

    Args:
        root: folder holding ``annotations/`` and the image folders.
        train_set / test_set: the annotation set names (``instances_<name>.json``, images in ``<name>/``).
        image_dirs: optional ``{set name: folder}`` overriding ``<root>/<set name>``.
        min_object_fraction: images whose largest instance is smaller (share of the image area)
            are skipped and counted in :attr:`skipped_small`.
    """

    dataset_name = "coco"

    def __init__(self, root: str | None, split: str = "train", image_size: int = 224, train_set: str = "train2017",
                 test_set: str = "val2017", image_dirs: dict[str, str] | None = None, min_object_fraction: float = 0.02,
                 val_fraction: float = 0.1, limit: int | None = None, skip_bad: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__(split, image_size, crop_scale, limit, skip_bad)
        check(0.0 <= min_object_fraction < 1.0, f"data.dataset.min_object_fraction={min_object_fraction} must be in [0, 1)")
        check(0.0 <= val_fraction < 1.0, f"data.dataset.val_fraction={val_fraction} must be in [0, 1)")
        self.root = require_dir(root, "data=coco")
        self.min_object_fraction = float(min_object_fraction)
        self.skipped_small = 0
        set_name = test_set if split == "test" else train_set
        ann_path = require_file(self.root / "annotations" / f"instances_{set_name}.json", "annotation file",
                                "data.root must hold annotations/instances_<set>.json (set by data.dataset.train_set/test_set)")
        image_dir = Path((image_dirs or {}).get(set_name) or self.root / set_name)
        check(image_dir.is_dir(), f"image folder {str(image_dir)!r} for COCO set {set_name!r} does not exist; "
              f"set data.dataset.image_dirs.{set_name}=<folder>")
        self.image_dir = image_dir
        self.coco = load_coco(ann_path)
        # Contiguous labels over the file's category ids (COCO's train and val files list the same 80).
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        check(len(cats) > 0, f"annotation file {str(ann_path)!r} has no categories")
        self.classes = [c["name"] for c in cats]
        self.category_index = {c["id"]: i for i, c in enumerate(cats)}
        images = list(self.coco.imgs.values())
        if split != "test":
            images = [im for im in images if in_holdout(im["file_name"], val_fraction) == (split == "val")]
        self._collect(images, key=lambda im: im["file_name"], make=self._entry)
        if self.skipped_small:
            log.warning("coco %s: skipped %d image(s) without an instance of at least %.3g of the image (min_object_fraction)",
                        split, self.skipped_small, self.min_object_fraction)

    def _entry(self, info: dict) -> Entry | None:
        anns = [a for a in self.coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd", 0) and a.get("segmentation")]
        if not anns:
            self.skipped_small += 1
            return None
        best = max(anns, key=lambda a: (float(a.get("area", 0.0)), -int(a["id"])))  # ties: lowest annotation id
        if float(best.get("area", 0.0)) < self.min_object_fraction * info["height"] * info["width"]:
            self.skipped_small += 1
            return None
        if best["category_id"] not in self.category_index:
            raise UserError(f"annotation {best['id']} of {info['file_name']!r} has category_id {best['category_id']} missing from 'categories'")
        image = require_file(self.image_dir / info["file_name"], "image", "it is listed in the annotation file")
        return Entry(image, self.category_index[best["category_id"]], best["id"])

    def read_mask(self, entry: Entry, size: tuple[int, int]) -> torch.Tensor:
        ann = self.coco.anns[entry.mask]
        info = self.coco.imgs[ann["image_id"]]
        try:
            mask = self.coco.annToMask(ann)
        except Exception as exc:  # malformed polygon/RLE: pycocotools raises assorted types
            raise UserError(f"segmentation of annotation {ann['id']} ({info['file_name']!r}) cannot be decoded ({type(exc).__name__})") from exc
        if tuple(mask.shape) != tuple(size):
            raise UserError(f"image {str(entry.image)!r} is {size[1]}×{size[0]} (W×H) but the annotation file says "
                            f"{mask.shape[1]}×{mask.shape[0]}; the image does not match its annotations")
        return torch.from_numpy(mask.astype(np.float32))[None]

    def summary(self) -> str:
        return super().summary() + f", {self.skipped_small} below min_object_fraction"


def coco(split: str, root: str | None = None, **kwargs) -> COCODataset:
    """Dataset factory for ``data=coco``."""
    return COCODataset(root=root, split=split, **kwargs)
