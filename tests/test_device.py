"""Fills, masks, layer masking and the training step on an accelerator, against the CPU result.

The device is ``MASKTRAIN_TEST_DEVICE`` (default ``cuda``); every test is skipped when that
device is CUDA and none is present, so on a CPU-only machine this file reports skips.
``MASKTRAIN_TEST_DEVICE=cpu`` runs the same checks on the CPU (the reference is then the
CPU's own result: a check of the tests themselves). ``benchmarks/gpu_check.sh`` runs this
file, ``tests/test_fills.py``, ``tests/test_masks.py`` and ``tests/test_layer_masking.py``.
"""
from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.nn.functional as F

from masktrain.fills import FILLS, fill
from masktrain.layer_masking import layer_mask
from masktrain.lit_module import MaskTrainModule
from masktrain.masks import MASK_KINDS, RandomKeepMask, make_keep_masks
from masktrain.models import create_model
from masktrain.rng import step_generator

DEVICE = torch.device(os.environ.get("MASKTRAIN_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device (set MASKTRAIN_TEST_DEVICE=cpu to run these checks on the CPU)")
# Fills whose colour comes from the image and mask alone: equal across devices up to rounding.
DETERMINISTIC_FILLS = ("black", "grey", "mean", "blur")


@pytest.fixture(autouse=True)
def _exact_cuda_maths():
    """TF32 convolutions/matmuls differ from fp32 by ~1e-3; compare against the CPU in full fp32."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batch(seed: int = 0, size: int = 32, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, S, S) in [0, 1], keep (B, 1, S, S)) made on the CPU."""
    g = step_generator(seed, 0, 0)
    images = torch.rand(batch, 3, size, size, generator=g)
    keep = make_keep_masks("rectangles", batch, (size, size), g, count=2, area=(0.1, 0.3))
    return images, keep


@pytest.mark.parametrize("method", sorted(FILLS.names()))
def test_fill_on_device_keeps_visible_pixels_and_ignores_removed_ones(method):
    images, keep = _batch()
    images, keep = images.to(DEVICE), keep.to(DEVICE)
    out = fill(images, keep, method, step_generator(1, 0, 0, DEVICE))
    assert out.device.type == DEVICE.type and out.shape == images.shape
    visible = keep.bool().expand_as(images)
    assert torch.equal(out[visible], images[visible]) and out.min() >= 0 and out.max() <= 1
    other = torch.where(keep.bool(), images, torch.rand_like(images))
    assert torch.allclose(fill(other, keep, method, step_generator(1, 0, 0, DEVICE)), out, atol=1e-6)
    inplace = images.clone()
    assert torch.allclose(fill(inplace, keep, method, step_generator(1, 0, 0, DEVICE), inplace=True), out, atol=1e-6)


@pytest.mark.parametrize("method", DETERMINISTIC_FILLS)
def test_deterministic_fill_on_device_equals_cpu(method):
    images, keep = _batch()
    cpu = fill(images, keep, method)
    dev = fill(images.to(DEVICE), keep.to(DEVICE), method)
    assert torch.allclose(dev.cpu(), cpu, atol=1e-5)


@pytest.mark.parametrize("method", ["black", "grey", "random_colour"])
def test_lazy_box_fill_on_device_equals_the_dense_fill(method):
    """Rectangles as boxes (the training path) erase the same pixels with the same colours as
    the dense keep mask drawn from the same generator state."""
    images = torch.rand(8, 3, 40, 40, device=DEVICE)
    sampler = RandomKeepMask("rectangles", p=0.7, count=(1, 3), area=(0.05, 0.3))
    lazy = sampler(8, (40, 40), step_generator(3, 0, 0, DEVICE), DEVICE, lazy=True)
    dense = sampler(8, (40, 40), step_generator(3, 0, 0, DEVICE), DEVICE, lazy=False)
    assert torch.equal(lazy.dense(), dense)
    a = fill(images.clone(), lazy, method, step_generator(4, 0, 0, DEVICE), inplace=True)
    b = fill(images.clone(), dense, method, step_generator(4, 0, 0, DEVICE))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MASK_KINDS.names()))
def test_mask_generators_on_device(kind):
    objects = (torch.rand(5, 1, 24, 24, device=DEVICE) > 0.5).float()
    a = make_keep_masks(kind, 5, (24, 24), step_generator(0, 0, 0, DEVICE), DEVICE, object_masks=objects)
    b = make_keep_masks(kind, 5, (24, 24), step_generator(0, 0, 0, DEVICE), DEVICE, object_masks=objects)
    assert a.device.type == DEVICE.type and a.shape == (5, 1, 24, 24)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and torch.equal(a, b)  # binary, reproducible


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=7).eval()


def test_layer_masking_on_device_matches_cpu_and_the_plain_model(resnet):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    keep = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.4).float()
    keep = keep.repeat_interleave(8, 2).repeat_interleave(8, 3)
    masked_cpu = layer_mask(resnet)
    with torch.no_grad():
        ref = masked_cpu(x, keep)
        model = resnet.to(DEVICE)
        try:
            masked = layer_mask(model)
            out = masked(x.to(DEVICE), keep.to(DEVICE))
            ones = masked(x.to(DEVICE), torch.ones_like(keep, device=DEVICE))
            plain = model(x.to(DEVICE))
            moved = torch.where(keep.bool().to(DEVICE), x.to(DEVICE), torch.randn(x.shape, device=DEVICE))
            invariant = masked(moved, keep.to(DEVICE))
        finally:
            resnet.to("cpu")
    assert out.device.type == DEVICE.type
    assert torch.allclose(out.cpu(), ref, rtol=1e-3, atol=1e-4)  # same logits as on the CPU
    assert torch.allclose(ones, plain, rtol=1e-4, atol=1e-5)  # all-ones mask = the plain model
    assert torch.allclose(invariant, out, rtol=1e-4, atol=1e-5)  # removed pixels are never read


@pytest.mark.parametrize("method", ["grey", "layer"])
def test_training_step_on_device(method):
    """MaskTrainModule's step (masks drawn on the device, fill or layer masking, masked BN) runs on
    the device: finite loss, gradients on every trained weight."""
    model = create_model("resnet18", num_classes=4).to(DEVICE)
    module = MaskTrainModule(model=model, augment=RandomKeepMask("rectangles", 0.5, count=(1, 2), area=(0.1, 0.3)),
                             val_mask=RandomKeepMask("rectangles", 1.0), method=method, mean=(0.5, 0.5, 0.5)).to(DEVICE)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    images = torch.rand(8, 3, 32, 32, device=DEVICE)
    labels = torch.randint(0, 4, (8,), device=DEVICE)
    objects = (torch.rand(8, 1, 32, 32, device=DEVICE) > 0.5).float()
    loss = module.training_step((images, labels, objects), 0)
    loss.backward()
    assert torch.isfinite(loss) and loss.device.type == DEVICE.type
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert module.last_masked_batch is not None and module.last_masked_batch.device.type == DEVICE.type


def test_bf16_autocast_forward_on_device(resnet):
    """The bf16 path the GPU benchmarks time: layer-masked logits stay close to fp32 ones."""
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    keep = torch.ones(2, 1, 64, 64, device=DEVICE)
    keep[:, :, 16:40, 8:30] = 0
    model = resnet.to(DEVICE)
    try:
        masked = layer_mask(model)
        with torch.no_grad():
            full = masked(x, keep)
            with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
                half = masked(x, keep).float()
    finally:
        resnet.to("cpu")
    assert torch.isfinite(half).all()
    assert F.cosine_similarity(half.flatten(), full.flatten(), dim=0) > 0.98
