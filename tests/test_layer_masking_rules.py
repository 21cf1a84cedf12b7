"""Layer masking: train/eval-mode graphs, the public rule API, and the rules for more CNN families.

Every new rule is checked for the three properties (all-ones keep = plain output, removed
pixels never read, finite train-mode gradients) on the timm families that need it and on a
small float64 model that chains the ops, plus hand-computed values where the rule has its own
masked semantics (GroupNorm statistics, renormalised interpolation, padding).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
import torchvision
import pytest
from torch import nn

from masktrain.errors import UserError
from masktrain.layer_masking import Masked, clean, layer_mask, register_rule
from masktrain.layer_masking import registry
from masktrain.layer_masking.check import check_properties, patch_keep


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- train / eval mode


def _x_keep(size: int = 64, batch: int = 2):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    return x, patch_keep(batch, size, 8, seed=4)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_conversion_in_train_mode_follows_eval(name):
    """timm heads call F.dropout(x, p, training=self.training), which torch.fx freezes at trace time:
    a model converted in training mode must still be deterministic after .eval()."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_rate=0.5, drop_path_rate=0.2).train()
    masked = layer_mask(model)  # converted in training mode, as Classifier.layer_masked is during fit
    assert model.training
    x, keep = _x_keep()
    model.eval()
    with torch.no_grad():
        first, second = masked(x, keep), masked(x, keep)
        fresh = layer_mask(model)(x, keep)  # converted in eval mode
        ones = masked(x, torch.ones_like(keep))
        plain = model(x)
    assert torch.equal(first, second)
    assert torch.equal(first, fresh)
    assert _rel(ones, plain) <= 1e-6
    model.train()
    with torch.no_grad():
        a, b = masked(x, keep), masked(x, keep)
    assert not torch.allclose(a, b), "training mode must stay stochastic (dropout, drop path)"
    assert model.training


def test_conversion_restores_each_submodule_mode():
    model = timm.create_model("resnet18", num_classes=10).train()
    model.bn1.eval()  # e.g. a frozen BN inside a training model
    layer_mask(model)
    assert model.training and not model.bn1.training and model.layer1[0].bn1.training


