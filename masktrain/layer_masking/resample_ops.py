"""Rules for resampling, explicit padding, functional convolution / pooling and timm's "same" layers.

* ``nn.Upsample`` / ``F.interpolate``: ``nearest`` resamples the mask with the activations;
  ``bilinear`` / ``area`` compute ``interp(a·m) / interp(m)`` where ``interp(m) > 0`` (the
  interpolation weights renormalised over visible inputs), visible there.
* ``F.pad`` / ``ZeroPad2d`` / ``ConstantPad2d`` (constant mode): the added border holds the pad
  value and is visible, as in the plain model (so an all-ones keep mask gives the plain output);
  reflect / replicate / circular padding (``ReflectionPad2d``, timm's ``BlurPool2d``) pad the
  mask the same way, so a border copy of a removed pixel is removed.
* ``F.conv2d``, ``F.avg_pool2d``, ``F.max_pool2d``: the rules of their module twins.
* timm ``Conv2dSame``, ``StdConv2dSame``, ``ScaledStdConv2dSame``, ``AvgPool2dSame``,
  ``MaxPool2dSame`` (dynamic "same" padding): the conv / pool rule with the asymmetric
  padding computed from the input size; the padding lies outside the image, exactly like a
  conv's own zero padding (never neighbour-filled).
* timm ``SpaceToDepth`` (TResNet stem): the conv rule for a bs×bs stride-bs window.
* timm VGG ``ConvMlp`` head: masked adaptive average pooling up to the kernel size when the
  map is smaller, then its convolutions through the conv rule.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from masktrain.errors import UserError
from masktrain.layer_masking.masked import Masked, clean, clean_
from masktrain.layer_masking.neighbour_padding import neighbour_pad
from masktrain.layer_masking.ops import _adaptive_avg, _pair, apply_module, masked_conv
from masktrain.layer_masking.registry import FUNCTION_RULES, MODULE_RULES, Ctx, register_builtin

NEAREST = ("nearest", "nearest-exact")
RENORMALISED = ("bilinear", "area")


# --------------------------------------------------------------------------- interpolation


def masked_interpolate(ctx: Ctx, x: Masked, **kw: Any) -> Masked:
    """Resample ``x`` (``F.interpolate`` keywords): nearest copies the mask; bilinear / area
    renormalise the weights over visible inputs (``interp(a·m) / interp(m)``)."""
    mode = kw.get("mode", "nearest")
    key = ("interp",) + tuple(sorted((k, str(v)) for k, v in kw.items()))
    if mode in NEAREST:
        mask = ctx.cache.get(x.m, key, lambda: F.interpolate(x.m, **kw))
        return Masked(F.interpolate(x.a, **kw), mask, x.dirty)
    if mode not in RENORMALISED or kw.get("antialias"):
        raise ctx.fail(f"interpolate(mode={mode!r})", f"only modes {NEAREST + RENORMALISED} without antialias")
    x = clean_(x)
    share = ctx.cache.get(x.m, key, lambda: F.interpolate(x.m, **kw))
    mask = ctx.cache.get(x.m, key + ("mask",), lambda: (share > 0).to(x.m.dtype))
    scale = ctx.cache.get(x.m, key + ("scale",), lambda: mask / share.clamp(min=1e-12))
    return Masked(F.interpolate(x.a, **kw) * scale, mask)


def _interpolate_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    values = dict(zip(names, args))
    values.update(kwargs)
    return masked_interpolate(ctx, values.pop("input"), **values)


def _upsample_module(ctx: Ctx, mod: nn.Upsample, args: tuple, kwargs: dict) -> Masked:
    return masked_interpolate(ctx, args[0], size=mod.size, scale_factor=mod.scale_factor, mode=mod.mode,
                              align_corners=mod.align_corners, recompute_scale_factor=mod.recompute_scale_factor)


def _upsample_static(node: fx.Node, target: Any) -> bool:
    mode = target.mode if isinstance(target, nn.Module) else node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
    if isinstance(mode, str) and mode not in NEAREST + RENORMALISED:
        raise UserError(f"layer masking does not support interpolation mode {mode!r}: only {NEAREST + RENORMALISED} "
                        f"(bicubic weights are negative, so a renormalised mask is not well defined)")
    return True


register_builtin(MODULE_RULES, (nn.Upsample,), _upsample_module, _upsample_static)
register_builtin(FUNCTION_RULES, (F.interpolate,), _interpolate_function, _upsample_static)


# --------------------------------------------------------------------------- explicit padding


def masked_pad(ctx: Ctx, x: Masked, pad: Tuple[int, ...], value: float, mode: str = "constant") -> Masked:
    """Explicit padding. Constant: the border holds ``value`` and is visible, as in the plain
    model. Reflect / replicate / circular move data only, so the mask is padded the same way:
    a border copy of a removed pixel is removed (and never read)."""
    spatial = tuple(pad[:4])
    if mode == "constant":
        mask = ctx.cache.get(x.m, ("pad", spatial), lambda: F.pad(x.m, spatial, value=1.0))
        return Masked(F.pad(x.a, pad, value=value), mask, x.dirty)
    if len(pad) > 4:
        raise ctx.fail(f"pad(mode={mode!r})", "padding beyond the spatial axes")
    mask = ctx.cache.get(x.m, ("pad", spatial, mode), lambda: F.pad(x.m, spatial, mode=mode))
    return Masked(F.pad(x.a, pad, mode=mode), mask, x.dirty)


def _pad_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    names = ("input", "pad", "mode", "value")
    values = dict(zip(names, args))
    values.update(kwargs)
    mode = values.get("mode") or "constant"
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise ctx.fail(f"pad(mode={mode!r})", "unknown padding mode")
    return masked_pad(ctx, values["input"], tuple(values["pad"]), values.get("value") or 0.0, mode)


def _pad_module(ctx: Ctx, mod: nn.Module, args: tuple, kwargs: dict) -> Masked:
    return masked_pad(ctx, args[0], tuple(mod.padding), float(mod.value))


def _pad_mode_module(mode: str) -> Callable:
    return lambda ctx, mod, args, kwargs: masked_pad(ctx, args[0], tuple(mod.padding), 0.0, mode)


register_builtin(FUNCTION_RULES, (F.pad,), _pad_function)
register_builtin(MODULE_RULES, (nn.ZeroPad2d, nn.ConstantPad2d), _pad_module)
register_builtin(MODULE_RULES, (nn.ReflectionPad2d,), _pad_mode_module("reflect"))
register_builtin(MODULE_RULES, (nn.ReplicationPad2d,), _pad_mode_module("replicate"))
register_builtin(MODULE_RULES, (nn.CircularPad2d,), _pad_mode_module("circular"))


# --------------------------------------------------------------------------- functional conv / pools


def _values(names: Tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    values = dict(zip(names, args))
    values.update(kwargs)
    return values


def _conv_pads(padding: Any, kernel: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` for a conv ``padding`` argument (int, pair, 'valid' or 'same')."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # torch puts the odd extra on the right / bottom
        th, tw = ((k - 1) * d for k, d in zip(kernel, dilation))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


def _conv_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    v = _values(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
    weight, bias = v["weight"], v.get("bias")
    if isinstance(weight, Masked) or isinstance(bias, Masked):
        raise ctx.fail("conv2d", "a masked weight or bias")
    stride, dilation, padding = _pair(v.get("stride", 1)), _pair(v.get("dilation", 1)), v.get("padding", 0)
    kernel = tuple(weight.shape[-2:])
    groups = v.get("groups", 1)
    return masked_conv(ctx, v["input"], lambda a: F.conv2d(a, weight, bias, stride, padding, dilation, groups),
                       kernel, stride, _conv_pads(padding, kernel, dilation), dilation, bias is not None)


def _avg_pool_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    v = _values(("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                args, kwargs)
    x = clean_(v.pop("input"))
    key = ("avgpool_f",) + tuple(sorted((k, str(val)) for k, val in v.items()))
    mask = ctx.cache.get(x.m, key, lambda: (fn(x.m, **v) > 0).to(x.m.dtype))
    return Masked(fn(x.a, **v), mask)  # removed positions count as 0 in the average, as for AvgPool2d


def _max_pool_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    v = _values(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"), args, kwargs)
    if v.pop("return_indices", False):
        raise ctx.fail("max_pool2d(return_indices=True)", "indices are not maskable")
    x = clean_(v.pop("input"))
    key = ("maxpool_f",) + tuple(sorted((k, str(val)) for k, val in v.items()))
    mask = ctx.cache.get(x.m, key, lambda: fn(x.m, **v))
    return Masked(fn(x.a, **v), mask)  # a window without a visible position holds only zeros


register_builtin(FUNCTION_RULES, (F.conv2d, torch.conv2d), _conv_function)
register_builtin(FUNCTION_RULES, (F.avg_pool2d,), _avg_pool_function)
register_builtin(FUNCTION_RULES, (F.max_pool2d, torch.max_pool2d), _max_pool_function)


# --------------------------------------------------------------------------- timm "same" layers and VGG head


def _same_pads(size: Tuple[int, int], kernel, stride, dilation) -> Tuple[int, int, int, int]:
    from timm.layers.padding import pad_same_arg

    return tuple(pad_same_arg(list(size), list(_pair(kernel)), list(_pair(stride)), list(_pair(dilation))))


def _standardised_weight(conv: nn.Conv2d) -> Tensor:
    """The weight timm's (Scaled)StdConv2d(Same) convolves with (the same ops as their forward)."""
    gain = getattr(conv, "gain", None)
    return F.batch_norm(
        conv.weight.reshape(1, conv.out_channels, -1), None, None,
        weight=(gain * conv.scale).view(-1) if gain is not None else None,
        training=True, momentum=0.0, eps=conv.eps,
    ).reshape_as(conv.weight)


