"""Foreground/background conditions (masktrain.conditions) and the tile fill, exact on hand-made batches."""
import pytest
import torch

from masktrain.conditions import CONDITIONS, Pool, apply_condition, object_box, partner_indices
from masktrain.errors import UserError
from masktrain.fills import FILLS, fill
from masktrain.methods import get_method
from masktrain.fills.tile import tile

H = W = 6


def batch(labels=(0, 1)):
    """Two 6x6 images with distinct pixel values; object 0 an L inside rows 1-2 x cols 1-2
    (box rows 1-2, cols 1-2), object 1 rows 3-4 x cols 3-5 minus one corner."""
    images = torch.arange(2 * 3 * H * W, dtype=torch.float32).view(2, 3, H, W) / (2 * 3 * H * W)
    objects = torch.zeros(2, 1, H, W)
    objects[0, 0, 1:3, 1:3] = 1
    objects[0, 0, 1, 2] = 0
    objects[1, 0, 3:5, 3:6] = 1
    objects[1, 0, 4, 5] = 0
    return images, torch.tensor(labels), objects


def model_input(name, method, labels=(0, 1), **kw):
    """What the model sees: the method's rendering of the condition, and the keep mask it gets."""
    images, labels, objects = batch(labels)
    m = get_method(method)
    c = apply_condition(name, images, labels, objects, m, **kw)
    return m.render(c.images, c.keep), c.keep, c


def test_registry_names_follow_in9_plus_mask_of_truth():
    assert list(CONDITIONS) == ["original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "only_fg_b",
                                "mixed_same", "mixed_rand", "mixed_next"]
    with pytest.raises(UserError, match="unknown"):
        apply_condition("only_bg", *batch())


def test_object_box():
    _, _, objects = batch()
    box = object_box(objects)
    expected = torch.zeros(2, 1, H, W)
    expected[0, 0, 1:3, 1:3] = 1
    expected[1, 0, 3:5, 3:6] = 1
    assert torch.equal(box, expected)
    assert object_box(torch.zeros(1, 1, 4, 4)).sum() == 0


def _box_keep():
    keep = torch.ones(2, 1, H, W)
    keep[0, 0, 1:3, 1:3] = 0
    keep[1, 0, 3:5, 3:6] = 0
    return keep


@pytest.mark.parametrize("method", ["black", "layer"])
def test_single_image_conditions_exact(method):
    images, _, objects = batch()
    box = 1 - _box_keep()
    expected_keep = {
        "original": torch.ones(2, 1, H, W), "only_fg": objects, "no_fg": 1 - objects,
        "only_bg_b": 1 - box, "only_fg_b": box,
    }
    for name, keep in expected_keep.items():
        shown, got_keep, c = model_input(name, method)
        # black fill and layer's rendering both zero the removed pixels; layer also gets the mask
        assert torch.equal(shown, images * keep), name
        assert torch.equal(got_keep, keep), name
        assert torch.equal(c.images, images), name  # these conditions never change pixels
        assert (c.partner == -1).all()


@pytest.mark.parametrize("method", ["black", "layer", "grey"])
def test_only_bg_t_tiles_the_box_whatever_the_method(method):
    images, _, _ = batch()
    expected = images.clone()
    # image 0: box rows 1-2 x cols 1-2; strips top 6, bottom 18, left 6, right 18 px -> bottom
    # (first of the ties), rows 3 + (y - 1) mod 3 -> rows 3, 4.
    expected[0, :, 1:3, 1:3] = images[0, :, 3:5, 1:3]
    # image 1: box rows 3-4 x cols 3-5; strips top 18, bottom 6, left 18, right 0 -> top, rows 0, 1.
    expected[1, :, 3:5, 3:6] = images[1, :, 0:2, 3:6]
    shown, keep, _ = model_input("only_bg_t", method)
    assert torch.equal(shown, expected) and torch.equal(keep, torch.ones(2, 1, H, W))


def _pasted(images, objects, background, i, j):
    out = background[j].clone()
    where = objects[i, 0] > 0
    out[:, where] = images[i][:, where]
    return out


@pytest.mark.parametrize("name,labels", [("mixed_same", (0, 0)), ("mixed_rand", (0, 1)), ("mixed_next", (0, 1))])
def test_mixed_black_exact(name, labels):
    images, _, objects = batch(labels)
    background = images * _box_keep()  # each partner's box removed by the black fill
    shown, keep, c = model_input(name, "black", labels, num_classes=2)
    assert c.partner.tolist() == [1, 0] and not c.fallback.any()
    expected = torch.stack([_pasted(images, objects, background, 0, 1), _pasted(images, objects, background, 1, 0)])
    assert torch.equal(shown, expected) and torch.equal(keep, torch.ones(2, 1, H, W))


def test_mixed_layer_exact():
    images, _, objects = batch()
    shown, keep, c = model_input("mixed_rand", "layer")
    pixels = torch.stack([_pasted(images, objects, images, 0, 1), _pasted(images, objects, images, 1, 0)])
    box = 1 - _box_keep()
    # visible: own object, or outside the partner's box; the partner's box is masked
    expected_keep = torch.stack([torch.maximum(objects[0], 1 - box[1]), torch.maximum(objects[1], 1 - box[0])])
    assert torch.equal(keep, expected_keep)
    assert torch.equal(shown, pixels * expected_keep)
    assert keep[0, 0, 3, 3] == 0 and keep[0, 0, 1, 1] == 1  # partner box masked, own object visible


