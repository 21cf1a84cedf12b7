"""ImageNet-9 (IN-9) as released by the Backgrounds Challenge (MadryLab/backgrounds_challenge).

On disk, as the release unpacks (``backgrounds_challenge_data.tar.gz`` -> ``bg_challenge/``)::

    <root>/<variant>/<split dir>/<NN_class>/<name>.JPEG
    <root>/fg_mask/<split dir>/<NN_class>/<name>.npy        # object masks of the originals

``variant`` is one of :data:`VARIANTS`; the test release has one split folder, ``val`` (450
images per class, 4050 in all); the training downloads (``in9l``, ``original``, ``mixed_rand``,
... tarballs) hold ``train/`` and ``val/``. Class folders are ``00_dog``, ``01_bird``, ``02_wheeled
vehicle``, ``03_reptile``, ``04_carnivore``, ``05_insect``, ``06_musical instrument``, ``07_primate``,
``08_fish``; the label is the two-digit prefix, as the challenge's own loader reads it.

Object masks: the ``fg_mask`` arrays ``(H, W)`` (any nonzero = object) belong to the original
images; ``only_fg``, ``no_fg``, ``only_bg_b`` and ``only_bg_t`` files carry the original's name, and
the mixed files are named ``fg_<fg name>_bg_<bg name>.JPEG`` with the foreground pasted where it
was, so each file's mask is the one of ``<fg name>``. When ``fg_mask/<split dir>`` is absent
(``object_masks=auto``) the set has no object masks: :attr:`IN9Dataset.has_object_masks` is false
and the yielded masks are zeros; anything that needs masks must refuse it.

A 1000-class ImageNet model is read on IN-9 the way ``in9_eval.py`` does it: its top-1 over all
1000 classes, mapped to the IN-9 class whose ImageNet range holds it (``in_to_in9.json``), and
wrong when it falls in none of the 9 ranges (630 of the 1000 classes). That is neither a sum nor a
max of member logits alone; :func:`map_imagenet_logits` gives the same decision as logits: the max
member logit per IN-9 class, plus a tenth column, the max over the 630 unmapped classes, which is no
label, so ``argmax`` of the 10 columns is exactly the challenge's mapped prediction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from masktrain.data.base import Entry, MaskedImageDataset
from masktrain.data.io import check_mask_size, require_dir
from masktrain.errors import UserError, check

VARIANTS = ("original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "mixed_same", "mixed_rand", "mixed_next", "in9l")
CLASSES = ("dog", "bird", "wheeled vehicle", "reptile", "carnivore", "insect", "musical instrument", "primate", "fish")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MASK_MODES = ("auto", "required", "none")

# ImageNet-1k class indices of each IN-9 class, as half-open ranges (from the challenge's in_to_in9.json;
# per-class counts 116, 52, 42, 36, 35, 27, 26, 20, 16 = 370 classes; the other 630 map to none).
_SINGLES_2 = (407, 408, 428, 436, 444, 468, 511, 547, 555, 561, 565, 569, 573, 586, 603, 609, 612, 627, 656, 661,
              665, 670, 671, 675, 690, 705, 717, 734, 751, 757, 791, 802, 803, 817, 820, 829, 847, 864, 866, 867, 870, 880)
_SINGLES_6 = (401, 402, 420, 432, 486, 494, 513, 541, 546, 558, 566, 577, 579, 593, 594, 641, 642, 683, 684, 687, 699,
              776, 822, 875, 881, 889)
IMAGENET_RANGES: dict[int, tuple[tuple[int, int], ...]] = {
    0: ((151, 171), (173, 269)),
    1: ((7, 25), (87, 101), (127, 147)),
    2: tuple((i, i + 1) for i in _SINGLES_2),
    3: ((33, 69),),
    4: ((269, 281), (286, 300), (356, 363), (387, 389)),
    5: ((300, 327),),
    6: tuple((i, i + 1) for i in _SINGLES_6),
    7: ((365, 385),),
    8: ((0, 7), (389, 398)),
}
NO_IN9_CLASS = 9  # the extra column of map_imagenet_logits: a top-1 outside every IN-9 class


def imagenet_to_in9() -> Tensor:
    """``(1000,)`` int64: the IN-9 class of each ImageNet-1k class, -1 for none."""
    table = torch.full((1000,), -1, dtype=torch.int64)
    for in9, ranges in IMAGENET_RANGES.items():
        for lo, hi in ranges:
            table[lo:hi] = in9
    return table


def map_imagenet_logits(logits: Tensor) -> Tensor:
    """ImageNet logits ``(B, 1000)`` -> ``(B, 10)``: per IN-9 class the max of its member logits,
    and column :data:`NO_IN9_CLASS` the max over classes in no IN-9 class. ``argmax`` equals the
    challenge's mapped top-1 (a prediction in column 9 is wrong for every label)."""
    check(logits.dim() == 2 and logits.shape[1] == 1000,
          f"data.in9.map_imagenet=true needs 1000 ImageNet logits per image, got shape {tuple(logits.shape)}")
    group = imagenet_to_in9().to(logits.device)
    group = torch.where(group < 0, NO_IN9_CLASS, group)
    out = logits.new_full((logits.shape[0], NO_IN9_CLASS + 1), float("-inf"))
    return out.scatter_reduce(1, group.expand_as(logits), logits, reduce="amax", include_self=True)


