"""ImageNet-S as released (github.com/LUSSeg/ImageNet-S): ``ImageNetS<N>/validation/<wnid>/<name>.JPEG``
with ``ImageNetS<N>/validation-segmentation/<wnid>/<name>.png``, N = 50, 300 or 919.

Masks are RGB PNGs holding a class id per pixel, ``id = R + 256 G``: 0 = other (background),
1000 = ignore (ambiguous pixels), 1..N = the ImageNet-S classes. ImageNet-S class ``i`` is the
``i``-th wnid (1-based) of the release's category list sorted by name, which is the sorted list
of ``validation/`` folders when the whole release is present (``categories_file`` gives the
list when folders were removed: the release's ``ImageNetS_categories_im<N>.txt``).

Object mask of an image: the pixels of **its own class** (its folder's id). Pixels of other
classes, "other" and "ignore" are not object (ignore is the uncertain band, as VOC's void).

Labels: the class's position among the release's categories (ImageNet-S id - 1), or, with
``class_index_file``, the index it names (same semantics as ``data=folder``), so an ImageNet-1k
model can be probed: with ImageNet's ``LOC_synset_mapping.txt`` (one ``<wnid> <names>`` line per
class, index = line number) the labels are the model's own output indices.

Splits: ``validation/`` is the only released split with public masks (``test`` masks live on the
evaluation server), so train/val/test are fixed shares of it by a hash of ``<wnid>/<file>``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from masktrain.data.base import Entry, MaskedImageDataset
from masktrain.data.folder import _split_of, class_indices
from masktrain.data.io import _DECODE_ERRORS, check_mask_size, read_lines, require_dir
from masktrain.errors import UserError, check

RELEASES = (50, 300, 919)
OTHER, IGNORE = 0, 1000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_RELEASE_DIR = re.compile(r"ImageNetS(50|300|919)")
CATEGORIES_HINT = "the release's data/categories/ImageNetS_categories_im{n}.txt from github.com/LUSSeg/ImageNet-S"


def read_class_ids(path: str | Path) -> np.ndarray:
    """An ImageNet-S segmentation PNG as class ids ``(H, W)`` int64: ``R + 256 G`` of an RGB(A)
    file; a single-channel file (re-saved masks) gives its values. B is 0 in every released
    mask; a nonzero B adds ``65536 B``, so such a file is reported as out of range, not misread."""
    try:
        with Image.open(path) as img:
            if img.mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB")).astype(np.int64)
                return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            if img.mode in ("L", "I", "I;16"):
                return np.asarray(img).astype(np.int64)
            raise UserError(f"ImageNet-S mask {str(path)!r} is a {img.mode} image; expected an RGB PNG (class id = R + 256 G)")
    except FileNotFoundError as exc:
        raise UserError(f"ImageNet-S mask {str(path)!r} does not exist") from exc
    except UserError:
        raise
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read ImageNet-S mask {str(path)!r}: the file is corrupt or not an image ({exc})") from exc


def _release_dir(root: Path, release: int | None) -> tuple[Path, int | None]:
    """(the ``ImageNetS<N>`` folder, N or None) from ``data.root`` = that folder or its parent."""
    if release is not None:
        check(int(release) in RELEASES, f"data.dataset.release={release} is unknown; choose one of {list(RELEASES)}")
        release = int(release)
    match = _RELEASE_DIR.fullmatch(root.name)
    if match:
        found = int(match.group(1))
        check(release in (None, found), f"data.root={str(root)!r} is ImageNet-S-{found} but data.dataset.release={release}")
        return root, found
    if (root / "validation").is_dir():
        return root, release  # a renamed release folder
    present = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _RELEASE_DIR.fullmatch(p.name)))
    if release is not None:
        check(release in present, f"data.root={str(root)!r} has no ImageNetS{release}/ folder (found: {present or 'none'})")
        return root / f"ImageNetS{release}", release
    check(len(present) == 1, f"data.root={str(root)!r} " + (
        f"holds {', '.join(f'ImageNetS{n}' for n in present)}; choose one with data.dataset.release=<{'|'.join(map(str, present))}>"
        if present else "needs validation/ and validation-segmentation/ (an ImageNetS50|300|919 folder) or such a folder inside"))
    return root / f"ImageNetS{present[0]}", present[0]


class ImageNetSDataset(MaskedImageDataset):
    """ImageNet-S validation images with their own-class object masks; samples
    ``(image (3, S, S), label, mask (1, S, S))``.

    Args:
        root: an ``ImageNetS50|300|919`` folder, or the folder holding them (then ``release``).
        release: 50, 300 or 919 (null: from the folder name).
        categories_file: the release's sorted category list (one wnid per line); needed only when
            ``validation/`` lacks some of the release's class folders, as the mask ids index that list.
        class_index_file: wnid -> model output index (JSON or text, see ``data=folder``).
        val_fraction / test_fraction: shares of ``validation/`` (by hash of ``<wnid>/<file>``).
    """

    dataset_name = "imagenet_s"

    def __init__(self, root: str | None, split: str = "train", image_size: int = 224, release: int | None = None,
                 categories_file: str | None = None, class_index_file: str | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.5, limit: int | None = None, skip_bad: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__(split, image_size, crop_scale, limit, skip_bad)
        check(0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1,
              f"data.dataset.val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 with a sum <= 1")
        self.root, self.release = _release_dir(require_dir(root, "data=imagenet_s"), release)
        images_dir, self.masks_dir = self.root / "validation", self.root / "validation-segmentation"
        check(images_dir.is_dir() and self.masks_dir.is_dir(),
              f"data.root={str(self.root)!r} needs validation/<wnid>/ and validation-segmentation/<wnid>/ as in the ImageNet-S release")
        folders = sorted(p for p in images_dir.iterdir() if p.is_dir())
        check(folders, f"{str(images_dir)!r} has no class folders")
        self.classes = self._categories(categories_file, [p.name for p in folders])
        # ImageNet-S id of each class: its 1-based rank in the release's sorted category list.
        self.class_id = {wnid: i + 1 for i, wnid in enumerate(self.classes)}
        self.class_to_index, self.labels_index_larger_model = class_indices(self.classes, class_index_file)
        candidates: list[tuple[Path, str]] = []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            candidates += [(f, folder.name) for f in files if _split_of(f"{folder.name}/{f.name}", val_fraction, test_fraction) == split]
        self._collect(candidates, key=lambda c: f"{c[1]}/{c[0].name}", make=self._entry)

    def _categories(self, categories_file: str | None, folders: list[str]) -> list[str]:
        n = self.release
        if categories_file:
            path = Path(categories_file)
            check(path.is_file(), f"data.dataset.categories_file={str(path)!r} does not exist")
            categories = sorted(line.split()[0] for line in read_lines(path))
            check(n is None or len(categories) == n,
                  f"data.dataset.categories_file={str(path)!r} lists {len(categories)} classes but ImageNet-S-{n} has {n}")
            extra = sorted(set(folders) - set(categories))
            check(not extra, f"class folders {extra[:5]} are not in data.dataset.categories_file={str(path)!r}")
            return categories
        check(n is None or len(folders) == n,
              f"{str(self.root / 'validation')!r} has {len(folders)} class folders but ImageNet-S-{n} has {n}; mask class ids "
              f"index the release's full sorted category list, so pass data.dataset.categories_file=<{CATEGORIES_HINT.format(n=n)}>")
        return folders

    @property
    def num_classes(self) -> int:
        return max(self.class_to_index.values()) + 1

    def _entry(self, candidate: tuple[Path, str]) -> Entry:
        image, wnid = candidate
        mask = self.masks_dir / wnid / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"image {str(image)!r} has no mask at {str(mask)!r}")
        return Entry(image, self.class_to_index[wnid], (mask, self.class_id[wnid]))

    def read_mask(self, entry: Entry, size: tuple[int, int]) -> torch.Tensor:
        path, own = entry.mask
        ids = read_class_ids(path)
        check_mask_size(ids, size, path, "ImageNet-S mask")
        bad = np.unique(ids[(ids > len(self.classes)) & (ids != IGNORE)])
        if bad.size:
            raise UserError(f"ImageNet-S mask {str(path)!r} has class ids {bad[:6].tolist()} outside 0 (other), "
                            f"1-{len(self.classes)} and {IGNORE} (ignore); is it an RGB mask with id = R + 256 G?")
        return torch.from_numpy((ids == own).astype(np.float32))[None]


def imagenet_s(split: str, root: str | None = None, **kwargs) -> ImageNetSDataset:
    """Dataset factory for ``data=imagenet_s``."""
    return ImageNetSDataset(root=root, split=split, **kwargs)
