import pytest
import torch

from masktrain.data.shapes import SHAPES, ShapesDataset, shapes
from masktrain.errors import UserError


def test_sample_format_and_binary_mask():
    ds = ShapesDataset("train", length=20, image_size=48, num_classes=10)
    image, label, mask = ds[3]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert mask.shape == (1, 48, 48) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 <= label < 10
    assert 0.05 < mask.mean() < 0.7


def test_deterministic_from_seed_split_index():
    a = ShapesDataset("test", length=10, seed=1)
    b = ShapesDataset("test", length=10, seed=1)
    for i in (0, 7):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    other_split = ShapesDataset("val", length=10, seed=1)
    other_seed = ShapesDataset("test", length=10, seed=2)
    assert not torch.equal(a[0][0], other_split[0][0])
    assert not torch.equal(a[0][0], other_seed[0][0])


def test_train_samples_fresh_each_epoch_eval_fixed():
    train = ShapesDataset("train", length=5)
    first = train[0][0]
    train.set_epoch(1)
    assert not torch.equal(first, train[0][0])
    train.set_epoch(0)
    assert torch.equal(first, train[0][0])
    test = ShapesDataset("test", length=5)
    before = test[0][0]
    test.set_epoch(3)
    assert torch.equal(before, test[0][0])


def test_classes_balanced_and_object_colour_independent_of_class():
    ds = ShapesDataset("train", length=1500, image_size=24, num_classes=5)
    labels, colours = [], []
    for i in range(len(ds)):
        image, label, mask = ds[i]
        labels.append(label)
        colours.append((image * mask).sum((1, 2)) / mask.sum())
    labels = torch.tensor(labels)
    counts = torch.bincount(labels, minlength=5).float()
    assert counts.min() > 0.8 * counts.mean()
    colours = torch.stack(colours)
    per_class = torch.stack([colours[labels == k].mean(0) for k in range(5)])
    assert (per_class - colours.mean(0)).abs().max() < 0.06


def test_texture_reliability_plants_class_texture():
    ds = ShapesDataset("train", length=4, image_size=32, num_classes=4, texture_reliability=1.0)
    image, label, mask = ds[0]
    inside = image[:, mask[0].bool()]
    assert inside.std(dim=1).max() > 0.05  # striped, not a solid colour


def test_bad_parameters():
    with pytest.raises(UserError, match="num_classes"):
        ShapesDataset(num_classes=len(SHAPES) + 1)
    with pytest.raises(UserError, match="texture_reliability"):
        ShapesDataset(texture_reliability=1.5)
    with pytest.raises(UserError, match="split"):
        shapes("holdout")
