"""Layer masking: paper fixture, model zoo properties, unsupported models, masked batch-norm training."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import break_kernel
import timm
import torch
import torchvision
from torch import nn

from masktrain.errors import UserError
from masktrain.layer_masking import LayerMasked, layer_mask
from masktrain.layer_masking import ops as ops_module

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
FIXTURE = REFERENCE_DIR / "layer_mask_resnet50.pt"

TIMM_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
    "efficientnet_b0", "mobilenetv3_large_100", "convnext_nano", "regnety_002",
]
TORCHVISION_MODELS = ["resnet50", "efficientnet_b0", "mobilenet_v3_large"]
HEAVY = {"wide_resnet50_2", "densenet121", "resnext50_32x4d"}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _patch_keep(batch: int, size: int, patch: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cells = (torch.rand(batch, 1, size // patch, size // patch, generator=g) > 0.5).to(dtype)
    return cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def _pixel_keep(batch: int, size: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, size, size, generator=g) > 0.4).to(dtype)


def _build(source: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _params(models, heavy=HEAVY):
    out = []
    for source, names in models:
        for name in names:
            marks = [pytest.mark.slow] if name in heavy else []
            out.append(pytest.param(source, name, marks=marks, id=f"{source}-{name}"))
    return out


ZOO = _params([("timm", TIMM_MODELS), ("torchvision", TORCHVISION_MODELS)])


# --------------------------------------------------------------------------- reference fixture


def _reference_model(case):
    if not FIXTURE.exists():
        pytest.skip(f"layer-masking reference fixture not found at {FIXTURE}")
    spec = importlib.util.spec_from_file_location("reference_weights", REFERENCE_DIR / "reference_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_weights(timm.create_model(case["arch"], num_classes=1000), case["weight_seed"]).eval()


@pytest.fixture(scope="module")
def reference_case():
    if not FIXTURE.exists():
        pytest.skip(f"layer-masking reference fixture not found at {FIXTURE}")
    return torch.load(FIXTURE)["resnet50_patches"]


def test_matches_paper_reference_fixture(reference_case):
    case = reference_case
    model = _reference_model(case)
    with torch.no_grad():
        assert _rel(model(case["x"]), case["plain_logits"]) < 1e-4, "reference weights not rebuilt correctly"
        out = layer_mask(model)(case["x"], case["keep"])
    assert _rel(out, case["logits"]) <= 1e-4


def test_fewer_padding_rounds_equal_paper_rounds(monkeypatch):
    """k−1 rounds (none for 1×1) give exactly the paper's k rounds, also for dilated convs and pixel masks."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, output_stride=8).double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    keep = _pixel_keep(2, 48, seed=3)
    masked = layer_mask(model)
    with torch.no_grad():
        fast = masked(x, keep)
        monkeypatch.setattr(ops_module, "rounds_for_kernel", lambda kernel, dilation: kernel[1])
        paper = masked(x, keep)
    assert _rel(fast, paper) < 1e-12


# --------------------------------------------------------------------------- model zoo properties


