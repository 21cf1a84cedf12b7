import pytest
import torch

from masktrain.errors import UserError
from masktrain.fills import FILLS, Fill, fill
from masktrain.masks import make_keep_masks
from masktrain.rng import step_generator


def _batch(seed=0):
    g = step_generator(seed, 0, 0)
    images = torch.rand(6, 3, 32, 32, generator=g)
    keep = make_keep_masks("rectangles", 6, (32, 32), g, count=2, area=(0.1, 0.3))
    return images, keep


@pytest.mark.parametrize("method", sorted(FILLS))
def test_fill_leaves_visible_pixels_untouched(method):
    images, keep = _batch()
    out = fill(images, keep, method, step_generator(1, 0, 0))
    assert out.shape == images.shape
    vis = keep.bool().expand_as(images)
    assert torch.equal(out[vis], images[vis])
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("method", sorted(FILLS))
def test_fill_never_reads_removed_pixels(method):
    images, keep = _batch()
    other = torch.where(keep.bool(), images, torch.rand_like(images))
    a = fill(images, keep, method, step_generator(1, 0, 0))
    b = fill(other, keep, method, step_generator(1, 0, 0))
    assert torch.allclose(a, b, atol=1e-6)


def test_fill_colours():
    images, keep = _batch()
    removed = ~keep.bool().expand_as(images)
    assert fill(images, keep, "black")[removed].abs().max() == 0
    grey = fill(images, keep, "grey", mean=(0.1, 0.2, 0.3))
    assert torch.allclose(grey[:, 1][removed[:, 1]], torch.tensor(0.2))
    mean = fill(images, keep, "mean")
    visible_mean = (images * keep).sum((2, 3)) / keep.sum((2, 3))
    assert torch.allclose(mean[0, :, ~keep[0, 0].bool()].mean(1), visible_mean[0], atol=1e-5)
    rc = fill(images, keep, "random_colour", step_generator(0, 0, 0))
    per_image = rc[0, :, ~keep[0, 0].bool()]
    assert torch.allclose(per_image.std(dim=1), torch.zeros(3), atol=1e-6)


def test_unknown_fill_is_a_user_error():
    images, keep = _batch()
    with pytest.raises(UserError, match="'pink' is unknown"):
        fill(images, keep, "pink")
    with pytest.raises(UserError):
        Fill("pink")
