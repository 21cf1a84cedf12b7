"""The planted models behave as their docstrings say, on hand-made inputs of the cues data."""
import pytest
import torch

from masktrain.control_holes import area_matched_disk
from masktrain.data.cues import CuesDataset
from masktrain.fills import fill
from masktrain.probes.inputs import bbox_keep
from planted import (AreaReader, ConstantModel, ContentReader, ContextInBoxReader, FillPresenceDetector, HoleShapeReader,
                     MemoriserBackgroundReader, PermutedShapeReader, background_class, class_palette, fingerprint_rows,
                     hole_of, paint_box_context, reference_objects)

K, N = 10, 200


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    test = CuesDataset("test", length=N, image_size=32)
    samples = [test[i] for i in range(N)]
    cues = [test.cues(i) for i in range(N)]
    refs, targets = reference_objects(CuesDataset("train", length=2000, image_size=32), 2000)
    return {
        "ds": test,
        "images": torch.stack([s[0] for s in samples]),
        "labels": torch.tensor([s[1] for s in samples]),
        "objects": torch.stack([s[2] for s in samples]),
        "outline": torch.tensor([c["outline"] for c in cues]),
        "texture": torch.tensor([c["texture"] for c in cues]),
        "noise": torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        "refs": refs, "targets": targets,
    }


def black(images, keep):
    return fill(images, keep, "black")


def pred(model, x):
    with torch.no_grad():
        return model(x).argmax(dim=1)


def test_hole_shape_reader_reads_the_outline_of_the_hole_only(data):
    reader = HoleShapeReader(data["refs"], data["targets"], K)
    holes = black(data["noise"], 1 - data["objects"])
    p = pred(reader, holes)
    assert (p == data["outline"]).float().mean() > 0.95  # ~perfect on outlines
    assert 0.35 < (p == data["labels"]).float().mean() < 0.65  # = the variant-0 half of the labels
    # the same holes on the images themselves (object removed): the same answers
    assert (pred(reader, black(data["images"], 1 - data["objects"])) == p).float().mean() > 0.95
    # a disk of the same area carries no outline: one answer whatever the class
    disk = pred(reader, black(data["noise"], area_matched_disk(data["objects"])))
    assert disk.unique().numel() <= 2
    # no hole: no answer
    assert (reader(data["noise"]) == 0).all()


def test_permuted_shape_reader_maps_each_outline_to_another_class(data):
    reader = HoleShapeReader(data["refs"], data["targets"], K)
    permuted = PermutedShapeReader(reader)
    holes = black(data["noise"], 1 - data["objects"])
    p, q = pred(reader, holes), pred(permuted, holes)
    assert torch.equal(q, (p + 1) % K)
    assert (q == data["outline"]).float().mean() < 0.05
    assert torch.equal(permuted.features(holes), reader.features(holes))


def test_area_reader_reads_the_area_only(data):
    area = AreaReader(data["refs"], data["targets"], K)
    sil = pred(area, black(data["noise"], 1 - data["objects"]))
    disk = pred(area, black(data["noise"], area_matched_disk(data["objects"])))
    box = pred(area, black(data["noise"], bbox_keep(data["objects"])))
    assert torch.equal(sil, disk)  # equal area -> equal answer
    assert (sil != box).float().mean() > 0.3  # the box is larger
    assert (sil == data["outline"]).float().mean() > 1.5 / K  # area is class-correlated


def test_context_in_box_reader_reads_class_coloured_context(data):
    palette = class_palette(K)
    assert torch.cdist(palette, palette).add(torch.eye(K) * 9).min() > 0.2
    painted = paint_box_context(data["images"], data["objects"], data["labels"], palette)
    reader = ContextInBoxReader(palette)
    labels = data["labels"]
    assert torch.equal(pred(reader, painted), labels)
    assert torch.equal(pred(reader, black(painted, 1 - data["objects"])), labels)  # the silhouette hole leaves the context
    assert (pred(reader, black(painted, bbox_keep(data["objects"]))) == labels).float().mean() < 0.25  # the box removes it
    assert (pred(reader, black(painted, area_matched_disk(data["objects"]))) == labels).float().mean() > 0.9
    assert (reader(data["images"]) == 0).all()  # no context on plain images


def test_content_reader_reads_the_texture(data):
    reader = ContentReader(data["ds"])
    assert (pred(reader, data["images"]) == data["texture"]).float().mean() > 0.85
    content = CuesDataset("test", length=N, variant="content_only")
    assert (pred(reader, torch.stack([content[i][0] for i in range(N)])) == data["texture"]).float().mean() > 0.85
    # with the object removed the texture is gone: chance level
    assert (pred(reader, black(data["images"], 1 - data["objects"])) == data["texture"]).float().mean() < 0.3
    assert (pred(reader, black(data["noise"], 1 - data["objects"])) == data["texture"]).float().mean() < 0.3


def test_constant_model_is_input_blind(data):
    model = ConstantModel(K, cls=3)
    assert (pred(model, data["images"]) == 3).all() and (pred(model, data["noise"]) == 3).all()


def test_memoriser_knows_half_and_otherwise_reads_the_background(data):
    rows = fingerprint_rows(data["images"])
    model = MemoriserBackgroundReader(data["images"][rows], data["labels"][rows], K)
    p = pred(model, data["images"])
    assert torch.equal(p[rows], data["labels"][rows])
    others = torch.ones(N, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(p[others], background_class(data["images"][others], K))
    # the background donor keeps that background: the same answer as on the clean image
    backgrounds = torch.stack([data["ds"].background(i) for i in range(N)])
    assert torch.equal(pred(model, backgrounds), background_class(data["images"], K))
    assert torch.equal(background_class(backgrounds, K), background_class(data["images"], K))
    # a fill over the object does not change a non-memorised answer
    assert torch.equal(pred(model, black(data["images"], 1 - data["objects"]))[others], p[others])


def test_fill_presence_detector(data):
    base = ContentReader(data["ds"])
    model = FillPresenceDetector(base, K, fill_class=7)
    plain = hole_of(data["images"]).sum(dim=(1, 2, 3)) < model.min_pixels
    assert plain.float().mean() > 0.97  # clean images hardly contain fill-coloured pixels
    assert torch.equal(pred(model, data["images"])[plain], pred(base, data["images"])[plain])
    for keep in (1 - data["objects"], area_matched_disk(data["objects"]), bbox_keep(data["objects"])):
        assert (pred(model, black(data["images"], keep)) == 7).all()
