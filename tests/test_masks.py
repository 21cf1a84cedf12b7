import pytest
import torch

from masktrain.errors import UserError
import masktrain.conditions  # noqa: F401  (registers mask.kind=condition)
from masktrain.masks import MASK_KINDS, RandomKeepMask, make_keep_masks, validate_keep
from masktrain.rng import step_generator

SIZE = (64, 64)


def _masks(kind, n=512, seed=0, rank=0, step=0, **params):
    g = step_generator(seed, rank, step)
    objects = None
    if MASK_KINDS.get(kind).needs_object_masks:
        objects = torch.zeros(n, 1, *SIZE)
        for i in range(n):  # distinct object per sample: a square whose side encodes i
            s = 4 + i % 40
            objects[i, :, :s, :s] = 1
        params["object_masks"] = objects
    return make_keep_masks(kind, n, SIZE, g, "cpu", **params), objects


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
def test_keep_masks_are_binary_float_and_shaped(kind):
    keep, _ = _masks(kind, n=16)
    assert keep.shape == (16, 1, *SIZE) and keep.dtype == torch.float32
    assert bool(((keep == 0) | (keep == 1)).all())


# mask.kind=condition is a deterministic function of the object masks (no draw to vary).
RANDOM_KINDS = [k for k in sorted(MASK_KINDS) if k != "condition"]


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_same_masks_other_rank_or_step_differs(kind):
    a, _ = _masks(kind, n=8, seed=3, rank=0, step=5)
    b, _ = _masks(kind, n=8, seed=3, rank=0, step=5)
    c, _ = _masks(kind, n=8, seed=3, rank=1, step=5)
    d, _ = _masks(kind, n=8, seed=3, rank=0, step=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_condition_kind_ignores_seed_rank_and_step():
    a, _ = _masks("condition", n=8, seed=3, rank=0, step=5)
    b, objects = _masks("condition", n=8, seed=4, rank=1, step=6)
    assert torch.equal(a, b) and torch.equal(a, 1 - objects)  # default condition no_fg


def test_rectangles_area_matches_parameter():
    keep, _ = _masks("rectangles", count=1, area=(0.2, 0.2), aspect=(0.3, 3.3))
    removed = 1 - keep.mean(dim=(1, 2, 3))
    assert removed.mean().item() == pytest.approx(0.2, abs=0.01)
    assert removed.min().item() > 0.17 and removed.max().item() < 0.23


def test_rectangles_mean_area_over_range_and_count():
    keep, _ = _masks("rectangles", count=(2, 2), area=(0.01, 0.05), aspect=(0.5, 2.0))
    removed = 1 - keep.mean(dim=(1, 2, 3))
    # two small rectangles, overlap rare: about 2 × 0.03
    assert removed.mean().item() == pytest.approx(0.06, abs=0.008)


def test_rectangles_count_range_gives_that_many_components():
    keep, _ = _masks("rectangles", n=256, count=(0, 0))
    assert torch.equal(keep, torch.ones_like(keep))
    one, _ = _masks("rectangles", n=256, count=(1, 1), area=(0.02, 0.02))
    three, _ = _masks("rectangles", n=256, count=(3, 3), area=(0.02, 0.02))
    ratio = (1 - three.mean()) / (1 - one.mean())
    assert 2.6 < ratio.item() <= 3.0


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_patches_remove_exact_fraction(fraction):
    keep, _ = _masks("patches", n=32, patch_size=8, fraction=(fraction, fraction))
    removed = 1 - keep.mean(dim=(1, 2, 3))
    assert torch.allclose(removed, torch.full_like(removed, fraction), atol=1 / 64 / 2)


def test_patches_are_grid_aligned():
    keep, _ = _masks("patches", n=4, patch_size=8, fraction=(0.5, 0.5))
    cells = keep.view(4, 1, 8, 8, 8, 8)
    assert torch.equal(cells.amax(dim=(3, 5)), cells.amin(dim=(3, 5)))


def test_blobs_area_matches_parameter():
    keep, _ = _masks("blobs", n=64, area=(0.3, 0.3))
    removed = 1 - keep.mean(dim=(1, 2, 3))
    assert torch.allclose(removed, torch.full_like(removed, 0.3), atol=1e-3)
    g = step_generator(0, 0, 0)
    big = make_keep_masks("blobs", 16, (224, 224), g, area=(0.2, 0.2))
    assert torch.allclose(1 - big.mean(dim=(1, 2, 3)), torch.full((16,), 0.2), atol=0.01)


def test_silhouettes_come_from_other_samples():
    keep, objects = _masks("silhouettes", n=40)
    removed = 1 - keep
    for i in range(40):
        assert not torch.equal(removed[i], objects[i])
        assert any(torch.equal(removed[i], objects[j]) for j in range(40))


def test_probability_masks_that_share_of_samples():
    g = step_generator(0, 0, 0)
    sampler = RandomKeepMask("rectangles", p=0.3)
    keep = sampler(4000, (16, 16), g)
    masked = (keep.amin(dim=(1, 2, 3)) == 0).float().mean().item()
    assert masked == pytest.approx(0.3, abs=0.03)
    assert torch.equal(RandomKeepMask("rectangles", p=0.0)(64, (16, 16), g), torch.ones(64, 1, 16, 16))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(kind="rectangles", p=1.5), "mask.p=1.5"),
        (dict(kind="rectangles", p=-0.1), "mask.p=-0.1"),
        (dict(kind="rectangles", p=0.5, area=(0.0, 0.3)), "mask.area"),
        (dict(kind="rectangles", p=0.5, area=(0.1, 1.2)), "mask.area"),
        (dict(kind="blobs", p=0.5, area=(0.0, 0.3)), "mask.area"),
        (dict(kind="triangles", p=0.5), "mask.kind='triangles'"),
        (dict(kind="patches", p=0.5, fraction=(0.2, 1.5)), "mask.fraction"),
    ],
)
def test_bad_mask_parameters_name_the_value(kwargs, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        RandomKeepMask(**kwargs)


def test_validate_keep_rejects_non_binary_and_mismatched():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(UserError, match="not binary"):
        validate_keep(torch.full((2, 1, 8, 8), 0.5), images)
    with pytest.raises(UserError, match="does not match"):
        validate_keep(torch.ones(2, 1, 4, 4), images)
    assert validate_keep(torch.ones(2, 1, 8, 8), images).shape == (2, 1, 8, 8)
