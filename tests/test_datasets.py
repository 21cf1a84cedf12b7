"""On-disk datasets: each format written in its exact layout (tests/dataset_fixtures.py), read
back, checked against what was written, trained one step, probed once; bad input per case."""
import functools
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_cli
from dataset_fixtures import IMAGENET_S50, SIZE, write_coco, write_folder_dataset, write_imagenet_s, write_oxford_pet, write_voc
from masktrain.data.coco import COCODataset, coco
from masktrain.data.datamodule import MaskDataModule
from masktrain.data.folder import FolderDataset, folder
from masktrain.data.imagenet_s import imagenet_s
from masktrain.data.io import open_image, read_object_mask
from masktrain.data.oxford_pet import OxfordPetDataset, oxford_pet
from masktrain.data.voc import VOCDataset, voc
from masktrain.errors import UserError
from masktrain.evaluation import evaluate
from masktrain.methods import get_method
from masktrain.models import create_model
from masktrain.rng import step_generator

H, W = SIZE[1], SIZE[0]


def _write(fmt: str, root: Path) -> dict:
    if fmt == "coco":
        written = write_coco(root, "val2017", start_id=1)
        written.update(write_coco(root, "train2017", start_id=50, per_class=6))
        return written
    if fmt == "imagenet_s":  # data.root = the folder holding ImageNetS50/ (the download's top level)
        return write_imagenet_s(root, per_class=2)
    return {"folder": write_folder_dataset, "oxford_pet": write_oxford_pet, "voc": write_voc}[fmt](root)


# Options under which every split of the tiny fixtures is non-empty.
FACTORIES = {
    "folder": (folder, dict(val_fraction=0.25, test_fraction=0.25), 3),
    "oxford_pet": (oxford_pet, dict(val_fraction=0.3), 4),
    "voc": (voc, dict(val_fraction=0.3), 20),
    "coco": (coco, dict(val_fraction=0.3), 3),
    "imagenet_s": (imagenet_s, dict(val_fraction=0.25, test_fraction=0.25), 50),
}


def _snapshot(root: Path) -> list:
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


# -- what is read equals what was written ------------------------------------------------

def test_folder_labels_and_masks_match_what_was_written(tmp_path):
    written = write_folder_dataset(tmp_path)
    splits = [FolderDataset(str(tmp_path), s, image_size=32, val_fraction=0.25, test_fraction=0.25) for s in ("train", "val", "test")]
    assert sum(len(d) for d in splits) == len(written)  # every file in exactly one split
    assert splits[0].classes == ["cat", "dog", "fox"] and splits[0].num_classes == 3
    full = FolderDataset(str(tmp_path), "train", image_size=32, val_fraction=0.0, test_fraction=0.0)
    for entry in full.entries:  # the files as read, before any transform
        name, mask = written[f"{entry.image.parent.name}/{entry.image.name}"]
        image, obj = full.load(entry)
        assert full.classes[entry.label] == name and image.shape == (3, H, W)
        assert torch.equal(obj[0].bool(), torch.from_numpy(mask))


def test_oxford_pet_labels_masks_and_splits(tmp_path):
    written = write_oxford_pet(tmp_path)
    train, val, test = (OxfordPetDataset(str(tmp_path), s, image_size=32, val_fraction=0.3) for s in ("train", "val", "test"))
    assert train.classes == ["Abyssinian", "american_bulldog", "Bengal", "beagle"] and train.num_classes == 4
    names = lambda d: {e.image.stem for e in d.entries}  # noqa: E731
    assert names(train) | names(val) == set(written["lists"]["trainval"]) and not names(train) & names(val)
    assert names(test) == set(written["lists"]["test"]) and len(val) > 0
    for ds in (train, val, test):
        for entry in ds.entries:
            breed, _, mask = written[entry.image.stem]
            _, obj = ds.load(entry)
            assert entry.label == breed
            assert torch.equal(obj[0].bool(), torch.from_numpy(mask))  # foreground + boundary ring, not background
    species = OxfordPetDataset(str(tmp_path), "test", image_size=32, target="species")
    assert species.classes == ["cat", "dog"]
    assert [e.label for e in species.entries] == [written[e.image.stem][1] for e in species.entries]
    assert set(e.label for e in species.entries) == {0, 1}