def _same_conv(weight_of: Callable[[nn.Conv2d], Tensor]) -> Callable:
    def run(ctx: Ctx, conv: nn.Conv2d, args: tuple, kwargs: dict) -> Masked:
        x = args[0]
        kernel, stride, dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        weight = weight_of(conv)
        if getattr(conv, "same_pad", True):  # Conv2dSame always; Std*Same only when the padding is dynamic
            pads = _same_pads(tuple(x.a.shape[-2:]), kernel, stride, dilation)
            padding: Any = 0

            def apply(a: Tensor) -> Tensor:
                return F.conv2d(F.pad(a, pads), weight, conv.bias, stride, 0, dilation, conv.groups)
        else:
            padding = conv.padding
            pads = _conv_pads(padding, kernel, dilation)

            def apply(a: Tensor) -> Tensor:
                return F.conv2d(a, weight, conv.bias, stride, padding, dilation, conv.groups)
        return masked_conv(ctx, x, apply, kernel, stride, pads, dilation, conv.bias is not None)

    return run


def _avg_pool_same(ctx: Ctx, pool: nn.Module, args: tuple, kwargs: dict) -> Masked:
    x = clean(args[0])
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride)
    pads = _same_pads(tuple(x.a.shape[-2:]), kernel, stride, (1, 1))
    geometry = dict(kernel_size=kernel, stride=stride, padding=_pair(pool.padding), ceil_mode=pool.ceil_mode,
                    count_include_pad=pool.count_include_pad)
    mask = ctx.cache.get(x.m, ("avgpool_same", pads, str(geometry)),
                         lambda: (F.avg_pool2d(F.pad(x.m, pads), **geometry) > 0).to(x.m.dtype))
    return Masked(F.avg_pool2d(F.pad(x.a, pads), **geometry), mask)