@pytest.mark.parametrize("source,name", ZOO)
def test_zoo_properties(source, name):
    # float32: float64 depthwise convs are several times slower on CPU, and (a) is exact anyway
    model = _build(source, name).eval()
    masked = layer_mask(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    keep = _patch_keep(2, 64, 8, seed=2, dtype=torch.float32)
    keep[1, :, :32] = 0  # one image with a large removed region
    with torch.no_grad():
        plain = model(x)
        # (a) all-ones keep mask: the unconverted model's output
        assert _rel(masked(x, torch.ones_like(keep)), plain) <= 1e-6
        # (b) removed pixels are never read
        out = masked(x, keep)
        noisy = x + 10 * torch.randn_like(x) * (1 - keep)
        assert torch.equal(masked(noisy, keep), out)
        assert _rel(out, plain) > 1e-3  # the mask does change the output
    # (c) train-mode forward and backward: finite gradients
    masked.train()
    assert model.training
    loss = masked(x, keep).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_pooled_features_wrapper_and_classifier_hook():
    from masktrain.models import create_model

    classifier = create_model("resnet18", num_classes=5)
    classifier.eval()
    x = torch.rand(2, 3, 64, 64)
    ones = torch.ones(2, 1, 64, 64)
    with torch.no_grad():
        feats = classifier.layer_masked("features")(classifier.normalize(x), ones)
        logits = classifier.layer_masked("logits")(classifier.normalize(x), ones)
        assert torch.allclose(feats, classifier.features(x), atol=1e-6)
        assert torch.allclose(logits, classifier(x), atol=1e-6)


def test_parameters_buffers_and_mode_are_shared():
    model = timm.create_model("resnet18", num_classes=10)
    masked = layer_mask(model)
    assert isinstance(masked, LayerMasked)
    assert {id(p) for p in masked.parameters()} == {id(p) for p in model.parameters()}
    masked.eval()
    assert not model.training
    model.train()
    assert masked.training and model.bn1.training
    # .to() replaces buffer tensors; the converted module must see the new ones
    model.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(masked(x, torch.ones(1, 1, 32, 32)), model(x)) <= 1e-12


def test_empty_mask_is_finite_in_train_and_eval():
    model = timm.create_model("resnet18", num_classes=10)
    masked = layer_mask(model)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.ones(2, 1, 32, 32)
    keep[0] = 0  # one image fully removed
    masked.train()
    masked(x, keep).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    masked(x, torch.zeros_like(keep)).sum().backward()  # nothing visible in the whole batch
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    masked.eval()
    with torch.no_grad():
        assert torch.isfinite(masked(x, torch.zeros_like(keep))).all()


# --------------------------------------------------------------------------- unsupported models


def test_vit_raises_clear_error():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    with pytest.raises(UserError, match=r"layer masking does not support .*patch_embed"):
        layer_mask(vit)


class _SpatialLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x).mean((2, 3))
        return x.mean((2, 3))


class _TokenFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.flatten(self.conv(x), 2).mean(1)  # ViT-style (B, C, N) tokens


def test_unsupported_ops_raise_user_error():
    with pytest.raises(UserError, match=r"does not support flatten\(2, -1\)"):
        layer_mask(_TokenFlatten())
    with pytest.raises(UserError, match="could not trace"):
        layer_mask(_Untraceable())
    unfold = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Unfold(2))
    with pytest.raises(UserError, match=r"Unfold at module '1'"):
        layer_mask(unfold)


def test_flatten_into_linear_zero_fills_removed_positions():
    """AlexNet / VGG semantics: flatten(1) of the map into Linear, removed positions contribute 0."""
    torch.manual_seed(0)
    model = _SpatialLinear().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    keep = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    keep[0, :, :4, :4] = 0
    keep[1, :, 5:] = 0
    with torch.no_grad():
        out = layer_mask(model)(x, keep)
        conv = model.conv
        # the conv rule's output mask (3x3 max-pool of keep), zero elsewhere
        from masktrain.layer_masking.ops import Ctx, _conv
        from masktrain.layer_masking.masked import Masked, clean

        y = clean(_conv(Ctx(), conv, (Masked(x * keep, keep),), {}))
        assert 0 < y.m.mean() < 1
        expected = model.fc(y.a.flatten(1))
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- batch norm in training mode


