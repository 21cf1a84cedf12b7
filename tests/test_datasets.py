import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from dataset_fixtures import SIZE, write_folder_dataset
from masktrain.data.datamodule import MaskDataModule
from masktrain.data.folder import FolderDataset, folder
from masktrain.data.io import open_image, read_object_mask
from masktrain.errors import UserError
from masktrain.evaluation import evaluate
from masktrain.methods import get_method
from masktrain.models import create_model
from masktrain.rng import step_generator


def _all_splits(root, **kw):
    return [s for split in ("train", "val", "test") for s in FolderDataset(str(root), split, **kw).samples]


def test_folder_labels_and_masks_match_what_was_written(tmp_path):
    written = write_folder_dataset(tmp_path)
    samples = _all_splits(tmp_path, image_size=SIZE[1])
    assert len(samples) == len(written)  # every file in exactly one split
    ds = FolderDataset(str(tmp_path), "test", image_size=SIZE[1])
    assert ds.classes == ["cat", "dog", "fox"] and ds.num_classes == 3
    full = FolderDataset(str(tmp_path), "train", image_size=SIZE[1], val_fraction=0.0, test_fraction=0.0)
    for image_path, mask_path, label in full.samples:  # the files as read, before any transform
        name, mask = written[f"{image_path.parent.name}/{image_path.name}"]
        image = open_image(image_path)
        assert full.classes[label] == name and image.shape == (3, SIZE[1], SIZE[0])
        assert torch.equal(read_object_mask(mask_path, tuple(image.shape[-2:]))[0].bool(), torch.from_numpy(mask))


def test_folder_transformed_sample_format(tmp_path):
    write_folder_dataset(tmp_path)
    ds = FolderDataset(str(tmp_path), "train", image_size=32, val_fraction=0.0, test_fraction=0.0)
    image, label, mask = ds[0]
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.mean() < 1
    assert 0 <= label < 3


def test_class_index_file_maps_to_model_outputs(tmp_path):
    write_folder_dataset(tmp_path)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"cat": 281, "dog": 207, "fox": 277}))
    ds = FolderDataset(str(tmp_path), "train", image_size=32, class_index_file=str(index), val_fraction=0.0, test_fraction=0.0)
    assert {label for _, _, label in ds.samples} == {281, 207, 277} and ds.num_classes == 282


def test_one_training_step_and_one_probe_on_folder_data(tmp_path):
    write_folder_dataset(tmp_path)
    dm = MaskDataModule(dataset=functools.partial(folder, root=str(tmp_path), image_size=32, val_fraction=0.0, test_fraction=0.5),
                        num_classes=3, batch_size=4, num_workers=0)
    images, labels, objects = next(iter(dm.train_dataloader()))
    model = create_model("resnet18", 3)
    keep = 1 - objects
    loss = torch.nn.functional.cross_entropy(get_method("grey").logits(model, images, keep, step_generator(0, 0, 0)), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.conv1.weight.grad is not None
    report = evaluate(model.eval(), dm, probes=["object_removal"], methods=["grey"], n_images=4, split="test")
    assert report["probes"]["object_removal"]["grey"]["n"] == 4


@pytest.mark.parametrize("case", ["missing_root", "unset_root", "non_binary", "size_mismatch", "corrupt", "empty_class", "missing_mask"])
def test_folder_bad_input_names_the_file(tmp_path, case):
    write_folder_dataset(tmp_path)
    mask_path = tmp_path / "masks" / "dog" / "dog_01.png"
    image_path = tmp_path / "images" / "dog" / "dog_01.png"
    kwargs = dict(image_size=32, val_fraction=0.0, test_fraction=0.0)
    root, fragment = str(tmp_path), "dog_01"
    if case == "missing_root":
        root, fragment = str(tmp_path / "nope"), "does not exist"
    elif case == "unset_root":
        root, fragment = None, "data.root is required"
    elif case == "non_binary":
        Image.fromarray(np.full((SIZE[1], SIZE[0]), 128, dtype=np.uint8)).save(mask_path)
        kwargs["strict_binary"] = True
        fragment = "not binary"
    elif case == "size_mismatch":
        Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(mask_path)
    elif case == "corrupt":
        image_path.write_bytes(b"\x89PNG garbage")
        fragment = "corrupt"
    elif case == "empty_class":
        (tmp_path / "images" / "empty").mkdir()
        fragment = "empty"
    elif case == "missing_mask":
        mask_path.unlink()
        fragment = "has no mask"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=fragment):
        ds = FolderDataset(root, "train", **kwargs)
        for i in range(len(ds)):
            ds[i]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written into the dataset


@pytest.mark.parametrize("args, fragment", [
    (["data=folder"], "data.root is required"),
    (["data=folder", "data.root=/nonexistent/dataset"], "does not exist"),
])
def test_train_cli_data_errors_are_one_line(tmp_path, args, fragment):
    result = run_cli("train.py", [*args, "logger=none"], tmp_path, timeout=180)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()