def check_model_outputs(num_outputs: int, map_imagenet: bool) -> int:
    """The number of IN-9 scores a model with ``num_outputs`` logits gives (9, or 10 with the
    mapping's extra column); a UserError when the model and ``data.in9.map_imagenet`` disagree."""
    if map_imagenet:
        check(num_outputs == 1000, f"data.in9.map_imagenet=true maps ImageNet-1k logits, but the model has {num_outputs} "
                                   f"outputs; use a 1000-class model or data.in9.map_imagenet=false")
        return NO_IN9_CLASS + 1
    if num_outputs == 1000:
        raise UserError("the model has 1000 (ImageNet) outputs but IN-9 has 9 classes; pass data.in9.map_imagenet=true "
                        "to map them as the Backgrounds Challenge does")
    check(num_outputs == len(CLASSES), f"the model has {num_outputs} outputs but IN-9 has {len(CLASSES)} classes; "
                                       f"use a 9-class model or a 1000-class one with data.in9.map_imagenet=true")
    return num_outputs


def foreground_name(stem: str) -> str:
    """The original image whose object a file shows: ``fg_<A>_bg_<B>`` -> ``A``, else the stem itself."""
    if stem.startswith("fg_") and "_bg_" in stem:
        return stem[3:stem.index("_bg_")]
    return stem


