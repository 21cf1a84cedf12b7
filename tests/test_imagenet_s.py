"""data=imagenet_s on trees written in the ImageNet-S release's exact layout (tests/dataset_fixtures.py):
RGB masks with class id = R + 256 G, 0 other, 1000 ignore; the shared format checks (one step,
probe, bad samples, recipe) run in test_datasets.py."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_fixtures import IMAGENET_S50, SIZE, write_imagenet_s
from masktrain.data.datamodule import MaskDataModule
from masktrain.data.imagenet_s import ImageNetSDataset, imagenet_s, read_class_ids
from masktrain.errors import UserError

H, W = SIZE[1], SIZE[0]
ALL = dict(image_size=32, val_fraction=0.0, test_fraction=0.0)  # every image in the train split
S919 = tuple(f"n{10_000_000 + 997 * i:08d}" for i in range(919))  # a sorted 919-wnid list, as the release's


def test_labels_and_own_class_masks_match_what_was_written(tmp_path):
    written = write_imagenet_s(tmp_path, per_class=2)
    ds = ImageNetSDataset(str(tmp_path / "ImageNetS50"), "train", **ALL)
    assert ds.classes == list(IMAGENET_S50) and ds.num_classes == 50 and ds.release == 50
    assert len(ds) == len(written) == 100
    for entry in ds.entries:
        label, mask = written[f"{entry.image.parent.name}/{entry.image.name}"]
        image, obj = ds.load(entry)
        assert entry.label == label and ds.classes[label] == entry.image.parent.name and image.shape == (3, H, W)
        # only the image's own class: not the ignore ring (1000), not the other class in the corner
        assert torch.equal(obj[0].bool(), torch.from_numpy(mask))
        ids = read_class_ids(entry.mask[0])
        assert set(np.unique(ids).tolist()) >= {0, label + 1, 1000}  # the file really holds several ids
    splits = [ImageNetSDataset(str(tmp_path), s, image_size=32) for s in ("train", "val", "test")]
    assert sum(len(d) for d in splits) == 100 and all(len(d) for d in splits)  # every image in one split


def test_ids_above_255_use_the_green_channel_and_a_categories_file_keeps_them(tmp_path):
    used = (3, 300, 700)  # ImageNet-S ids 4, 301, 701: the last two need G
    written = write_imagenet_s(tmp_path, release=919, categories=S919, used=used, per_class=2)
    root = tmp_path / "ImageNetS919"
    for wnid in S919:  # a user kept only the classes they need
        if wnid not in {S919[k] for k in used}:
            (root / "validation" / wnid).rmdir()
    rgb = np.asarray(Image.open(next((root / "validation-segmentation" / S919[300]).glob("*.png")))).astype(np.int64)
    assert rgb.ndim == 3 and set(np.unique(rgb[..., 0] + 256 * rgb[..., 1]).tolist()) == {0, 301, 701, 1000}  # own, other, ignore
    with pytest.raises(UserError, match="has 3 class folders but ImageNet-S-919 has 919.*categories_file"):
        ImageNetSDataset(str(root), "train", **ALL)
    (tmp_path / "ImageNetS_categories_im919.txt").write_text("\n".join(S919))  # no trailing newline, as released
    ds = ImageNetSDataset(str(root), "train", categories_file=str(tmp_path / "ImageNetS_categories_im919.txt"), **ALL)
    assert ds.num_classes == 919 and {e.label for e in ds.entries} == set(used)
    for entry in ds.entries:
        label, mask = written[f"{entry.image.parent.name}/{entry.image.name}"]
        assert entry.label == label and torch.equal(ds.load(entry)[1][0].bool(), torch.from_numpy(mask))
    (tmp_path / "short.txt").write_text("\n".join(S919[:50]))
    with pytest.raises(UserError, match="lists 50 classes but ImageNet-S-919 has 919"):
        ImageNetSDataset(str(root), "train", categories_file=str(tmp_path / "short.txt"), **ALL)


def test_class_index_file_gives_imagenet_1k_outputs(tmp_path):
    write_imagenet_s(tmp_path, per_class=1)
    # LOC_synset_mapping.txt: "<wnid> <names>", index = line number; the S50 wnids among 1000 lines
    others = iter(f"n{20_000_000 + i:08d}" for i in range(1000))
    lines = [f"{next(others)} filler" for _ in range(1000)]
    position = {wnid: 17 * i + 5 for i, wnid in enumerate(IMAGENET_S50)}
    for wnid, line in position.items():
        lines[line] = f"{wnid} some name, another name"
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    factory = lambda split, **kw: imagenet_s(split, root=str(tmp_path), class_index_file=str(tmp_path / "LOC_synset_mapping.txt"), **ALL, **kw)  # noqa: E731
    ds = factory("train")
    assert {e.label for e in ds.entries} == set(position.values())
    assert all(e.label == position[e.image.parent.name] for e in ds.entries)
    assert MaskDataModule(dataset=factory, num_workers=0).num_classes == max(position.values()) + 1
    dm = MaskDataModule(dataset=factory, num_classes=1000, num_workers=0)  # an ImageNet-1k head: labels fit in it
    assert dm.dataset("train") is not None and dm.num_classes == 1000
    with pytest.raises(UserError, match=r"data.num_classes=100 but the imagenet_s dataset has labels up to 838"):
        MaskDataModule(dataset=factory, num_classes=100, name="imagenet_s", num_workers=0).dataset("train")


def test_root_is_the_release_folder_or_the_folder_holding_it(tmp_path):
    write_imagenet_s(tmp_path, per_class=1)
    assert len(imagenet_s("train", root=str(tmp_path), **ALL)) == len(imagenet_s("train", root=str(tmp_path / "ImageNetS50"), **ALL)) == 50
    with pytest.raises(UserError, match="has no ImageNetS300/ folder"):
        imagenet_s("train", root=str(tmp_path), release=300)
    with pytest.raises(UserError, match="is ImageNet-S-50 but data.dataset.release=919"):
        imagenet_s("train", root=str(tmp_path / "ImageNetS50"), release=919)
    (tmp_path / "ImageNetS300" / "validation").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds ImageNetS50, ImageNetS300; choose one with data.dataset.release=<50\|300>"):
        imagenet_s("train", root=str(tmp_path))
    assert len(imagenet_s("train", root=str(tmp_path), release=50, **ALL)) == 50
    with pytest.raises(UserError, match="data.dataset.release=7 is unknown"):
        imagenet_s("train", root=str(tmp_path), release=7)


@pytest.mark.parametrize("case, fragment", [
    ("missing_root", "data.root='{root}/nope' does not exist"),
    ("no_segmentation_folder", "needs validation/<wnid>/ and validation-segmentation/<wnid>/"),
    ("wrong_size", "is 20×10 (W×H) but its image is 48×40"),
    ("corrupt_image", "the file is corrupt or not an image"),
    ("corrupt_mask", "cannot read ImageNet-S mask"),
    ("palette_mask", "is a P image; expected an RGB PNG"),
    ("blue_channel_ids", "class ids [65537] outside 0 (other), 1-50 and 1000 (ignore)"),
    ("missing_class_folder", "has 49 class folders but ImageNet-S-50 has 50"),
])
def test_bad_input_is_one_clear_user_error(tmp_path, case, fragment):
    write_imagenet_s(tmp_path, per_class=1)
    root = tmp_path / "ImageNetS50"
    wnid = IMAGENET_S50[0]
    image = next((root / "validation" / wnid).glob("*.JPEG"))
    mask = root / "validation-segmentation" / wnid / f"{image.stem}.png"
    target = str(root)
    if case == "missing_root":
        target = str(tmp_path / "nope")
    elif case == "no_segmentation_folder":
        (root / "validation-segmentation").rename(tmp_path / "elsewhere")
    elif case == "wrong_size":
        Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8)).save(mask)
    elif case == "corrupt_image":
        image.write_bytes(image.read_bytes()[:150])
    elif case == "corrupt_mask":
        mask.write_bytes(b"\x89PNG not really")
    elif case == "palette_mask":
        Image.fromarray(np.ones((H, W), dtype=np.uint8), mode="P").save(mask)
    elif case == "blue_channel_ids":  # B is 0 in every released mask: (1, 0, 1) is no ImageNet-S class
        Image.fromarray(np.tile(np.array([1, 0, 1], dtype=np.uint8), (H, W, 1))).save(mask)
    elif case == "missing_class_folder":
        (root / "validation" / IMAGENET_S50[-1]).rename(tmp_path / "moved")
    fragment = fragment.format(root=tmp_path)
    with pytest.raises(UserError, match=re.escape(fragment)) as info:
        ds = imagenet_s("train", root=target, **ALL)
        for i in range(len(ds)):
            ds[i]
    assert "\n" not in str(info.value)