def test_classifier_layer_masked_cached_in_train_mode_is_deterministic_in_eval():
    from masktrain.models import create_model

    torch.manual_seed(0)
    classifier = create_model("resnet18", num_classes=5, drop_rate=0.5, drop_path_rate=0.1)
    classifier.train()
    logits_fn = classifier.layer_masked("logits")
    features_fn = classifier.layer_masked("features")
    classifier.eval()
    x, keep = _x_keep()
    xn = classifier.normalize(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        assert torch.equal(logits_fn(xn, keep), logits_fn(xn, keep))
        assert torch.equal(logits_fn(xn, keep), layer_mask(classifier.backbone)(xn, keep))
        assert torch.equal(features_fn(xn, keep), features_fn(xn, keep))
        assert _rel(logits_fn(xn, torch.ones_like(keep)), classifier.backbone(xn)) <= 1e-6


# --------------------------------------------------------------------------- public rule API


class _Gate(nn.Module):
    """Per-position gate with data-dependent control flow (so torch.fx cannot trace it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(1, -1, 1, 1))

    def forward(self, x):
        if x.abs().sum() > 0:
            return x * torch.sigmoid(self.w * x)
        return x


class _GateNet(nn.Module):
    def __init__(self, gate: type = _Gate) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = gate(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv(x))).mean((2, 3))


def _gate_rule(ctx, gate, args, kwargs):
    # per position and gate(0) = 0: the removed positions stay zero, the mask is unchanged
    x = args[0]
    return Masked(gate(x.a), x.m, x.dirty)


@pytest.fixture
def clean_registry():
    before = dict(registry.MODULE_RULES)
    yield
    registry.MODULE_RULES.clear()
    registry.MODULE_RULES.update(before)


class _GateChild(_Gate):
    pass  # inherits forward: inherits the rule


class _GateOverride(_Gate):
    def forward(self, x):  # another computation (and traceable): traced through, not given _Gate's rule
        return x * torch.sigmoid(self.w * x) * 2


def test_register_rule_for_a_custom_block(clean_registry):
    with pytest.raises(UserError, match="could not trace"):
        layer_mask(_GateNet())
    register_rule(_Gate, _gate_rule)
    torch.manual_seed(0)
    model = _GateNet().double()
    report = check_properties(model, size=16, patch=4, tolerance=1e-12)
    assert report.ok and report.mask_changes_output, report.problems()
    # subclass lookup: same forward -> same rule; overridden forward -> traced through
    assert registry.module_rule(_GateChild) is registry.module_rule(_Gate)
    assert check_properties(_GateNet(_GateChild).double(), size=16, patch=4, tolerance=1e-12).ok
    assert registry.module_rule(_GateOverride) is None
    assert check_properties(_GateNet(_GateOverride).double(), size=16, patch=4, tolerance=1e-12).ok
    with pytest.warns(UserWarning, match="replacing the rule"):
        register_rule(_Gate, _gate_rule)
    with pytest.raises(UserError, match="register_rule"):
        register_rule(42, _gate_rule)


def test_register_rule_static_refusal_and_functions(clean_registry):
    def refuse(node, target):
        raise UserError("gates with more than 4 channels are not supported")

    register_rule(_Gate, _gate_rule, static=refuse)
    with pytest.raises(UserError, match=r"more than 4 channels .*at module 'gate'"):
        layer_mask(_GateNet())


# --------------------------------------------------------------------------- timm families


QUICK = ["convnextv2_atto", "cs3darknet_s", "ghostnet_050", "rexnet_100", "fasternet_t0", "inception_next_atto",
         "test_mambaout", "test_nfnet", "hgnetv2_b0", "resnest14d", "skresnet18"]
SLOW = ["cspresnet50", "res2net50_14w_8s", "dpn68", "hrnet_w18_small", "poolformerv2_s12", "inception_v3",
        "nasnetalarge", "vgg11", "tresnet_m"]


def _family_params():
    out = [pytest.param(n, {}, id=n) for n in QUICK]
    out.append(pytest.param("convnext_atto", {"conv_mlp": False}, id="convnext_atto-permute-block"))
    out += [pytest.param(n, {}, id=n, marks=pytest.mark.slow) for n in SLOW]
    return out


@pytest.mark.parametrize("name,kwargs", _family_params())
def test_timm_family_properties(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    size = 96 if name in ("inception_v3", "nasnetalarge") else 64
    report = check_properties(model, size=size, tolerance=1e-5)
    assert report.ok, report.problems()
    assert report.mask_changes_output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet", "vgg11"])
def test_torchvision_flatten_into_linear(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    report = check_properties(model, size=64, tolerance=1e-5)
    assert report.ok and report.mask_changes_output, report.problems()


# --------------------------------------------------------------------------- the ops, chained


class _OpChain(nn.Module):
    """Every new rule in one small model: permute + LayerNorm + Linear, channel split / chunk /
    slices / stack / reshape, GroupNorm, functional conv / pools / pad,
    upsampling, timm's "same" layers and the VGG ConvMlp head."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame
        from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
        from timm.models.vgg import ConvMlp

        self.stem = Conv2dSame(3, 8, 3, stride=2)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.gn = nn.GroupNorm(2, 4)
        self.gn1 = nn.GroupNorm(1, 4)
        self.std = ScaledStdConv2d(4, 4, 3, padding=1)
        self.std_same = ScaledStdConv2dSame(8, 8, 3, stride=2, padding="same")
        self.avg_same = AvgPool2dSame(3, stride=2)
        self.max_same = MaxPool2dSame(3, stride=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
        self.head = ConvMlp(8, 16, kernel_size=3, drop_rate=0.0)

    def forward(self, x):
        x = self.stem(x)  # (B, 8, 16, 16) for 32² input
        y = self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # ConvNeXt-style block
        x = x + F.gelu(y)
        a, b = x.split(4, dim=1)
        c, d = torch.chunk(x, 2, 1)
        a = self.std(self.gn1(a))
        x = torch.cat([a, b[:, :2], d[:, 2:]], 1)
        x = torch.cat([x[:, :4] + c, x[:, 4:, ...]], 1)  # rexnet-style channel slices
        b_, _, h, w = x.shape
        r = x.reshape(b_, 2, 4, h, w)  # split attention: (B, r, C/r, H, W)
        x = (r * torch.softmax(r.mean((3, 4), keepdim=True), dim=1)).sum(1)
        x = torch.stack([x, F.relu(x)], 1).sum(1)
        x = self.gn(x)
        x = F.conv2d(F.pad(x, (0, 1, 0, 1)), self.w, padding=1)  # hgnetv2 pad, NFNet functional conv
        x = F.avg_pool2d(x, 3, 1, 1) + F.max_pool2d(x, 3, 1, 1)
        x = self.std_same(x)
        x = self.max_same(self.avg_same(x))
        x = self.up(x) + F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(x).mean((2, 3))


def test_op_chain_properties_float64():
    torch.manual_seed(0)
    model = _OpChain().double()
    report = check_properties(model, size=32, patch=4, tolerance=1e-12)
    assert report.ok and report.mask_changes_output, report.problems()


def test_permuted_map_into_spatial_op_is_refused():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.conv(x).permute(0, 1, 3, 2)).mean((2, 3))

    masked = layer_mask(Bad())
    with pytest.raises(UserError, match=r"Conv2d at module 'conv2'.*axes \('B', 'C', 'W', 'H'\)"):
        masked(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8))