def _max_pool_same(ctx: Ctx, pool: nn.Module, args: tuple, kwargs: dict) -> Masked:
    x = clean(args[0])
    kernel, stride, dilation = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.dilation)
    pads = _same_pads(tuple(x.a.shape[-2:]), kernel, stride, dilation)
    geometry = dict(kernel_size=kernel, stride=stride, padding=(0, 0), dilation=dilation, ceil_mode=pool.ceil_mode)
    mask = ctx.cache.get(x.m, ("maxpool_same", pads, str(geometry)),
                         lambda: F.max_pool2d(F.pad(x.m, pads), **geometry))
    return Masked(F.max_pool2d(F.pad(x.a, pads, value=-float("inf")), **geometry), mask)


def _vgg_conv_mlp(ctx: Ctx, mlp: nn.Module, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    k = mlp.input_kernel_size
    h, w = x.a.shape[-2:]
    if h < k or w < k:  # as the module: enlarge small maps to the kernel size (masked adaptive average)
        x = _adaptive_avg(ctx, (max(k, h), max(k, w)), x)
    for sub in (mlp.fc1, mlp.act1, mlp.drop, mlp.fc2, mlp.act2):
        x = apply_module(ctx, sub, x)
    return x


try:
    from timm.layers import Conv2dSame, ScaledStdConv2dSame, StdConv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    register_builtin(MODULE_RULES, (Conv2dSame,), _same_conv(lambda conv: conv.weight))
    register_builtin(MODULE_RULES, (StdConv2dSame, ScaledStdConv2dSame), _same_conv(_standardised_weight))
    register_builtin(MODULE_RULES, (AvgPool2dSame,), _avg_pool_same)
    register_builtin(MODULE_RULES, (MaxPool2dSame,), _max_pool_same)
except ImportError:  # pragma: no cover
    pass

def _space_to_depth(ctx: Ctx, s2d: nn.Module, args: tuple, kwargs: dict) -> Masked:
    # (B, C, H, W) -> (B, C·bs², H/bs, W/bs) is a stride-bs window op whose output mixes the
    # bs×bs positions of a window, so it follows the conv rule: removed positions of a window
    # with a visible one are neighbour-filled (bs − 1 rounds reach the whole window), and an
    # output position is visible if its window saw a visible pixel (max-pool bs, stride bs).
    x = clean(args[0])
    bs = int(s2d.bs)
    mask = ctx.cache.get(x.m, ("s2d", bs), lambda: F.max_pool2d(x.m, bs, bs))
    filled = neighbour_pad(x.a, x.m, bs - 1, ctx.cache)
    return Masked(s2d(filled), mask, dirty=True)  # fills may reach windows with nothing visible


try:
    from timm.layers import SpaceToDepth

    register_builtin(MODULE_RULES, (SpaceToDepth,), _space_to_depth)
except ImportError:  # pragma: no cover
    pass

try:
    from timm.models.vgg import ConvMlp as VggConvMlp

    register_builtin(MODULE_RULES, (VggConvMlp,), _vgg_conv_mlp)
except ImportError:  # pragma: no cover
    pass