def test_voc_largest_instance_label_and_mask_void_is_not_object(tmp_path):
    written = write_voc(tmp_path)
    train = VOCDataset(str(tmp_path), "train", image_size=32, val_fraction=0.3)
    val = VOCDataset(str(tmp_path), "val", image_size=32, val_fraction=0.3)
    test = VOCDataset(str(tmp_path), "test", image_size=32)
    assert train.num_classes == 20 and train.classes[11] == "dog"
    assert train.skipped_small == 1 and "2008_tiny00" not in {e.image.stem for e in train.entries + val.entries}
    assert len(train) + len(val) + 1 == sum(1 for line in (tmp_path / "ImageSets/Segmentation/train.txt").read_text().split())
    assert {e.image.stem for e in test.entries} == set((tmp_path / "ImageSets/Segmentation/val.txt").read_text().split())
    for ds in (train, val, test):
        for entry in ds.entries:
            label, mask = written[entry.image.stem]
            _, obj = ds.load(entry)
            assert entry.label == label  # the big instance's class, not the small one's
            assert torch.equal(obj[0].bool(), torch.from_numpy(mask))  # no 255 ring, no small instance
    assert VOCDataset(str(tmp_path), "train", image_size=32, min_object_fraction=0.0, val_fraction=0.0).skipped_small == 0


def test_coco_largest_non_crowd_instance(tmp_path):
    written = _write("coco", tmp_path)
    train, val, test = (COCODataset(str(tmp_path), s, image_size=32, val_fraction=0.3) for s in ("train", "val", "test"))
    assert train.classes == ["person", "car", "dog"]  # sparse ids 1, 3, 18 -> labels 0, 1, 2
    assert len(train) + len(val) == 18 and len(test) == 15
    assert {e.image.parent.name for e in train.entries + val.entries} == {"train2017"}
    assert {e.image.parent.name for e in test.entries} == {"val2017"}
    for ds in (train, val, test):
        for entry in ds.entries:
            label, mask = written[entry.image.name]
            _, obj = ds.load(entry)
            assert entry.label == label  # the crowd region is larger but never the object
            assert torch.equal(obj[0].bool(), torch.from_numpy(mask))
    with pytest.raises(UserError, match="split 'test' has no samples [(]15 below min_object_fraction"):
        COCODataset(str(tmp_path), "test", image_size=32, min_object_fraction=0.5)