def test_token_reshape_is_refused():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)
            return y.reshape(y.shape[0], -1, 4).mean(1)  # (B, N, C) tokens: mixes H and W

    with pytest.raises(UserError, match=r"reshape .*mixes spatial positions"):
        layer_mask(Tokens())(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8))


def test_linear_over_width_is_refused():
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.conv(x)).mean((2, 3))

    with pytest.raises(UserError, match=r"Linear.*not all channels"):
        layer_mask(Wide())(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8))


# --------------------------------------------------------------------------- masked semantics by hand


def _run(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> Masked:
    """The masked value a single op produces (via a one-op wrapper whose output we pool away)."""
    captured = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.op = module

        def forward(self, x):
            return self.op(x)

    from masktrain.layer_masking import convert

    masked = layer_mask(Probe())
    orig = convert._unmask_output
    try:
        convert._unmask_output = lambda v: captured.setdefault("out", v)
        masked(x, keep)
    finally:
        convert._unmask_output = orig
    return clean(captured["out"])


def test_group_norm_statistics_over_visible_positions():
    torch.manual_seed(0)
    gn = nn.GroupNorm(2, 4).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64) * 3 + 1
    keep = patch_keep(2, 6, 2, seed=1, dtype=torch.float64)
    out = _run(gn, x, keep)
    for b in range(2):
        vis = keep[b, 0].bool()
        for g in range(2):
            values = x[b, 2 * g:2 * g + 2][:, vis]
            mean, var = values.mean(), values.var(unbiased=False)
            for c in (2 * g, 2 * g + 1):
                expected = ((x[b, c] - mean) / torch.sqrt(var + gn.eps) * gn.weight[c] + gn.bias[c]) * keep[b, 0]
                torch.testing.assert_close(out.a[b, c], expected)
    torch.testing.assert_close(out.m, keep)
    # all visible: exactly torch's group norm
    ones = torch.ones_like(keep)
    torch.testing.assert_close(_run(gn, x, ones).a, gn(x))


def test_bilinear_upsampling_renormalises_over_visible_inputs():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    keep[..., 1:3, 1:3] = 0
    keep[..., 0, 0] = 0
    up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    out = _run(up, x, keep)
    share = F.interpolate(keep, scale_factor=2, mode="bilinear", align_corners=False)
    expected = F.interpolate(x * keep, scale_factor=2, mode="bilinear", align_corners=False) / share.clamp(min=1e-12)
    vis = share > 0
    torch.testing.assert_close(out.a, torch.where(vis, expected, torch.zeros_like(expected)))
    torch.testing.assert_close(out.m, vis.double())
    assert 0 < out.m.mean() < 1
    nearest = _run(nn.Upsample(scale_factor=2, mode="nearest"), x, keep)
    torch.testing.assert_close(nearest.m, F.interpolate(keep, scale_factor=2))
    torch.testing.assert_close(nearest.a, F.interpolate(x * keep, scale_factor=2))
    with pytest.raises(UserError, match="bicubic"):
        layer_mask(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Upsample(scale_factor=2, mode="bicubic")))


