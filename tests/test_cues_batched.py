"""The DataLoader's batched fetch of the cues dataset (``__getitems__`` → ``render_batch``) gives
every sample the exact bits of ``dataset[i]``, for every variant, split, epoch and batch size."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from masktrain.data.cues import VARIANTS, CuesDataset
from masktrain.data.datamodule import MaskDataModule
from masktrain.data.shapes import shape_masks, SHAPES

# Batch sizes around numpy's SIMD widths and tails; unordered, repeated and non-contiguous indices.
INDICES = [[5], [0, 1, 2], list(range(37)), [90, 3, 3, 64, 17, 120, 41, 7, 99, 1, 0, 58, 76]]


def assert_same_samples(batch, ds, indices):
    assert len(batch) == len(indices)
    for (image, label, mask), i in zip(batch, indices):
        ref_image, ref_label, ref_mask = ds[i]
        assert label == ref_label and type(label) is int
        assert image.dtype == ref_image.dtype and image.shape == ref_image.shape
        assert torch.equal(image, ref_image), f"sample {i}: image differs from dataset[{i}]"
        assert torch.equal(mask, ref_mask), f"sample {i}: mask differs from dataset[{i}]"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split,epoch,size", [("train", 0, 32), ("train", 3, 32), ("test", 0, 32), ("val", 0, 29)])
def test_batched_fetch_is_bit_identical_to_one_sample_at_a_time(variant, split, epoch, size):
    ds = CuesDataset(split, length=128, image_size=size, variant=variant, epoch=epoch)
    for indices in INDICES:
        assert_same_samples(ds.__getitems__(indices), ds, indices)
        backgrounds = ds.backgrounds(indices)
        assert backgrounds.shape == (len(indices), 3, size, size)
        for row, i in zip(backgrounds, indices):
            assert torch.equal(row, ds.background(i))


def test_a_full_training_batch_matches_and_is_what_the_loader_yields():
    ds = CuesDataset("train", length=300, epoch=1)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0)).tolist()[:128]
    assert_same_samples(ds.__getitems__(order), ds, order)
    # The default collate of the batched fetch equals stacking dataset[i] (Subset forwards __getitems__).
    images, labels, masks = next(iter(DataLoader(Subset(ds, order), batch_size=128)))
    ref = [ds[i] for i in order]
    assert torch.equal(images, torch.stack([r[0] for r in ref])) and torch.equal(masks, torch.stack([r[2] for r in ref]))
    assert labels.tolist() == [r[1] for r in ref]


def test_the_datamodule_train_loader_fetches_in_batches(monkeypatch):
    calls = []
    real = CuesDataset.__getitems__
    monkeypatch.setattr(CuesDataset, "__getitems__", lambda self, idx: calls.append(len(idx)) or real(self, idx))
    dm = MaskDataModule(lambda split: CuesDataset(split, length=64), batch_size=16, num_workers=0)
    images, labels, masks = next(iter(dm.train_dataloader()))
    assert calls == [16] and images.shape == (16, 3, 32, 32) and masks.shape == (16, 1, 32, 32) and labels.shape == (16,)
    # ... and yields what one-by-one fetching in the shuffle's order gives (the batches a run trained on before).
    ds, order = dm.dataset("train"), list(iter(dm.train_dataloader().sampler))[:16]
    ref = [ds[i] for i in order]
    assert torch.equal(images, torch.stack([r[0] for r in ref])) and torch.equal(masks, torch.stack([r[2] for r in ref]))
    assert labels.tolist() == [r[1] for r in ref]


def test_out_of_range_index_raises_like_one_sample():
    ds = CuesDataset("test", length=10)
    with pytest.raises(IndexError):
        ds.__getitems__([0, 10])
    with pytest.raises(IndexError):
        ds[10]


def test_shape_masks_equals_each_shape_alone():
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-1.2, 1.2, (2, 23, 17, 19))
    names = [list(SHAPES)[i % len(SHAPES)] for i in range(23)]
    out = shape_masks(names, u, v)
    for i, name in enumerate(names):
        assert np.array_equal(out[i], SHAPES[name](u[i], v[i]))


def test_a_subclass_that_renders_its_own_samples_is_fetched_one_by_one():
    class Inverted(CuesDataset):
        def __getitem__(self, index):
            image, label, mask = super().__getitem__(index)
            return 1 - image, label, mask

    ds = Inverted("test", length=8)
    images, _, _ = next(iter(DataLoader(ds, batch_size=8)))
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(8)]))


def test_val_batches_are_rendered_once_and_handed_out_as_copies(monkeypatch):
    renders = []
    real = CuesDataset.render_batch
    monkeypatch.setattr(CuesDataset, "render_batch", lambda self, idx, **kw: renders.append(self.split) or real(self, idx, **kw))
    val, train = CuesDataset("val", length=64), CuesDataset("train", length=64)
    indices = list(range(0, 64, 3))
    first = val.__getitems__(indices)
    first[0][0].fill_(7.0)  # a caller writing into its batch must not reach the next epoch's
    second = val.__getitems__(indices)
    assert renders == ["val"]
    assert_same_samples(second, val, indices)
    train.__getitems__(indices)
    train.set_epoch(1)
    assert_same_samples(train.__getitems__(indices), train, indices)  # fresh every epoch: never cached
    assert renders == ["val", "train", "train"]