@pytest.mark.parametrize("fmt", list(FACTORIES))
def test_transformed_samples_and_limit(tmp_path, fmt):
    _write(fmt, tmp_path)
    factory, kw, k = FACTORIES[fmt]
    for split in ("train", "test"):
        ds = factory(split, root=str(tmp_path), image_size=32, **kw)
        image, label, mask = ds[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert isinstance(label, int) and 0 <= label < ds.num_classes <= k
    first = [e.image for e in factory("train", root=str(tmp_path), image_size=32, limit=3, **kw).entries]
    again = [e.image for e in factory("train", root=str(tmp_path), image_size=32, limit=3, **kw).entries]
    everything = [e.image for e in factory("train", root=str(tmp_path), image_size=32, **kw).entries]
    assert first == again == everything[:3]  # first N of a fixed order


def test_eval_transform_keeps_mask_aligned(tmp_path):
    write_folder_dataset(tmp_path)
    ds = FolderDataset(str(tmp_path), "test", image_size=H, val_fraction=0.0, test_fraction=1.0)
    image, _, mask = ds[0]
    raw_image, raw_mask = ds.load(ds.entries[0])
    left = (W - H) // 2  # Resize(H) keeps H×W, CenterCrop(H) cuts the sides
    assert torch.equal(mask, raw_mask[:, :, left:left + H])
    assert torch.allclose(image, raw_image[:, :, left:left + H], atol=1e-6)


def test_class_index_file_json_and_text(tmp_path):
    write_folder_dataset(tmp_path)
    kw = dict(image_size=32, val_fraction=0.0, test_fraction=0.0)
    (tmp_path / "index.json").write_text(json.dumps({"cat": 281, "dog": 207, "fox": 277, "owl": 24}))
    ds = FolderDataset(str(tmp_path), "train", class_index_file=str(tmp_path / "index.json"), **kw)
    assert {e.label for e in ds.entries} == {281, 207, 277} and ds.num_classes == 282
    (tmp_path / "synsets.txt").write_text("owl bird of prey\ncat small cat\ndog a dog, canine\nfox red fox\n")
    ds = FolderDataset(str(tmp_path), "train", class_index_file=str(tmp_path / "synsets.txt"), **kw)
    assert {ds.classes[0]: 1, "dog": 2, "fox": 3} == {c: ds.class_to_index[c] for c in ("cat", "dog", "fox")}
    (tmp_path / "pairs.txt").write_text("cat 5\ndog 9\nfox 0\n")
    assert FolderDataset(str(tmp_path), "train", class_index_file=str(tmp_path / "pairs.txt"), **kw).num_classes == 10
    (tmp_path / "short.json").write_text(json.dumps({"cat": 1}))
    with pytest.raises(UserError, match="missing from data.dataset.class_index_file"):
        FolderDataset(str(tmp_path), "train", class_index_file=str(tmp_path / "short.json"), **kw)


# -- one training step and one probe per format --------------------------------------------

@pytest.mark.parametrize("fmt", list(FACTORIES))
def test_one_training_step_and_one_probe(tmp_path, fmt):
    _write(fmt, tmp_path)
    factory, kw, k = FACTORIES[fmt]
    dm = MaskDataModule(dataset=functools.partial(factory, root=str(tmp_path), image_size=32, **kw),
                        num_classes=k, batch_size=4, num_workers=0)
    images, labels, objects = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and objects.shape == (4, 1, 32, 32)
    model = create_model("resnet18", k)
    loss = torch.nn.functional.cross_entropy(get_method("grey").logits(model, images, 1 - objects, step_generator(0, 0, 0)), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.conv1.weight.grad is not None
    report = evaluate(model.eval(), dm, probes=["object_removal"], methods=["grey"], n_images=4, split="test", n_boot=50)
    assert report["probes"]["object_removal"]["grey"]["n"] == 4


@pytest.mark.parametrize("fmt", list(FACTORIES))
def test_recipe_builds_the_dataset(tmp_path, fmt):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    _write(fmt, tmp_path)
    overrides = [f"data={fmt}", f"data.root={tmp_path}", "data.dataset.image_size=32", "data.dataset.val_fraction=0.3"]
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.data.num_classes is None  # taken from the data: no data.num_classes=<K> needed
    dm = instantiate(cfg.data)
    ds = dm.dataset("train")
    assert dm.num_classes == ds.num_classes == FACTORIES[fmt][2] and ds[0][0].shape == (3, 32, 32)
    assert dm.mean == (0.485, 0.456, 0.406) and cfg.data.batch_size == 32 and cfg.data.dataset.image_size == 32


# -- bad input -----------------------------------------------------------------------------

def _break(fmt: str, case: str, root: Path) -> tuple[dict, str]:
    """Damage one sample of a fixture; returns (extra kwargs, text the error must contain)."""
    grey = lambda value, size=(H, W): Image.fromarray(np.full(size, value, dtype=np.uint8))  # noqa: E731
    victim = {
        "folder": (root / "images/dog/dog_01.png", root / "masks/dog/dog_01.png"),
        "oxford_pet": (root / "images/Bengal_2.jpg", root / "annotations/trimaps/Bengal_2.png"),
        "voc": (root / "JPEGImages/2007_010001.jpg", root / "SegmentationObject/2007_010001.png"),
        "coco": (root / "train2017/000000000057.jpg", None),
        # class position 1, its first image (write_imagenet_s numbers images 37 * serial % 50000)
        "imagenet_s": (root / "ImageNetS50/validation/n01491361/ILSVRC2012_val_00000111.JPEG",
                       root / "ImageNetS50/validation-segmentation/n01491361/ILSVRC2012_val_00000111.png"),
    }[fmt]
    image, mask = victim
    if case == "missing_image":
        if fmt in ("folder", "imagenet_s"):  # a folder has no list; its "list names a missing file" case is a missing mask
            mask.unlink()
            return {}, "has no mask"
        image.unlink()
        return {}, image.name
    if case == "size_mismatch":
        if fmt == "coco":  # the JSON records 48×40; the file on disk is another size
            Image.new("RGB", (20, 10)).save(image)
        elif fmt == "imagenet_s":  # the release's RGB encoding, at the wrong size
            Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8), mode="RGB").save(mask)
        elif fmt == "voc":
            img = Image.fromarray(np.zeros((10, 20), dtype=np.uint8), mode="P")
            img.putpalette([0, 0, 0] * 256)
            img.save(mask)
        else:
            grey(2 if fmt == "oxford_pet" else 0, (10, 20)).save(mask)
        return {}, image.stem
    if case == "non_binary":
        if fmt == "folder":
            grey(128).save(mask)
            return {"strict_binary": True}, "not binary"
        if fmt == "oxford_pet":
            grey(7).save(mask)  # trimaps hold 1, 2, 3 only
            return {}, "outside [1, 2, 3]"
    if case == "corrupt":
        image.write_bytes(image.read_bytes()[:200])  # a truncated JPEG/PNG
        return {}, "corrupt"
    if case == "empty_class":
        (root / "images" / "empty").mkdir()
        return {}, "empty"
    raise AssertionError(case)


