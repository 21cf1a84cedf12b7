import pytest
from conftest import break_kernel
import torch

from masktrain import erase
from masktrain.erase import boxes_to_keep, erase_
from masktrain.fills import FILLS, fill
from masktrain.masks import BoxKeep, RandomKeepMask, as_dense, make_keep_masks, rectangle_boxes
from masktrain.rng import step_generator

PARAMS = dict(count=(0, 3), area=(0.02, 0.3), aspect=(0.3, 3.3))


def _dense_erase(images, boxes, colour):
    keep = boxes_to_keep(boxes, tuple(images.shape[-2:]))
    return torch.where(keep.bool(), images, colour.expand(images.shape[:2])[..., None, None])


def test_boxes_give_exactly_the_rectangles_mask():
    boxes = rectangle_boxes(64, (40, 56), step_generator(2, 0, 7), **PARAMS)
    dense = make_keep_masks("rectangles", 64, (40, 56), step_generator(2, 0, 7), **PARAMS)
    assert torch.equal(boxes_to_keep(boxes, (40, 56)), dense)
    assert (boxes[..., 2] == 0).any()  # count 0..3: some slots unused


@pytest.mark.parametrize("p", [1.0, 0.5, 0.0])
def test_lazy_random_keep_mask_equals_dense(p):
    sampler = RandomKeepMask("rectangles", p=p, **PARAMS)
    lazy = sampler(32, (48, 48), step_generator(0, 1, 3), lazy=True)
    dense = sampler(32, (48, 48), step_generator(0, 1, 3))
    assert isinstance(lazy, BoxKeep) and lazy.shape == dense.shape
    assert torch.equal(lazy.dense(), dense)
    assert torch.equal(lazy[:5].dense(), dense[:5])
    assert torch.equal(as_dense(dense), dense)