class _BNProbe(nn.Module):
    def __init__(self, momentum) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, momentum=momentum)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            self.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            self.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            self.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))

    def forward(self, x):
        return self.bn(x).mean((2, 3))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_training_statistics_by_hand(momentum):
    torch.manual_seed(0)
    probe = _BNProbe(momentum).double().train()
    x = (torch.randn(4, 3, 10, 10, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    keep = _pixel_keep(4, 10, seed=5)
    old_mean, old_var = probe.bn.running_mean.clone(), probe.bn.running_var.clone()

    out = layer_mask(probe)(x, keep)

    visible = keep.expand_as(x).bool()
    values = x.detach().transpose(0, 1)[visible.transpose(0, 1)].view(3, -1)  # (C, n)
    n = values.shape[1]
    mean, var = values.mean(1), values.var(1, unbiased=False)
    factor = momentum if momentum is not None else 1.0
    assert probe.bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(probe.bn.running_mean, (1 - factor) * old_mean + factor * mean)
    torch.testing.assert_close(probe.bn.running_var, (1 - factor) * old_var + factor * var * n / (n - 1))

    # output: normalised with visible statistics, averaged over visible positions only
    w, b, eps = probe.bn.weight, probe.bn.bias, probe.bn.eps
    normed = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + eps) * w.view(1, 3, 1, 1) + b.view(1, 3, 1, 1)
    expected = (normed * keep).sum((2, 3)) / keep.sum((2, 3))
    torch.testing.assert_close(out, expected)

    # gradients (input, weight, bias) equal those of the hand-written (autograd) visible-only batch norm
    grad_out = torch.randn_like(out)
    g_fast = torch.autograd.grad(out, (x, w, b), grad_out)
    x2 = x.detach().clone().requires_grad_(True)
    xm = x2 * keep
    mean2 = xm.sum((0, 2, 3)) / keep.sum()
    var2 = ((xm - mean2.view(1, 3, 1, 1)) ** 2 * keep).sum((0, 2, 3)) / keep.sum()
    normed2 = (xm - mean2.view(1, 3, 1, 1)) / torch.sqrt(var2.view(1, 3, 1, 1) + eps) * w.view(1, 3, 1, 1) + b.view(1, 3, 1, 1)
    g_hand = torch.autograd.grad(((normed2 * keep).sum((2, 3)) / keep.sum((2, 3)) * grad_out).sum(), (x2, w, b))
    torch.testing.assert_close(g_fast, g_hand)


def test_batch_norm_eval_uses_running_statistics():
    probe = _BNProbe(0.1).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    keep = _pixel_keep(2, 6, seed=1)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    with torch.no_grad():
        out = layer_mask(probe)(x, keep)
    for k, v in probe.state_dict().items():
        assert torch.equal(v, before[k]), k
    normed = probe.bn(x)
    torch.testing.assert_close(out, (normed * keep).sum((2, 3)) / keep.sum((2, 3)))


# --------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("channels, h, w", [(1, 9, 13), (3, 9, 13), (8, 9, 13), (9, 9, 13), (16, 9, 13),
                                             (16, 29, 31), (5, 1, 40), (12, 40, 1)])
