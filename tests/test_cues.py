import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY
from masktrain.cli import compose
from masktrain.data.cue_eval import cue_arrays, cue_report, main as cue_main, split_entry
from masktrain.data.cues import OUTLINES, CuesDataset, class_cues, classes_with_outline, classes_with_texture, cues
from masktrain.errors import UserError


def test_sample_format_and_determinism():
    ds = CuesDataset("test", length=12, image_size=32)
    image, label, mask = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0} and 0.05 < mask.mean() < 0.7
    assert 0 <= label < 10
    again = CuesDataset("test", length=12, image_size=32)
    assert torch.equal(ds[7][0], again[7][0]) and ds[7][1] == again[7][1]
    assert not torch.equal(ds[0][0], CuesDataset("val", length=12)[0][0])
    assert not torch.equal(ds[0][0], CuesDataset("test", length=12, seed=1)[0][0])
    train = CuesDataset("train", length=3)
    first = train[0][0]
    train.set_epoch(1)
    assert not torch.equal(first, train[0][0])


def test_each_cue_is_shared_by_two_classes_and_the_pair_decides():
    for k in (5, 10, 12):
        outline, texture = class_cues(k)
        pairs = {(int(outline[c, v]), int(texture[c, v])) for c in range(k) for v in range(2)}
        assert len(pairs) == 2 * k  # every (outline, texture) pair names one class
        assert (classes_with_outline(k).sum(axis=1) == 2).all() and (classes_with_texture(k).sum(axis=1) == 2).all()


def test_variants_rerender_the_same_sample_with_one_cue_changed():
    n = 40
    clean, content, outline, conflict = (CuesDataset("test", length=n, variant=v)
                                         for v in ("clean", "content_only", "outline_only", "cue_conflict"))
    for i in range(n):
        img, label, mask = clean[i]
        c = clean.cues(i)
        # outline_only: the same outline, one solid colour inside
        o_img, o_label, o_mask = outline[i]
        assert o_label == label and torch.equal(o_mask, mask)
        assert o_img[:, mask[0].bool()].std(dim=1).max() < 1e-6
        # content_only: the same texture in a neutral disk; background unchanged outside both masks
        t_img, t_label, t_mask = content[i]
        outside = (mask + t_mask)[0] == 0
        assert t_label == label and torch.equal(t_img[:, outside], img[:, outside])
        assert content.cues(i)["outline"] is None and content.cues(i)["texture"] == c["texture"]
        # cue_conflict: label = content class A, outline of another class B, disjoint class pairs
        k = conflict.cues(i)
        assert k["content_class"] == label and k["outline_class"] != label and k["texture"] == c["texture"]
        assert not (conflict.outline_classes(k["outline"]) & conflict.texture_classes(k["texture"])).any()
        assert conflict.outline_classes(k["outline"])[k["outline_class"]]
        assert torch.equal(conflict.background(i), clean.background(i))


def test_background_is_the_image_without_its_object():
    ds = CuesDataset("test", length=5)
    for i in range(5):
        img, _, mask = ds[i]
        assert torch.equal(ds.background(i)[:, mask[0] == 0], img[:, mask[0] == 0])


def test_colour_and_background_carry_no_class_information():
    ds = CuesDataset("train", length=1000, image_size=24)
    labels, colours, corners = [], [], []
    for i in range(len(ds)):
        image, label, mask = ds[i]
        labels.append(label)
        colours.append((image * mask).sum((1, 2)) / mask.sum())
        corners.append(image[:, 0, 0])
    labels = torch.tensor(labels)
    assert torch.bincount(labels, minlength=10).min() > 70
    for values in (torch.stack(colours), torch.stack(corners)):
        per_class = torch.stack([values[labels == c].mean(0) for c in range(10)])
        assert (per_class - values.mean(0)).abs().max() < 0.08


def test_factory_split_names_and_bad_parameters():
    ds = cues("cue_conflict", lengths={"train": 10, "test": 6})
    assert ds.split == "test" and ds.variant == "cue_conflict" and len(ds) == 6
    assert len(cues("content_only", lengths={"test": 6, "content_only": 3})) == 3
    with pytest.raises(UserError, match="num_classes"):
        CuesDataset(num_classes=len(OUTLINES) + 1)
    with pytest.raises(UserError, match="num_classes"):
        CuesDataset(num_classes=4)
    with pytest.raises(UserError, match="variant"):
        CuesDataset(variant="shape_only")
    with pytest.raises(UserError, match="split"):
        cues("holdout")