def test_lazy_is_ignored_for_kinds_without_boxes():
    keep = RandomKeepMask("patches", p=1.0)(4, (32, 32), step_generator(0, 0, 0), lazy=True)
    assert isinstance(keep, torch.Tensor) and keep.shape == (4, 1, 32, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_erase_writes_exactly_the_boxes(dtype):
    g = step_generator(5, 0, 0)
    images = torch.rand(16, 3, 37, 29, generator=g, dtype=dtype)
    boxes = rectangle_boxes(16, (37, 29), g, **PARAMS)
    boxes[0, 0] = torch.tensor([-5, 20, 50, 30])  # partly outside: clipped, never written out of bounds
    colour = torch.rand(16, 3, generator=g, dtype=dtype)
    expected = _dense_erase(images, boxes, colour)
    out = erase_(images, boxes, colour)
    assert out is images and torch.equal(out, expected)


def test_erase_fallback_matches_kernel(monkeypatch):
    g = step_generator(6, 0, 0)
    images = torch.rand(8, 3, 32, 32, generator=g)
    boxes = rectangle_boxes(8, (32, 32), g, **PARAMS)
    colour = torch.rand(3, generator=g)
    fast = erase_(images.clone(), boxes, colour)
    monkeypatch.setattr(erase, "_can_use_kernel", lambda images: False)
    slow = erase_(images.clone(), boxes, colour)
    assert torch.equal(fast, slow)
    # a non-contiguous batch takes the dense path and is still right
    wide = torch.rand(8, 3, 32, 64, generator=g)
    view = wide[..., :32]
    expected = _dense_erase(view.clone(), boxes, colour)
    assert torch.equal(erase_(view, boxes, colour), expected)


def test_erase_uses_the_compiled_kernel_on_cpu():
    assert erase._can_use_kernel(torch.zeros(1, 3, 4, 4)), "numba kernel unavailable: the CPU fast path is off"


def test_erase_with_no_boxes_is_a_no_op():
    images = torch.rand(4, 3, 8, 8)
    before = images.clone()
    erase_(images, torch.zeros(4, 0, 4, dtype=torch.int64), torch.zeros(3))
    assert torch.equal(images, before)


@pytest.mark.parametrize("method", sorted(FILLS))
@pytest.mark.parametrize("inplace", [False, True])
def test_fill_with_box_keep_equals_dense_keep(method, inplace):
    g = step_generator(7, 0, 0)
    images = torch.rand(12, 3, 32, 32, generator=g)
    keep = RandomKeepMask("rectangles", p=0.7, **PARAMS)(12, (32, 32), step_generator(1, 0, 0), lazy=True)
    expected = fill(images.clone(), keep.dense(), method, step_generator(9, 0, 0))
    source = images.clone()
    out = fill(source, keep, method, step_generator(9, 0, 0), inplace=inplace)
    assert torch.equal(out, expected)
    if inplace:
        assert out is source
    else:
        assert torch.equal(source, images)  # the input batch is left alone


def test_erase_in_place_is_seen_by_autograd():
    weight = torch.ones(3, requires_grad=True)
    images = torch.rand(2, 3, 8, 8)
    out = (images * weight[:, None, None]).sum()  # saves images for the weight's gradient
    erase_(images, torch.tensor([[[0, 0, 4, 4]], [[2, 2, 3, 3]]]), torch.zeros(3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0, 1, 3, 7])
def test_streaming_kernel_equals_plain_kernel(dtype, offset):
    """Streaming stores cover whole aligned lines only: any start alignment and run length must give the same batch."""
    kernels = pytest.importorskip("masktrain.erase_kernels")
    if not erase._streaming_supported():
        pytest.skip("streaming stores are used on x86-64 only")
    g = step_generator(8, 0, offset)
    B, H, W = 12, 41, 133
    n = B * 3 * H * W
    storage = torch.rand(n + 16, generator=g, dtype=dtype)
    batch = storage[offset:offset + n]  # start at any element, not only on a cache line
    boxes = rectangle_boxes(B, (H, W), g, count=(0, 3), area=(0.0005, 0.9), aspect=(0.05, 20.0))
    boxes[0, 0] = torch.tensor([-3, -7, 60, 200])  # the whole image, clipped
    colour = torch.rand(B, 3, generator=g, dtype=dtype)
    plain = batch.clone()
    kernels.erase_rows(plain.numpy(), B, 3, H, W, boxes.numpy(), colour.numpy())
    streamed = storage.clone()
    kernels.erase_rows(streamed[offset:offset + n].numpy(), B, 3, H, W, boxes.numpy(), colour.numpy(), True)
    assert torch.equal(streamed[offset:offset + n], plain)
    assert torch.equal(streamed[:offset], storage[:offset]) and torch.equal(streamed[offset + n:], storage[offset + n:])


def test_erase_streams_only_batches_larger_than_the_cache(monkeypatch):
    assert erase.last_level_cache_bytes() > 0
    small, large = torch.zeros(2, 3, 8, 8), torch.zeros(64, 3, 64, 64)
    monkeypatch.setattr(erase, "last_level_cache_bytes", lambda: 64 * 2**10)
    assert not erase._streaming(small)
    assert erase._streaming(large) == erase._streaming_supported()
    # through erase_: the streaming path gives the dense result
    g = step_generator(9, 0, 0)
    images = torch.rand(64, 3, 64, 64, generator=g)
    boxes = rectangle_boxes(64, (64, 64), g, **PARAMS)
    colour = torch.rand(64, 3, generator=g)
    assert torch.equal(erase_(images.clone(), boxes, colour), _dense_erase(images, boxes, colour))


def test_erase_falls_back_to_the_dense_fill_when_the_kernel_cannot_compile(monkeypatch):
    kernels = pytest.importorskip("masktrain.erase_kernels")

    break_kernel(monkeypatch, erase.KERNELS, kernels, "erase_rows")
    g = step_generator(10, 0, 0)
    images = torch.rand(8, 3, 16, 16, generator=g)
    boxes = rectangle_boxes(8, (16, 16), g, **PARAMS)
    colour = torch.rand(8, 3, generator=g)
    with pytest.warns(RuntimeWarning, match="cannot lower"):
        out = erase_(images.clone(), boxes, colour)
    assert torch.equal(out, _dense_erase(images, boxes, colour))
    assert not erase._can_use_kernel(images)  # from now on the dense path, without another warning