def test_constant_padding_border_is_visible():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    keep = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    keep[..., 1, 1] = 0
    out = _run(nn.ZeroPad2d((0, 1, 2, 0)), x, keep)
    torch.testing.assert_close(out.m, F.pad(keep, (0, 1, 2, 0), value=1.0))
    torch.testing.assert_close(out.a, F.pad(x * keep, (0, 1, 2, 0)))
    # reflect / replicate move data only: the mask moves with it (border copies of removed pixels are removed)
    for module, mode in ((nn.ReflectionPad2d((1, 2, 0, 1)), "reflect"), (nn.ReplicationPad2d(1), "replicate")):
        out = _run(module, x, keep)
        pads = tuple(module.padding)
        torch.testing.assert_close(out.m, F.pad(keep, pads, mode=mode))
        torch.testing.assert_close(out.a, F.pad(x * keep, pads, mode=mode))


def test_conv2d_same_equals_explicit_asymmetric_padding():
    """timm Conv2dSame: same padding outside the image, like a conv's own zero padding."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    same = Conv2dSame(2, 3, 4, stride=2).double()  # even kernel: asymmetric padding (1, 2)
    ref = nn.Conv2d(2, 3, 4, stride=2, padding=0).double()
    ref.load_state_dict(same.state_dict())
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    keep = patch_keep(1, 9, 3, seed=5, dtype=torch.float64)
    out = _run(same, x, keep)
    plain = same(x)
    assert out.a.shape == plain.shape
    torch.testing.assert_close(_run(same, x, torch.ones_like(keep)).a, plain)
    assert 0 < out.m.mean() < 1


# --------------------------------------------------------------------------- the docs' worked example


class BlurShift(nn.Module):
    """docs/layer_masking.md "Writing a rule": untraceable (a branch on the input's shape)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        if x.shape[-1] > 1:
            x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return x + self.shift


def blur_shift_rule(ctx, block, args, kwargs):
    x = clean(args[0])
    share = F.avg_pool2d(x.m, 3, 1, 1, count_include_pad=False)
    visible = (share > 0).to(x.m.dtype)
    blurred = F.avg_pool2d(x.a, 3, 1, 1, count_include_pad=False) / share.clamp(min=1e-12) * visible
    return Masked(blurred + block.shift, visible, dirty=True)


def test_docs_rule_example(clean_registry):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BlurShift(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    with torch.no_grad():
        model[1].shift.uniform_(-1, 1)
    with pytest.raises(UserError, match="could not trace"):
        layer_mask(model)
    register_rule(BlurShift, blur_shift_rule)
    report = check_properties(model, size=16, patch=4, tolerance=1e-12)
    assert report.ok and report.mask_changes_output, report.problems()


def test_channel_and_spatial_amax():
    """CBAM-style spatial attention: max over channels per position; amax over (H, W) over visible ones."""

    class Cbam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.spatial = nn.Conv2d(2, 1, 7, padding=3)

        def forward(self, x):
            x = self.conv(x)
            s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
            x = x * torch.sigmoid(self.spatial(s))
            return x.amax((2, 3)) + x.mean((2, 3))

    torch.manual_seed(0)
    report = check_properties(Cbam().double(), size=16, patch=4, tolerance=1e-12)
    assert report.ok and report.mask_changes_output, report.problems()


def test_timm_activation_classes_inside_batch_norm_act():
    """BatchNormAct2d applies its act through the act's rule: timm's own activation classes have one."""
    from timm.layers import BatchNormAct2d
    from timm.layers.activations import GELU, HardSigmoid

    for act in (GELU, HardSigmoid):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=act),
                              nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
        report = check_properties(model, size=16, patch=4, tolerance=1e-12)
        assert report.ok and report.mask_changes_output, (act, report.problems())
