"""PASCAL VOC 2012 segmentation: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` and
``SegmentationObject/<id>.png`` (palette PNGs), ``ImageSets/Segmentation/{train,val}.txt``.

Each image becomes one sample about its **largest object instance**: the label is that
instance's class (from SegmentationClass under the instance's pixels), the object mask is
that instance alone. Value 255 in both PNGs is VOC's "void" band drawn along every object
outline (and over hard regions); it is treated as **not object**, so the mask is the
instance's interior. Images whose largest instance covers less than ``min_object_fraction``
of the image are left out; their number is :attr:`skipped_small` (and logged).

Splits: ``train`` = ``train.txt`` minus a fixed ``val_fraction`` (hash of the image id),
``val`` = that held-out part, ``test`` = the official ``val.txt`` (VOC's own test set has no
public masks). Choosing the largest instance reads both PNGs of every listed image once
at construction; the masks are read again at load time, nothing is cached on disk.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from masktrain.data.base import Entry, MaskedImageDataset, in_holdout
from masktrain.data.io import check_mask_size, image_size, read_label_map, read_lines, require_dir, require_file
from masktrain.errors import UserError, check

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
VOID = 255


def largest_instance(objects: np.ndarray, classes: np.ndarray, path: str) -> tuple[int, int, int]:
    """``(instance id, class index 0-19, pixel count)`` of the largest instance in a
    SegmentationObject map ``objects (H, W)`` with its SegmentationClass map ``classes (H, W)``;
    instance id 0 when the image has none."""
    ids, counts = np.unique(objects[(objects != 0) & (objects != VOID)], return_counts=True)
    if len(ids) == 0:
        return 0, -1, 0
    best = int(ids[np.argmax(counts)])  # ties: the lowest id, as np.argmax takes the first
    cls_values, cls_counts = np.unique(classes[objects == best], return_counts=True)
    cls = int(cls_values[np.argmax(cls_counts)])
    if not 1 <= cls <= len(VOC_CLASSES):
        raise UserError(f"SegmentationClass of {path!r} gives instance {best} class value {cls}; expected 1-{len(VOC_CLASSES)} under every instance")
    return best, cls - 1, int(counts.max())


class VOCDataset(MaskedImageDataset):
    """VOC 2012 largest-instance samples ``(image (3, S, S), label in 0-19, mask (1, S, S))``.

    Args:
        root: the ``VOC2012`` folder (holding ``JPEGImages/`` …).
        min_object_fraction: images whose largest instance is smaller (share of the image's
            pixels) are skipped and counted in :attr:`skipped_small`.
        val_fraction: share of ``train.txt`` held out as ``val``.
    """

    dataset_name = "voc"

    def __init__(self, root: str | None, split: str = "train", image_size: int = 224, min_object_fraction: float = 0.02,
                 val_fraction: float = 0.1, limit: int | None = None, skip_bad: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__(split, image_size, crop_scale, limit, skip_bad)
        check(0.0 <= min_object_fraction < 1.0, f"data.dataset.min_object_fraction={min_object_fraction} must be in [0, 1)")
        check(0.0 <= val_fraction < 1.0, f"data.dataset.val_fraction={val_fraction} must be in [0, 1)")
        self.root = require_dir(root, "data=voc")
        self.min_object_fraction = float(min_object_fraction)
        self.classes = list(VOC_CLASSES)
        self.skipped_small = 0
        lists = self.root / "ImageSets" / "Segmentation"
        hint = "data.root must be the VOC2012 folder (JPEGImages/, SegmentationClass/, SegmentationObject/, ImageSets/)"
        if split == "test":
            ids = read_lines(require_file(lists / "val.txt", "split list", hint))
        else:
            ids = [i for i in read_lines(require_file(lists / "train.txt", "split list", hint))
                   if in_holdout(i, val_fraction) == (split == "val")]
        self._collect([i.split()[0] for i in ids], key=lambda i: i, make=self._entry)
        if self.skipped_small:
            log.warning("voc %s: skipped %d image(s) whose largest object covers < %.3g of the image (min_object_fraction)",
                        split, self.skipped_small, self.min_object_fraction)

    def _entry(self, image_id: str) -> Entry | None:
        image = require_file(self.root / "JPEGImages" / f"{image_id}.jpg", "image", "it is named in ImageSets/Segmentation")
        obj_path = require_file(self.root / "SegmentationObject" / f"{image_id}.png", "SegmentationObject mask", f"the mask of image {image_id!r}")
        cls_path = require_file(self.root / "SegmentationClass" / f"{image_id}.png", "SegmentationClass mask", f"the mask of image {image_id!r}")
        size = image_size(image)  # header only: the size check is cheap here
        objects, classes = read_label_map(obj_path, "SegmentationObject mask"), read_label_map(cls_path, "SegmentationClass mask")
        check_mask_size(objects, size, obj_path, "SegmentationObject mask")
        check_mask_size(classes, size, cls_path, "SegmentationClass mask")
        instance, label, area = largest_instance(objects, classes, str(cls_path))
        if instance == 0 or area < self.min_object_fraction * objects.size:
            self.skipped_small += 1
            return None
        return Entry(image, label, (obj_path, instance))

    def read_mask(self, entry: Entry, size: tuple[int, int]) -> torch.Tensor:
        path, instance = entry.mask
        objects = read_label_map(path, "SegmentationObject mask")
        check_mask_size(objects, size, path, "SegmentationObject mask")
        return torch.from_numpy((objects == instance).astype(np.float32))[None]  # void (255) is never the instance

    def summary(self) -> str:
        return super().summary() + f", {self.skipped_small} below min_object_fraction"


def voc(split: str, root: str | None = None, **kwargs) -> VOCDataset:
    """Dataset factory for ``data=voc``."""
    return VOCDataset(root=root, split=split, **kwargs)