def test_recipes_default_to_cues_and_keep_silhouettes_and_the_shapes_alias():
    cfg = compose("train", ["recipe=baseline"])
    assert cfg.data.name == "cues" and cfg.data.dataset._target_ == "masktrain.data.cues.cues"
    for recipe in ("mask_aug", "silhouette_aug", "layer_mask_aug"):
        assert compose("train", [f"recipe={recipe}"]).data.name == "cues"
    for name in ("silhouettes", "shapes"):
        cfg = compose("train", ["recipe=baseline", f"data={name}"])
        assert cfg.data.name == name and cfg.data.dataset._target_ == "masktrain.data.shapes.shapes"
        assert cfg.data.dataset.texture_reliability == 0.0


class Oracle(nn.Module):
    """Predicts from a lookup of the dataset's own cue tables (to test cue_eval's bookkeeping):
    ``mode`` = "outline" (the outline's variant-0 class) or "texture"."""

    def __init__(self, table: dict[bytes, int]) -> None:
        super().__init__()
        self.table = table

    def forward(self, images):
        preds = torch.tensor([self.table[x.numpy().tobytes()] for x in images])
        return nn.functional.one_hot(preds, 10).float()


def oracle(mode: str, n: int) -> Oracle:
    table = {}
    for variant in ("clean", "content_only", "outline_only", "cue_conflict"):
        ds = CuesDataset("test", length=n, variant=variant)
        for i in range(n):
            cue = ds.cues(i)[mode]
            table[ds[i][0].numpy().tobytes()] = 0 if cue is None else int(cue)
    return Oracle(table)


def test_cue_report_separates_an_outline_reader_from_a_content_reader():
    n = 60
    factory = lambda split: cues(split, lengths={"test": n})  # noqa: E731
    shape = cue_report(oracle("outline", n), factory, n_images=n)
    content = cue_report(oracle("texture", n), factory, n_images=n)
    assert shape["outline_only"]["cue_consistent"]["value"] == 1.0 and content["content_only"]["cue_consistent"]["value"] == 1.0
    assert shape["cue_conflict"]["shape_preference"]["value"] == 1.0 and content["cue_conflict"]["shape_preference"]["value"] == 0.0
    assert shape["cue_conflict"]["shape_share"]["value"] == 1.0 and content["cue_conflict"]["content_share"]["value"] == 1.0
    # a one-cue reader names the class on the variant-0 half only
    for report in (shape, content):
        assert 0.3 < report["clean"]["accuracy"]["value"] < 0.7
    assert set(shape) == {"clean", "content_only", "outline_only", "cue_conflict"}


def test_split_entry_counts():
    ds = CuesDataset("test", length=4, variant="cue_conflict")
    tables = cue_arrays(ds, 4)
    preds = tables["outline_class"].copy()
    preds[0] = tables["content_class"][0]
    entry = split_entry("cue_conflict", ds, preds, tables)
    assert entry["shape_label"]["k"] == 3 and entry["content_label"]["k"] == 1
    assert entry["shape_preference"]["value"] == pytest.approx(0.75) and entry["shape_preference"]["n"] == 4


def test_cue_eval_cli_on_a_trained_checkpoint(tmp_path, capsys):
    from masktrain.training import train

    train(compose("train", ["recipe=baseline", "logger=none", *TINY]), tmp_path / "run")
    out = tmp_path / "cues.json"
    report = cue_main([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "n_images=8", f"out={out}"])
    printed = capsys.readouterr().out
    assert "shape preference" in printed and "content_only" in printed
    saved = json.loads(out.read_text())["splits"]
    assert saved["clean"]["accuracy"]["n"] == 8 and saved == json.loads(json.dumps(report))
    assert not list(tmp_path.glob(".*tmp"))


def test_cue_eval_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cue_main(["checkpoint=" + str(tmp_path / "missing.ckpt")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cue_main(["ckpt=x"])
    assert "not understood" in capsys.readouterr().err


def test_cue_eval_refuses_other_datasets(tmp_path, capsys):
    from masktrain.training import train

    train(compose("train", ["recipe=baseline", "logger=none", "data=silhouettes", *TINY]), tmp_path / "run")
    with pytest.raises(SystemExit):
        cue_main([f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "n_images=4"])
    assert "data=cues" in capsys.readouterr().err


def test_cues_and_silhouettes_are_registered_datasets():
    from masktrain.data import DATASETS
    from masktrain.data.shapes import ShapesDataset

    ds = DATASETS.get("cues")("test", lengths={"test": 3}, image_size=32)
    assert isinstance(ds, CuesDataset) and len(ds) == 3
    assert isinstance(DATASETS.get("silhouettes")("test", lengths={"test": 2}, image_size=32), ShapesDataset)
