"""IN-9 (Backgrounds Challenge release) as a dataset, on a small tree in the release's exact layout."""
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from masktrain.cli import compose
from masktrain.data.in9 import (IN9Dataset, NO_IN9_CLASS, check_model_outputs, foreground_name, imagenet_to_in9,
                                map_imagenet_logits)
from masktrain.errors import UserError
from masktrain.training import train

CLASS_DIRS = ["00_dog", "01_bird", "02_wheeled vehicle"]  # spaces as in the release
S = 16


def _name(c: int, i: int) -> str:
    return f"n0{2085620 + c}_{i:05d}"


def _mask(c: int, i: int) -> np.ndarray:
    m = np.zeros((S, S), dtype=bool if c % 2 == 0 else np.uint8)
    m[2 + c:8 + c, 3 + i:9 + i] = 1
    return m


def write_in9(root: Path, split: str = "val", variants=("original", "mixed_rand", "no_fg"), masks: bool = True,
              per_class: int = 2) -> Path:
    """<root>/<variant>/<split>/<NN_class>/<name>.JPEG and <root>/fg_mask/<split>/<NN_class>/<name>.npy;
    mixed files are fg_<fg>_bg_<bg>.JPEG in the foreground's class folder."""
    rng = np.random.default_rng(0)
    for variant in variants:
        for c, cls in enumerate(CLASS_DIRS):
            folder = root / variant / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                name = _name(c, i)
                if variant.startswith("mixed"):
                    name = f"fg_{name}_bg_{_name((c + 1) % 3, i)}"
                pixels = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}.JPEG", quality=95)
    if masks:
        for c, cls in enumerate(CLASS_DIRS):
            folder = root / "fg_mask" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                np.save(folder / f"{_name(c, i)}.npy", _mask(c, i))
    return root


def _by_name(ds):
    return {e.image.stem: (ds[k][1], ds[k][2]) for k, e in enumerate(ds.entries)}


def test_reads_original_labels_and_masks(tmp_path):
    ds = IN9Dataset(write_in9(tmp_path), split="test", variant="original", image_size=S)
    assert len(ds) == 6 and ds.has_object_masks and ds.num_classes == 9
    for stem, (label, mask) in _by_name(ds).items():
        c, i = int(stem[1:9]) - 2085620, int(stem[-5:])
        assert label == c
        assert torch.equal(mask, torch.from_numpy(_mask(c, i) != 0).float()[None])


def test_mixed_files_take_their_foreground_mask(tmp_path):
    ds = IN9Dataset(write_in9(tmp_path), split="test", variant="mixed_rand", image_size=S)
    assert foreground_name("fg_n02497673_05944_bg_n02536864_02721") == "n02497673_05944"
    for stem, (label, mask) in _by_name(ds).items():
        fg = foreground_name(stem)
        c, i = int(fg[1:9]) - 2085620, int(fg[-5:])
        assert label == c and torch.equal(mask, torch.from_numpy(_mask(c, i) != 0).float()[None])


def test_data_in9_composes_and_builds_from_hydra(tmp_path):
    write_in9(tmp_path)
    cfg = compose("train", ["data=in9", f"data.root={tmp_path}", "data.variant=no_fg", f"data.dataset.image_size={S}",
                            "data.num_workers=0"])
    assert cfg.data.in9.map_imagenet is False and cfg.data.num_classes == 9
    dm = hydra.utils.instantiate(cfg.data)
    ds = dm.dataset("test")
    assert isinstance(ds, IN9Dataset) and ds.variant == "no_fg" and len(ds) == 6
    images, labels, masks = next(iter(dm.test_dataloader()))
    assert images.shape == (6, 3, S, S) and masks.shape == (6, 1, S, S) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_without_fg_mask_the_set_says_it_has_no_masks(tmp_path):
    ds = IN9Dataset(write_in9(tmp_path, masks=False), split="test", image_size=S)
    assert not ds.has_object_masks and ds[0][2].sum() == 0
    with pytest.raises(UserError, match="object_masks=required"):
        IN9Dataset(tmp_path, split="test", image_size=S, object_masks="required")