def read_npy_mask(path: Path, size: tuple[int, int]) -> Tensor:
    """An ``fg_mask`` array file as float ``(1, H, W)`` in {0, 1} (nonzero = object)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise UserError(f"object mask {str(path)!r} does not exist") from exc
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read object mask {str(path)!r}: not a numpy array file ({exc})") from exc
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    check(array.ndim == 2, f"object mask {str(path)!r} has shape {array.shape}; expected (H, W)")
    check_mask_size(array, size, path, "object mask")
    return torch.from_numpy(np.asarray(array) != 0).float()[None]


class IN9Dataset(MaskedImageDataset):
    """One IN-9 variant and split; samples ``(image (3, S, S), label, object mask (1, S, S))``.

    Args:
        root: the unpacked release (the folder holding ``original/``, ``fg_mask/``, ...).
        variant: one of :data:`VARIANTS`.
        split_dirs: our split name -> the release's folder (default train -> ``train``, val and
            test -> ``val``: the test release's only folder).
        object_masks: ``auto`` (use ``fg_mask`` when present), ``required`` (a UserError without
            it), ``none`` (ignore it).
    """

    dataset_name = "in9"

    def __init__(self, root: str | None, split: str = "test", variant: str = "original", image_size: int = 224,
                 split_dirs: dict[str, str] | None = None, object_masks: str = "auto", limit: int | None = None,
                 skip_bad: bool = False, crop_scale: Sequence[float] = (0.5, 1.0)) -> None:
        super().__init__(split, image_size, tuple(crop_scale), limit, skip_bad)
        check(variant in VARIANTS, f"data.variant={variant!r} is unknown; choose one of {list(VARIANTS)}")
        check(object_masks in MASK_MODES, f"data.dataset.object_masks={object_masks!r} is unknown; choose one of {list(MASK_MODES)}")
        self.root = require_dir(root, "data=in9")
        self.variant = variant
        dirs = {"train": "train", "val": "val", "test": "val", **dict(split_dirs or {})}
        folder = self.root / variant / str(dirs[split])
        check(folder.is_dir(), f"data.root={str(self.root)!r} has no {variant}/{dirs[split]}/ folder for split {split!r}; "
                               f"expected the Backgrounds Challenge layout <root>/<variant>/{dirs[split]}/<NN_class>/*.JPEG")
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
        check(class_dirs, f"{str(folder)!r} has no class folders (expected 00_dog ... 08_fish)")
        labels = {}
        for d in class_dirs:
            prefix = d.name[:2]
            check(prefix.isdigit() and d.name[2:3] == "_" and int(prefix) < len(CLASSES),
                  f"class folder {str(d)!r} is not named <NN>_<class> with NN in 00..08, as in the IN-9 release")
            labels[d] = int(prefix)
        self.classes = list(CLASSES)
        mask_dir = self.root / "fg_mask" / str(dirs[split])
        if object_masks == "required":
            check(mask_dir.is_dir(), f"data.dataset.object_masks=required but {str(mask_dir)!r} does not exist")
        self.has_object_masks = object_masks != "none" and mask_dir.is_dir()
        self.missing_masks_reason = "" if self.has_object_masks else (
            "data.dataset.object_masks=none" if object_masks == "none" else f"no {str(mask_dir)!r} folder")
        self.mask_dir = mask_dir
        candidates = []
        for d, label in labels.items():
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            candidates += [(p, label) for p in files]
        self._collect(candidates, key=lambda c: f"{c[0].parent.name}/{c[0].name}", make=self._entry)

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    def _entry(self, candidate: tuple[Path, int]) -> Entry:
        image, label = candidate
        mask = None
        if self.has_object_masks:
            mask = self.mask_dir / image.parent.name / f"{foreground_name(image.stem)}.npy"
            if not mask.is_file():
                raise UserError(f"image {str(image)!r} has no object mask at {str(mask)!r}")
        return Entry(image, label, mask)

    def read_mask(self, entry: Entry, size: tuple[int, int]) -> Tensor:
        if entry.mask is None:
            return torch.zeros(1, *size)
        return read_npy_mask(entry.mask, size)


def in9(split: str, root: str | None = None, **kwargs) -> IN9Dataset:
    """Dataset factory for ``data=in9``."""
    return IN9Dataset(root=root, split=split, **kwargs)


def count_outputs(model: nn.Module, image_size: int) -> int:
    """How many logits ``model`` gives: its ``num_classes`` when it says, else one forward of a black image."""
    k = getattr(model, "num_classes", None)
    if isinstance(k, int):
        return k
    with torch.no_grad():
        return int(model.eval()(torch.zeros(1, 3, int(image_size), int(image_size))).shape[1])


class IN9Mapped(nn.Module):
    """A 1000-class ImageNet classifier read as IN-9: ``forward(images (B, 3, H, W)) -> (B, 10)``
    through :func:`map_imagenet_logits` (columns 0-8 the IN-9 classes, column 9 no IN-9 class, a
    wrong prediction for every label). Layer masking and features pass through to the wrapped model."""

    #: The evaluation accepts K + 1 outputs from a model with this flag (the extra column is no label).
    no_class_column = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.name = f"{getattr(model, 'name', type(model).__name__)} (ImageNet -> IN-9)"

    def forward(self, images: Tensor) -> Tensor:
        return map_imagenet_logits(self.model(images))

    def normalize(self, images: Tensor) -> Tensor:
        return self.model.normalize(images)

    def features(self, images: Tensor) -> Tensor:
        return self.model.features(images)

    def layer_masked(self, output: str = "logits"):
        inner = self.model.layer_masked(output)
        return (lambda x, keep: map_imagenet_logits(inner(x, keep))) if output == "logits" else inner