def test_box_sum_equals_depthwise_convolution(channels, h, w):
    """The shifted-add box sum (few channels, or maps of at least 28² positions) and the depthwise
    conv give the same 3×3 sums, also into the per-forward workspace under no_grad."""
    from masktrain.layer_masking.masked import MaskCache
    from masktrain.layer_masking.neighbour_padding import box_sum

    g = torch.Generator().manual_seed(channels)
    a = torch.randn(2, channels, h, w, generator=g, dtype=torch.float64)
    ref = nn.functional.conv2d(a, torch.ones(channels, 1, 3, 3, dtype=torch.float64), padding=1, groups=channels)
    torch.testing.assert_close(box_sum(a), ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        cache = MaskCache()
        torch.testing.assert_close(box_sum(a, cache).clone(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(box_sum(a.flip(0), cache), ref.flip(0), rtol=1e-12, atol=1e-12)  # buffer reused
    mask = (torch.rand(2, 1, h, w, generator=g) > 0.5).float()
    mask[0] = 0  # empty image; the other touches the border
    assert torch.equal(box_sum(mask), nn.functional.conv2d(mask, torch.ones(1, 1, 3, 3), padding=1))  # exact counts


def _paper_padding(a: torch.Tensor, mask: torch.Tensor, rounds: int) -> torch.Tensor:
    """The paper's padding loop, written out with a depthwise conv (reference for the fast paths)."""
    box = torch.ones(a.shape[1], 1, 3, 3, dtype=a.dtype)
    a, m = a * mask, mask
    for _ in range(rounds):
        sums = nn.functional.conv2d(a, box, padding=1, groups=a.shape[1])
        count = nn.functional.conv2d(m, box[:1], padding=1)
        a = a + (1 - m) * sums / (count + 1e-5)
        m = (m + count).clamp(0, 1)
    return a


@pytest.mark.parametrize("shape, chunk_bytes", [((6, 5, 30, 29), 4 << 20), ((6, 5, 30, 29), 9000),
                                                 ((6, 5, 30, 29), 60000), ((6, 40, 9, 11), 1000)])
@pytest.mark.parametrize("dirty, in_place", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("compiled", [True, False])
def test_neighbour_padding_fast_paths_equal_the_paper_loop(monkeypatch, shape, chunk_bytes, dirty, in_place, compiled):
    """Under no_grad the padding skips images it cannot change (all visible, all removed), zeroes dirty
    values only where it pads, and works in chunks (channel blocks of one image, runs of images) or
    in the compiled kernel; with autograd it pads the whole map. All give the paper's fills wherever a
    visible output can read them."""
    from masktrain.layer_masking import neighbour_padding as npad
    from masktrain.layer_masking.masked import MaskCache

    monkeypatch.setattr(npad, "CHUNK_BYTES", chunk_bytes)
    if compiled:
        pytest.importorskip("masktrain.layer_masking.padding_kernels")
    else:
        _torch_padding_only(monkeypatch)
    b, c, h, w = shape
    g = torch.Generator().manual_seed(c * h)
    mask = (torch.rand(b, 1, h, w, generator=g) > 0.6).double()
    mask[1] = 1  # all visible: nothing to pad
    mask[2] = 0  # all removed: every output removed
    mask[4, :, 2:, :] = 0  # mostly removed: fills go far
    a = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    garbage = a + (1 - mask) * 1e3 if dirty else a * mask
    rounds = 3
    ref = _paper_padding(a, mask, rounds)
    reach = nn.functional.max_pool2d(mask, 2 * rounds + 1, 1, rounds)  # positions a visible 7×7 window can read
    with torch.no_grad():
        given = garbage.clone()
        fast = npad.neighbour_pad(given, mask, rounds, MaskCache(), in_place=in_place, dirty=dirty)
    if not in_place:
        assert torch.equal(given, garbage)  # the caller's tensor is untouched
    torch.testing.assert_close(fast * reach, ref * reach, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(fast[[0, 3, 4, 5]], ref[[0, 3, 4, 5]], rtol=1e-12, atol=1e-9)  # padded images: exact
    slow = npad.neighbour_pad(garbage.clone().requires_grad_(), mask, rounds, MaskCache(), dirty=dirty)
    torch.testing.assert_close(slow.detach() * reach, ref * reach, rtol=1e-12, atol=1e-9)


def _torch_padding_only(monkeypatch) -> None:
    from masktrain.layer_masking import neighbour_padding as npad

    monkeypatch.setattr(npad.KERNELS, "module", None)
    monkeypatch.setattr(npad.KERNELS, "failed", True)


def _counting_kernel(monkeypatch) -> list:
    """Use the compiled padding and record the shape of every map it pads."""
    kernels = pytest.importorskip("masktrain.layer_masking.padding_kernels")
    from masktrain.layer_masking import neighbour_padding as npad

    calls, real = [], kernels.pad_nchw

    def counted(a, *args):
        calls.append(a.shape)
        return real(a, *args)

    monkeypatch.setattr(kernels, "pad_nchw", counted)
    monkeypatch.setattr(npad.KERNELS, "module", kernels)
    monkeypatch.setattr(npad.KERNELS, "failed", False)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_neighbour_padding_equals_the_torch_path_bit_for_bit(monkeypatch, dtype):
    """The compiled padding adds in the torch shifted-add path's order, so it gives the same bits, on odd
    sizes, single rows/columns, 1 to 4 rounds, dirty or clean, in place or not; channels-last maps,
    non-contiguous maps and small maps with many channels are left to torch."""
    from masktrain.layer_masking import neighbour_padding as npad
    from masktrain.layer_masking.masked import MaskCache

    cases = [((5, 3, 31, 27), 2), ((4, 12, 29, 33), 3), ((3, 2, 1, 40), 2), ((3, 2, 40, 1), 1),
             ((2, 7, 57, 55), 4), ((6, 9, 28, 28), 1), ((2, 1, 2, 2), 2)]
    g = torch.Generator().manual_seed(8)
    outs = {}
    for compiled in (True, False):
        with monkeypatch.context() as patch:
            calls = _counting_kernel(patch) if compiled else _torch_padding_only(patch)
            for i, ((b, c, h, w), rounds) in enumerate(cases):
                g.manual_seed(i)
                mask = (torch.rand(b, 1, h, w, generator=g) > 0.55).to(dtype)
                mask[0] = 1
                a = torch.randn(b, c, h, w, generator=g, dtype=dtype)
                for dirty in (False, True):
                    for in_place in (False, True):
                        x = (a + (1 - mask) * 1e3) if dirty else a * mask
                        with torch.no_grad():
                            outs[compiled, i, dirty, in_place] = npad.neighbour_pad(
                                x.clone(), mask, rounds, MaskCache(), in_place=in_place, dirty=dirty)
            if compiled:
                assert len(calls) == 4 * len(cases)
                mask = (torch.rand(2, 1, 30, 30, generator=g) > 0.5).to(dtype)
                clean = torch.randn(2, 16, 30, 30, dtype=dtype) * mask
                with torch.no_grad():
                    for x, m in ((clean.to(memory_format=torch.channels_last), mask), (clean[:, ::2], mask),
                                 (clean[..., :9, :9].contiguous(), mask[..., :9, :9].contiguous())):
                        npad.neighbour_pad(x, m, 2, MaskCache(), in_place=True)
                assert len(calls) == 4 * len(cases)  # none of these three took the kernel
    for (compiled, *key), out in outs.items():
        if compiled:
            assert torch.equal(out, outs[(False, *key)]), key


def test_compiled_padding_in_a_model_equals_the_torch_path(monkeypatch):
    """Convs with strides, dilations, 3×3 to 7×7 kernels, depthwise and not, NCHW and channels-last
    input: the layer-masked model under no_grad gives the same bits with or without the kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, padding=2, dilation=2), nn.BatchNorm2d(12),
        nn.ReLU(), nn.Conv2d(12, 12, 5, stride=2, padding=2, groups=12), nn.ReLU(),
        nn.Conv2d(12, 5, 7, padding=3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(3, 3, 61, 61)
    keep = _patch_keep(3, 64, 8, seed=2, dtype=torch.float32)[..., :61, :61].contiguous()
    masked = layer_mask(model)
    outs = []
    for compiled in (True, False):
        with monkeypatch.context() as patch, torch.no_grad():
            calls = _counting_kernel(patch) if compiled else _torch_padding_only(patch)
            outs.append([masked(x, keep), masked(x.to(memory_format=torch.channels_last), keep)])
            if compiled:
                assert len(calls) >= 4
    assert all(torch.equal(k, t) for k, t in zip(*outs))


def test_compiled_padding_that_cannot_compile_falls_back_to_the_torch_path(monkeypatch):
    kernels = pytest.importorskip("masktrain.layer_masking.padding_kernels")
    from masktrain.layer_masking import neighbour_padding as npad
    from masktrain.layer_masking.masked import MaskCache

    break_kernel(monkeypatch, npad.KERNELS, kernels, "pad_nchw")
    mask = (torch.rand(2, 1, 30, 30) > 0.5).float()
    a = torch.randn(2, 4, 30, 30) * mask
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="cannot lower"):
            out = npad.neighbour_pad(a, mask, 2, MaskCache())
        assert npad.KERNELS.get() is None  # from now on the torch path, without another warning
        torch.testing.assert_close(out, _paper_padding(a, mask, 2), rtol=1e-5, atol=1e-5)


def test_visible_sum_of_a_dirty_map_ignores_removed_values():
    """The SE squeeze sums a dirty map as a product with the mask: garbage at removed positions never counts."""
    from masktrain.layer_masking.masked import Masked, MaskCache
    from masktrain.layer_masking.ops import visible_sum

    g = torch.Generator().manual_seed(3)
    m = (torch.rand(3, 1, 7, 9, generator=g) > 0.5).double()
    m[1] = 1
    a = torch.randn(3, 4, 7, 9, generator=g, dtype=torch.float64)
    ref = (a * m).sum(dim=(2, 3), keepdim=True)
    for keepdim in (True, False):
        out = visible_sum(Masked(a + 1e6 * (1 - m), m, dirty=True), (2, 3), keepdim, MaskCache())
        torch.testing.assert_close(out, ref if keepdim else ref[:, :, 0, 0], rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("name", ["efficientnet_b0", "densenet121", "convnext_atto"])
def test_no_grad_fast_paths_match_autograd_path_and_ignore_removed_values(name):
    """Eval under no_grad cleans and pads in place, skips all-visible images and sums SE squeezes as
    products; with autograd on, none of that runs. Same output, whatever the removed pixels hold."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0).double().eval()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    keep = _patch_keep(4, 64, 8, seed=5)
    keep[1] = 1
    keep[2] = 0
    masked = layer_mask(model)
    ref = masked(x, keep).detach()
    with torch.no_grad():
        out = masked(x, keep)
        assert torch.equal(masked(x + 1e3 * (1 - keep), keep), out)
    assert _rel(out, ref) < 1e-10


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100"])
def test_train_mode_gradients_equal_finite_differences(monkeypatch, name):
    """The training-mode backward is the true gradient of the layer-masked model. Lazy re-masking
    drops ``g·m`` passes (dirty conv and batch-norm outputs, the ReLU that zeroes them): if any reader
    sent a gradient to a removed position, autograd's directional derivative would disagree with a
    central finite difference along a random direction of every parameter and input pixel (float64).
    The neighbour-padding fill is detached by design (no gradient through it), so here its 3×3 sums
    are made differentiable: then autograd must give the gradient of the whole function."""
    from masktrain.layer_masking import neighbour_padding as npad

    def differentiable_box_sum(a, cache=None):
        with torch.enable_grad():  # neighbour_pad calls this under no_grad to detach the fill
            # a copy: the padding updates ``a`` in place, and the conv saves its input for backward
            return torch.nn.functional.conv2d(a.clone(), torch.ones(a.shape[1], 1, 3, 3, dtype=a.dtype), padding=1,
                                              groups=a.shape[1])

    monkeypatch.setattr(npad, "box_sum", differentiable_box_sum)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).double().train()
    for bn in model.modules():  # timm zero-initialises the last BN of a block; there the plain model's FD is off too
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    keep = _patch_keep(2, 48, 8, seed=3)
    target = torch.randn(2, 5, dtype=torch.float64)
    masked = layer_mask(model)
    params = list(model.parameters())

    def loss(inp):  # train-mode outputs use batch statistics, so the running-statistics updates change nothing
        return (masked(inp, keep).log_softmax(1) * target).sum()

    xg = x.clone().requires_grad_(True)
    grads = torch.autograd.grad(loss(xg), [xg] + params)
    assert grads[0][keep.expand_as(x) == 0].abs().max() == 0  # removed pixels get no gradient
    direction = [torch.randn_like(t) for t in [x] + params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    eps = 1e-7  # the loss curves fast along a random direction: at 1e-6 even the plain model's FD is off by 1e-2
    with torch.no_grad():
        def shifted(sign):
            for p, d in zip(params, direction[1:]):
                p.add_(d, alpha=sign * eps)
            value = loss(x + sign * eps * direction[0])
            for p, d in zip(params, direction[1:]):
                p.sub_(d, alpha=sign * eps)
            return value

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(float(analytic - numeric)) <= 1e-4 * max(1.0, abs(float(numeric))), (float(analytic), float(numeric))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_in_place_paths_match_out_of_place(monkeypatch, name):
    """Writing into operands nothing else reads (residual add, training BN) changes no output or gradient."""
    from masktrain.layer_masking import convert

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).double().train()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    keep = _patch_keep(2, 48, 8, seed=4)
    keep[1, :, :, :24] = 0

    def run():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.zero_grad()
        out = layer_mask(model)(x, keep)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.load_state_dict(state)  # undo the running-statistics update
        return out.detach(), grads

    fast, fast_grads = run()
    assert any(s.overwritable for s in layer_mask(model)._steps)
    monkeypatch.setattr(convert, "_mark_overwritable", lambda steps, modules: None)
    assert not any(s.overwritable for s in layer_mask(model)._steps)
    slow, slow_grads = run()
    assert _rel(fast, slow) < 1e-12
    for f, s in zip(fast_grads, slow_grads):
        assert torch.allclose(f, s, rtol=1e-10, atol=1e-12)


def test_lazy_remasking_keeps_removed_positions_unread_in_eval():
    """Eval mode leaves values at removed positions between per-position ops; the output must still
    equal a run where every intermediate removed position holds other garbage (here: a huge input there)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    keep = _pixel_keep(2, 48, seed=7)
    masked = layer_mask(model)
    with torch.no_grad():
        out = masked(x, keep)
        assert torch.equal(masked(x + 1e6 * (1 - keep), keep), out)
        assert torch.isfinite(out).all()