@pytest.mark.parametrize("case,message", [
    ("variant", "data.variant='mixed' is unknown"),
    ("missing_variant", "has no only_fg/val/ folder"),
    ("missing_split", "has no original/train/ folder"),
    ("class_name", "is not named <NN>_<class>"),
    ("missing_mask", "has no object mask"),
    ("bad_mask", "cannot read object mask"),
])
def test_bad_trees_are_one_line_user_errors(tmp_path, case, message):
    root = write_in9(tmp_path / "bg")
    kwargs = dict(root=root, split="test", variant="original", image_size=S)
    if case == "variant":
        kwargs["variant"] = "mixed"
    elif case == "missing_variant":
        kwargs["variant"] = "only_fg"
    elif case == "missing_split":
        kwargs["split"] = "train"
    elif case == "class_name":
        (root / "original" / "val" / "dog").mkdir()
    elif case == "missing_mask":
        next((root / "fg_mask" / "val" / "01_bird").glob("*.npy")).unlink()
    elif case == "bad_mask":
        for p in (root / "fg_mask" / "val" / "01_bird").glob("*.npy"):
            p.write_text("not numpy")
    with pytest.raises(UserError, match=message) as info:
        ds = IN9Dataset(**kwargs)
        [ds[k] for k in range(len(ds))]
    assert "\n" not in str(info.value)


def test_imagenet_mapping_matches_the_challenge_protocol():
    table = imagenet_to_in9()
    counts = [int((table == k).sum()) for k in range(9)]
    assert counts == [116, 52, 42, 36, 35, 27, 26, 20, 16] and int((table == -1).sum()) == 630
    assert table[151] == 0 and table[172] == -1 and table[0] == 8 and table[300] == 5 and table[999] == -1
    logits = torch.randn(500, 1000, generator=torch.Generator().manual_seed(0))
    mapped = map_imagenet_logits(logits)
    assert mapped.shape == (500, 10)
    theirs = table[logits.argmax(dim=1)]  # in9_eval.py: top-1 of 1000, mapped; -1 is always wrong
    ours = mapped.argmax(dim=1)
    assert torch.equal(torch.where(theirs < 0, NO_IN9_CLASS, theirs), ours)
    assert (ours == NO_IN9_CLASS).any() and (ours < 9).any()


def test_model_outputs_must_match_the_mapping():
    assert check_model_outputs(9, False) == 9 and check_model_outputs(1000, True) == 10
    with pytest.raises(UserError, match="data.in9.map_imagenet=true"):
        check_model_outputs(1000, False)
    with pytest.raises(UserError, match="maps ImageNet-1k logits"):
        check_model_outputs(9, True)
    with pytest.raises(UserError, match="IN-9 has 9 classes"):
        check_model_outputs(10, False)


def test_training_on_a_condition_without_object_masks_is_one_error_and_writes_nothing(tmp_path):
    root = write_in9(tmp_path / "bg", split="train", masks=False, variants=("original",))
    write_in9(root, split="val", variants=("original",))
    overrides = ["recipe=no_fg", "data=in9", f"data.root={root}", f"data.dataset.image_size={S}", "data.num_workers=0",
                 "logger=csv", "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    with pytest.raises(UserError, match="needs object masks, but the in9 train set has none"):
        train(compose("train", overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    result = run_cli("train.py", overrides + [f"hydra.run.dir={tmp_path / 'cli'}"], cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "cli" / "checkpoints").exists()
    assert result.stderr.strip().startswith("error: mask.kind=condition (mask.condition=no_fg) needs object masks") and "Traceback" not in result.stderr
    # the same sets train fine without a condition
    assert train(compose("train", overrides[1:] + ["recipe=baseline"]), tmp_path / "ok")["global_step"] >= 1
