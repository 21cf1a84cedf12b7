import math

import pytest
import torch

from masktrain.control_holes import area_matched_disk, broken_overlap, default_shifts, enclosing_disk, intact_broken_keep
from masktrain.data.cues import CuesDataset
from masktrain.data.shapes import ShapesDataset
from masktrain.probes.inputs import broken_keep


def objects_of(ds, n):
    return torch.stack([ds[i][2] for i in range(n)])


@pytest.fixture(scope="module")
def cue_objects():
    return objects_of(CuesDataset("test", length=120, image_size=32), 120)


def test_area_matched_disk_has_exactly_the_object_area(cue_objects):
    silhouettes = objects_of(ShapesDataset("test", length=60, image_size=48), 60)
    g = torch.Generator().manual_seed(0)
    random = (torch.rand(20, 1, 17, 23, generator=g) < torch.rand(20, 1, 1, 1, generator=g)).float()
    for objects in (cue_objects, silhouettes, random):
        keep = area_matched_disk(objects)
        assert keep.shape == objects.shape and set(keep.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal((1 - keep).sum(dim=(1, 2, 3)), objects.sum(dim=(1, 2, 3)))
    empty, full = torch.zeros(2, 1, 8, 8), torch.ones(1, 1, 8, 8)
    assert torch.equal(area_matched_disk(empty), torch.ones_like(empty)) and area_matched_disk(full).sum() == 0


def test_area_matched_disk_is_a_disk_inside_the_image(cue_objects):
    keep = area_matched_disk(cue_objects)
    hole = (1 - keep)[:, 0]
    B, H, W = hole.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    for b in range(B):
        area = float(hole[b].sum())
        r = math.sqrt(area / math.pi)
        cy, cx = float((hole[b] * ys).sum()) / area, float((hole[b] * xs).sum()) / area
        d = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
        assert hole[b][d <= r - 1].all(), b  # everything well inside the radius is removed
        assert not hole[b][d > r + 1].any(), b  # nothing well outside it
    # centred at the object's centroid when the disk fits there
    obj = torch.zeros(1, 1, 32, 32)
    obj[..., 10:18, 12:16] = 1  # centroid (13.5, 13.5), area 32
    hole = 1 - area_matched_disk(obj)[0, 0]
    c = ((hole * ys[:32, :32]).sum() / hole.sum(), (hole * xs[:32, :32]).sum() / hole.sum())
    assert abs(float(c[0]) - 13.5) < 0.5 and abs(float(c[1]) - 13.5) < 0.5


def test_area_matched_disk_is_shifted_inside_near_the_border():
    obj = torch.zeros(1, 1, 24, 24)
    obj[..., 0:4, 0:20] = 1  # a bar along the top edge: the disk of area 80 (r≈5) must move down
    hole = 1 - area_matched_disk(obj)[0, 0]
    assert hole.sum() == 80
    rows = hole.any(dim=1).nonzero().flatten()
    assert rows.min() == 0 and rows.max() >= 8  # touches the border and extends past the bar


def test_area_matched_disk_carries_no_outline():
    """Objects of different shapes with the same area and centroid get the same hole."""
    H = 32
    shapes = torch.zeros(4, 1, H, H)
    shapes[0, :, 12:20, 12:20] = 1  # 8x8 square
    shapes[1, :, 11:21, 11:21] = 1
    shapes[1, :, 13:19, 13:19] = 0  # square ring, 100 - 36 px
    shapes[2, :, 14:18, 8:24] = 1  # horizontal bar 4x16
    shapes[3, :, 8:24, 14:18] = 1  # vertical bar 16x4
    assert shapes.sum(dim=(1, 2, 3)).tolist() == [64.0] * 4  # same area, all centred at (15.5, 15.5)
    keeps = area_matched_disk(shapes)
    for k in keeps[1:]:
        assert torch.equal(k, keeps[0])
    moved = torch.roll(shapes[:1], shifts=(3, -2), dims=(2, 3))
    assert torch.equal(area_matched_disk(moved), torch.roll(keeps[:1], shifts=(3, -2), dims=(2, 3)))


def test_enclosing_disk_covers_the_object(cue_objects):
    keep = enclosing_disk(cue_objects)
    assert ((1 - keep) * cue_objects).sum() == cue_objects.sum()
    assert ((1 - keep).sum(dim=(1, 2, 3)) >= cue_objects.sum(dim=(1, 2, 3))).all()
    assert torch.equal(enclosing_disk(torch.zeros(1, 1, 8, 8)), torch.ones(1, 1, 8, 8))


def test_intact_broken_never_touches_the_object(cue_objects):
    silhouettes = objects_of(ShapesDataset("test", length=60, image_size=32), 60)
    for objects in (cue_objects, silhouettes):
        keep = intact_broken_keep(objects)
        assert keep.shape == objects.shape and set(keep.unique().tolist()) <= {0.0, 1.0}
        assert (keep[objects > 0.5] == 1).all()  # the object is intact
        old = broken_keep(objects)
        assert (((1 - old) * objects).sum(dim=(1, 2, 3)) > 0).any()  # the paper's roll does hit objects here
        hole = (1 - keep).sum(dim=(1, 2, 3))
        overlap = broken_overlap(objects)
        assert torch.allclose(hole, objects.sum(dim=(1, 2, 3)) * (1 - overlap))
        # where the paper's shift misses the object, the hole is exactly the paper's
        clean = ((1 - old) * objects).sum(dim=(1, 2, 3)) == 0
        assert torch.equal(keep[clean], old[clean])
        assert overlap.mean() < 0.1


def test_intact_broken_takes_the_least_overlapping_roll():
    obj = torch.zeros(1, 1, 16, 16)
    obj[..., 4:12, 0:16] = 1  # a horizontal band: rolling by half the height moves it clear
    keep = intact_broken_keep(obj)
    assert (1 - keep).sum() == obj.sum() and broken_overlap(obj).item() == 0
    assert default_shifts(16, 16)[0] == (8, 8)
