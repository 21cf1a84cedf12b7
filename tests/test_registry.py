import pytest
import torch

from masktrain.errors import UserError
from masktrain.registry import Registry


def test_register_get_names_and_overwrite_warning():
    reg = Registry("widget", "widgets")
    reg.register("a", 1)

    @reg.register("b")
    def b():
        return 2

    assert reg.get("a") == 1 and reg.get("b") is b and reg.names() == ["a", "b"] and "a" in reg and list(reg) == ["a", "b"]
    with pytest.warns(RuntimeWarning, match="widget 'a' registered again"):
        reg.register("a", 3)
    assert reg.get("a") == 3
    with pytest.raises(UserError, match=r"widgets='c': widget 'c' is unknown; choose one of \[a, b\]"):
        reg.get("c")
    reg.remove("b")
    assert reg.names() == ["a"]


def test_include_is_live():
    base, derived = Registry("fill", "f"), Registry("method", "m")
    derived.register("layer", "L")
    derived.include(base, lambda name, obj: f"fill:{obj}")
    base.register("late", "x")  # registered after the include
    assert derived.get("late") == "fill:x" and derived.names() == ["layer", "late"]


def test_methods_include_fills_registered_later():
    from masktrain.fills import FILLS, fill, register_fill
    from masktrain.methods import METHODS, get_method

    @register_fill("test_half")
    def half(images, keep, generator=None, mean=None, level: float = 0.5):
        return torch.full_like(images, level)

    try:
        assert "test_half" in METHODS
        x, keep = torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4)
        assert float(get_method("test_half").apply(x, keep).mean()) == 0.5
        assert float(fill(x, keep, "test_half", level=0.25).mean()) == 0.25  # options reach the fill
        assert not FILLS.get("test_half").one_colour and FILLS.get("grey").one_colour
    finally:
        FILLS.remove("test_half")
    assert "test_half" not in METHODS


def test_datasets_by_name():
    from masktrain.data import DATASETS
    from masktrain.data.datamodule import MaskDataModule

    assert {"shapes", "coco", "voc", "oxford_pet", "folder"} <= set(DATASETS)
    dm = MaskDataModule("shapes", 10, num_workers=0)
    assert len(dm.dataset("test")) > 0
    with pytest.raises(UserError, match="data.dataset='nope'"):
        MaskDataModule("nope", 10)
