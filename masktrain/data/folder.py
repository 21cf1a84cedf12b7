"""ImageNet-S / Pixel-ImageNet style folders: ``images/<class>/<name>.<jpg|png>`` with
``masks/<class>/<name>.png`` (any nonzero pixel = object).

Classes are the sorted folder names, or the indices of ``class_index_file`` (JSON
``{"class name": model output index}``) so an ImageNet-1k model can be probed on a subset
of its classes. Splits are a fixed function of each file's relative path (a hash), so they
never change when files are added elsewhere.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from masktrain.data.io import open_image, read_object_mask, require_dir
from masktrain.data.transforms import apply_joint, joint_transform
from masktrain.errors import UserError, check

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _split_of(relative: str, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha1(relative.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


class FolderDataset(Dataset):
    """Samples ``(image (3, S, S) [0, 1], label, object_mask (1, S, S) {0, 1})``, S = ``image_size``."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int = 224,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        class_index_file: str | None = None,
        strict_binary: bool = False,
        limit: int | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        self.root = require_dir(root, "data=folder")
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        check(images_dir.is_dir() and masks_dir.is_dir(), f"data.root={str(self.root)!r} needs images/<class>/ and masks/<class>/ folders")
        check(split in ("train", "val", "test"), f"split {split!r} is unknown; choose train, val or test")
        folders = sorted(p for p in images_dir.iterdir() if p.is_dir())
        check(folders, f"{str(images_dir)!r} has no class folders")
        self.classes = [p.name for p in folders]
        if class_index_file:
            path = Path(class_index_file)
            check(path.is_file(), f"data.class_index_file={str(path)!r} does not exist")
            try:
                index = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError) as exc:
                raise UserError(f"data.class_index_file={str(path)!r} is not a JSON object of class name -> index") from exc
            unknown = [c for c in self.classes if c not in index]
            check(not unknown, f"classes {unknown[:5]} are missing from data.class_index_file={str(path)!r}")
            self.class_to_index = {c: index[c] for c in self.classes}
        else:
            self.class_to_index = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = max(self.class_to_index.values()) + 1
        self.samples: list[tuple[Path, Path, int]] = []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"class folder {str(folder)!r} holds no images (.jpg, .jpeg, .png)")
            for image in files:
                mask = masks_dir / folder.name / f"{image.stem}.png"
                if not mask.is_file():
                    raise UserError(f"image {str(image)!r} has no mask at {str(mask)!r}")
                if _split_of(f"{folder.name}/{image.name}", val_fraction, test_fraction) == split:
                    self.samples.append((image, mask, self.class_to_index[folder.name]))
        if limit:
            self.samples = self.samples[: int(limit)]
        self.strict_binary = bool(strict_binary)
        self.transform = joint_transform(split, int(image_size), tuple(crop_scale))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        image_path, mask_path, label = self.samples[index]
        image = open_image(image_path)
        mask = read_object_mask(mask_path, tuple(image.shape[-2:]), self.strict_binary)
        image, mask = apply_joint(self.transform, image, mask)
        return image, label, mask


def folder(split: str, root: str | None = None, **kwargs) -> FolderDataset:
    """Dataset factory for ``data=folder``."""
    return FolderDataset(root=root, split=split, **kwargs)