# Every (format, case) that applies: non-binary masks exist where masks are files of values
# (folder with strict_binary, Oxford trimaps); class folders only in the folder format.
BAD_CASES = [(fmt, case) for fmt in FACTORIES for case in ("missing_image", "size_mismatch", "corrupt")]
BAD_CASES += [("folder", "non_binary"), ("oxford_pet", "non_binary"), ("folder", "empty_class")]


@pytest.mark.parametrize("fmt, case", BAD_CASES)
def test_bad_sample_raises_naming_the_file_or_is_skipped(tmp_path, caplog, fmt, case):
    _write(fmt, tmp_path)
    factory, kw, _ = FACTORIES[fmt]
    kw = dict(kw, image_size=32, val_fraction=0.0)
    if fmt in ("folder", "imagenet_s"):
        kw["test_fraction"] = 0.0
    n_clean = len(factory("train", root=str(tmp_path), **kw).entries)
    extra, fragment = _break(fmt, case, tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match=re.escape(fragment)) as info:
        ds = factory("train", root=str(tmp_path), **kw, **extra)
        for i in range(len(ds)):
            ds[i]
    assert "\n" not in str(info.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ds = factory("train", root=str(tmp_path), skip_bad=True, **kw, **extra)
    assert len(ds.skipped) == 1 and fragment in ds.skipped[0]
    warnings = [r for r in caplog.records if "skipped 1 bad sample" in r.getMessage()]
    assert len(warnings) == 1 and fragment in warnings[0].getMessage()
    for i in range(len(ds)):  # what is left loads
        ds[i]
    assert len(ds) == (n_clean if case == "empty_class" else n_clean - 1)  # only the bad sample is gone
    assert _snapshot(tmp_path) == before  # nothing is ever written into the dataset


@pytest.mark.parametrize("fmt", list(FACTORIES))
def test_missing_or_unset_root(tmp_path, fmt):
    factory = FACTORIES[fmt][0]
    with pytest.raises(UserError, match=f"data.root is required for data={fmt}"):
        factory("train", root=None)
    with pytest.raises(UserError, match="does not exist"):
        factory("train", root=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist|needs images|needs validation"):  # a directory without the format's files
        factory("train", root=str(tmp_path))


def test_malformed_annotation_files(tmp_path):
    write_oxford_pet(tmp_path / "pet")
    (tmp_path / "pet/annotations/test.txt").write_text("Abyssinian_1 one 1 1\n")
    with pytest.raises(UserError, match=r"test.txt' line 1"):
        oxford_pet("train", root=str(tmp_path / "pet"))
    write_coco(tmp_path / "coco", "train2017")
    (tmp_path / "coco/annotations/instances_train2017.json").write_text("{not json")
    with pytest.raises(UserError, match="instances_train2017.json' is not a COCO instances JSON"):
        coco("train", root=str(tmp_path / "coco"))


@pytest.mark.parametrize("args, fragment", [
    (["data=voc"], "data.root is required for data=voc"),
    (["data=folder", "data.root=/nonexistent/dataset"], "does not exist"),
])
def test_train_cli_data_errors_are_one_line(tmp_path, args, fragment):
    result = run_cli("train.py", [*args, "logger=none"], tmp_path, timeout=180)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


def test_read_object_mask_any_nonzero_in_grey_palette_and_rgb_files(tmp_path):
    obj = np.zeros((H, W), dtype=bool)
    obj[4:20, 6:30] = True
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[obj] = (232, 3, 0)  # ImageNet-S: class id R + 256 G = 1000
    files = {"grey.png": Image.fromarray(obj.astype(np.uint8) * 7), "rgb.png": Image.fromarray(rgb),
             "white.png": Image.fromarray(np.repeat(obj[..., None].astype(np.uint8) * 255, 3, axis=2))}
    palette = Image.fromarray(obj.astype(np.uint8) * 3, mode="P")
    palette.putpalette([0, 0, 0] * 256)
    files["palette.png"] = palette
    for name, img in files.items():
        img.save(tmp_path / name)
        assert torch.equal(read_object_mask(tmp_path / name, (H, W))[0].bool(), torch.from_numpy(obj)), name
    assert read_object_mask(tmp_path / "white.png", (H, W), strict_binary=True).sum() == obj.sum()
    with pytest.raises(UserError, match="not binary"):
        read_object_mask(tmp_path / "rgb.png", (H, W), strict_binary=True)
    with pytest.raises(UserError, match=r"is 48×40 \(W×H\) but its image is 40×40"):
        read_object_mask(tmp_path / "grey.png", (H, H))
    assert open_image(tmp_path / "rgb.png").shape == (3, H, W)


# -- data.num_classes from the data --------------------------------------------------------

def test_train_on_a_three_class_folder_takes_num_classes_from_the_folders(tmp_path):
    """The issue's case: data=folder on 3 class folders needs no data.num_classes, and the model
    head, the saved config and the checkpoint all get 3."""
    from omegaconf import OmegaConf

    from masktrain.checkpoint import load_classifier
    from masktrain.cli import compose
    from masktrain.training import train

    write_folder_dataset(tmp_path / "data")
    overrides = ["recipe=mask_aug", "data=folder", f"data.root={tmp_path / 'data'}", "data.dataset.image_size=16",
                 "data.dataset.val_fraction=0.25", "data.dataset.test_fraction=0.25", "data.batch_size=4",
                 "data.num_workers=0", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                 "trainer.accelerator=cpu", "logger=none"]
    metrics = train(compose("train", overrides), tmp_path / "run")
    assert metrics["global_step"] >= 1 and 0 <= metrics["test/acc_clean"] <= 1
    model, config = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.num_classes == 3 and config["data"]["num_classes"] == 3 and config["model"]["num_classes"] == 3
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").data.num_classes == 3
    with pytest.raises(UserError, match=r"data.num_classes=2 but the folder dataset has 3 classes; pass data.num_classes=3"):
        train(compose("train", overrides + ["data.num_classes=2"]), tmp_path / "bad")
    with pytest.raises(UserError, match=r"data.num_classes=5 but the folder dataset has 3 classes"):
        train(compose("train", overrides + ["data.num_classes=5"]), tmp_path / "bad")


@pytest.mark.parametrize("fmt, kw, expected", [
    ("oxford_pet", dict(target="species"), 2),
    ("oxford_pet", dict(target="breed"), 4),
    ("voc", {}, 20),
    ("coco", {}, 3),
    ("folder", {}, 3),
])
def test_num_classes_is_inferred_and_an_explicit_value_must_agree(tmp_path, fmt, kw, expected):
    _write(fmt, tmp_path)
    factory, base, _ = FACTORIES[fmt]
    make = functools.partial(factory, root=str(tmp_path), image_size=32, **base, **kw)
    dm = MaskDataModule(dataset=make, num_workers=0, name=fmt)
    assert dm.num_classes == expected
    assert all(dm.dataset(s).num_classes == expected for s in ("val", "test"))  # every split agrees
    assert MaskDataModule(dataset=make, num_classes=expected, num_workers=0).dataset("train") is not None
    with pytest.raises(UserError, match=f"data.num_classes={expected + 1} but the {fmt} dataset has {expected} classes"):
        MaskDataModule(dataset=make, num_classes=expected + 1, num_workers=0, name=fmt).dataset("train")


def test_evaluate_timm_model_on_a_folder_takes_num_classes_from_the_data(tmp_path):
    """evaluate.py without a checkpoint builds the timm model after the data, so a 3-class
    folder gives a 3-output head with no data.num_classes on the command line."""
    write_folder_dataset(tmp_path / "data")
    torch.save(create_model("resnet18", 3).state_dict(), tmp_path / "w.pth")
    out = tmp_path / "report"
    proc = run_cli("evaluate.py", ["model.name=resnet18", f"model.checkpoint_path={tmp_path / 'w.pth'}", "data=folder",
                                   f"data.root={tmp_path / 'data'}", "data.dataset.image_size=32", "data.num_workers=0",
                                   "data.dataset.test_fraction=0.5", "probes=[object_removal]", "methods=[grey]",
                                   "n_images=4", "n_boot=20", f"hydra.run.dir={out}"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["num_classes"] == 3 and report["model"]["num_classes"] == 3