def test_mixed_tile_fills_the_partner_from_the_partner_alone():
    images, _, objects = batch()
    shown, keep, _ = model_input("mixed_rand", "tile")
    background = images.clone()
    background[0, :, 1:3, 1:3] = images[0, :, 3:5, 1:3]
    background[1, :, 3:5, 3:6] = images[1, :, 0:2, 3:6]
    expected = torch.stack([_pasted(images, objects, background, 0, 1), _pasted(images, objects, background, 1, 0)])
    assert torch.equal(shown, expected)


def test_mixed_same_without_a_same_class_partner_falls_back_and_says_so():
    _, _, c = model_input("mixed_same", "black", (0, 1))
    assert c.partner.tolist() == [1, 0] and c.fallback.all()


def test_condition_without_object_masks_is_a_user_error():
    images, labels, _ = batch()
    with pytest.raises(UserError, match="needs object masks"):
        apply_condition("no_fg", images, labels, None)


# -- partners -----------------------------------------------------------------------------------
def test_partners_follow_their_rule_and_never_self():
    labels = torch.arange(60) % 3
    rows = torch.arange(60) + 1000
    for kind in ("same", "rand", "next"):
        index, fallback = partner_indices(kind, labels, rows, 7, labels, rows, 3)
        assert not fallback.any() and (index != torch.arange(60)).all()
        if kind == "same":
            assert torch.equal(labels[index], labels)
        if kind == "next":
            assert torch.equal(labels[index], (labels + 1) % 3)
    a, _ = partner_indices("rand", labels, rows, 7, labels, rows, 3)
    b, _ = partner_indices("rand", labels, rows, 8, labels, rows, 3)
    assert (a != b).any() and torch.equal(a, partner_indices("rand", labels, rows, 7, labels, rows, 3)[0])
    assert len(set(a.tolist())) > 20  # spread over the pool, not one shared partner


def test_partners_with_a_pool_do_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(0)
    n = 40
    images = torch.rand(n, 3, 8, 8, generator=g)
    objects = (torch.rand(n, 1, 8, 8, generator=g) > 0.6).float()
    labels = torch.arange(n) % 4
    rows = torch.arange(n)
    pool = Pool(images, labels, objects, rows)
    full = apply_condition("mixed_same", images, labels, objects, "grey", seed=3, rows=rows, pool=pool, num_classes=4)
    parts = [apply_condition("mixed_same", images[s], labels[s], objects[s], "grey", seed=3, rows=rows[s], pool=pool,
                             num_classes=4) for s in (slice(0, 7), slice(7, 40))]
    assert torch.equal(torch.cat([p.partner for p in parts]), full.partner)
    assert torch.equal(torch.cat([p.images for p in parts]), full.images)


# -- tile fill ----------------------------------------------------------------------------------
def test_tile_is_registered_as_a_fill():
    assert "tile" in FILLS
    images, _, objects = batch()
    assert torch.equal(fill(images, torch.ones(2, 1, H, W), "tile"), images)


def _random_case(seed, B=6, size=12):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, size, size, generator=g)
    keep = torch.ones(B, 1, size, size)
    for b in range(B):  # hand-placed holes of several shapes, including a non-rectangle
        y, x = int(torch.randint(0, size - 4, (1,), generator=g)), int(torch.randint(0, size - 4, (1,), generator=g))
        keep[b, 0, y:y + 2 + b % 3, x:x + 3] = 0
        keep[b, 0, y, x + 3 if x + 3 < size else x] = 0
    return images, keep


def test_tile_keeps_visible_pixels_and_copies_only_visible_ones():
    images, keep = _random_case(0)
    out = fill(images, keep, "tile")
    assert torch.equal(out[keep.expand_as(out) > 0], images[keep.expand_as(images) > 0])
    for b in range(images.shape[0]):
        visible = images[b].flatten(1)[:, keep[b, 0].flatten() > 0].T  # (n, 3)
        removed = out[b].flatten(1)[:, keep[b, 0].flatten() == 0].T
        for value in removed:
            assert (visible == value).all(dim=1).any(), "a filled pixel is not a visible pixel of its image"


def test_tile_never_reads_removed_pixels():
    images, keep = _random_case(1)
    changed = torch.where(keep > 0, images, torch.rand_like(images) + 5.0)
    assert torch.equal(fill(images, keep, "tile"), fill(changed, keep, "tile"))
    assert torch.equal(tile(images, keep), tile(changed, keep))  # no position, visible or not, reads a removed pixel


def test_tile_is_batched_consistently_and_falls_back_to_the_visible_mean():
    images, keep = _random_case(2)
    whole = fill(images, keep, "tile")
    one_by_one = torch.cat([fill(images[b:b + 1], keep[b:b + 1], "tile") for b in range(len(images))])
    assert torch.equal(whole, one_by_one)
    # a hole touching all four sides leaves no strip: the visible mean colour fills it
    ring = torch.zeros(1, 1, 8, 8)
    ring[0, 0, 3:5, 3:5] = 1
    img = torch.rand(1, 3, 8, 8)
    out = fill(img, ring, "tile")
    mean = img[0, :, 3:5, 3:5].mean(dim=(1, 2))
    assert torch.allclose(out[0, :, 0, 0], mean) and torch.equal(out[0, :, 3:5, 3:5], img[0, :, 3:5, 3:5])
