"""Rules for per-position channel layers and normalisations over visible positions.

* ``Linear`` over the channel axis of a channels-last map (ConvNeXt / MambaOut MLPs) and
  ``LayerNorm`` over channels: per position, so removed positions never feed visible ones;
  the output is re-masked lazily (``dirty``: the bias lands on removed positions).
* ``GroupNorm`` (incl. ``GroupNorm(1)``, PoolFormer): per sample and group, mean and biased
  variance over the group's channels at the *visible* positions only.
* timm ``GlobalResponseNorm`` (ConvNeXt-V2): the L2 norm over the spatial axes of the cleaned
  map (removed positions hold 0) is the norm over visible positions.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masktrain.layer_masking.masked import Masked, clean
from masktrain.layer_masking.registry import FUNCTION_RULES, MODULE_RULES, Ctx, register_builtin

NCHW = ("B", "C", "H", "W")


def _require_channels_last(ctx: Ctx, op: str, x: Masked, count: int = 1) -> None:
    layout = x.layout or NCHW
    if any(name != "C" for name in layout[len(layout) - count:]):
        raise ctx.fail(op, f"it acts over the last {count} axis/axes of a map with axes {layout}, which are not all "
                           f"channels, so it would mix spatial positions")


def _linear_module(ctx: Ctx, mod: nn.Linear, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    _require_channels_last(ctx, "Linear", x)
    return Masked(mod(x.a), x.m, x.dirty or mod.bias is not None, x.layout)


def _linear_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    if any(isinstance(v, Masked) for v in list(args[1:]) + list(kwargs.values())):
        raise ctx.fail("linear", "a masked weight or bias")
    _require_channels_last(ctx, "linear", x)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    return Masked(fn(x.a, *args[1:], **kwargs), x.m, x.dirty or bias is not None, x.layout)


def _layer_norm_module(ctx: Ctx, mod: nn.LayerNorm, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    _require_channels_last(ctx, "LayerNorm", x, len(mod.normalized_shape))
    return Masked(mod(x.a), x.m, True, x.layout)  # per position; removed positions re-masked lazily


def _layer_norm_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
    count = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    _require_channels_last(ctx, "layer_norm", x, count)
    return Masked(fn(x.a, *args[1:], **kwargs), x.m, True, x.layout)


register_builtin(MODULE_RULES, (nn.Linear,), _linear_module, layouts=True)
register_builtin(FUNCTION_RULES, (F.linear,), _linear_function, layouts=True)
register_builtin(MODULE_RULES, (nn.LayerNorm,), _layer_norm_module, layouts=True)
register_builtin(FUNCTION_RULES, (F.layer_norm,), _layer_norm_function, layouts=True)


def masked_group_norm(x: Masked, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Masked:
    """Group norm of ``x`` ``(B, C, h, w)`` with statistics over visible positions per sample and group.

    ``n = (C / groups) · sum(m)`` values per (sample, group); mean and biased variance over them
    (a sample with nothing visible gets mean 0, variance 0: finite, and all of it is removed).
    """
    x = clean(x)
    a, m = x.a, x.m
    b, c = a.shape[:2]
    g = a.reshape(b, groups, c // groups, *a.shape[2:])
    mv = m.unsqueeze(1)  # (B, 1, 1, h, w)
    n = (m.sum(dim=(1, 2, 3)) * (c // groups)).clamp(min=1).view(b, 1, 1, 1, 1)
    mean = g.sum(dim=(2, 3, 4), keepdim=True) / n
    centred = (g - mean) * mv
    var = centred.square().sum(dim=(2, 3, 4), keepdim=True) / n
    out = (centred * torch.rsqrt(var + eps)).reshape(a.shape)
    if weight is not None:
        out = out * weight.view(1, c, 1, 1)
    if bias is not None:
        out = out + bias.view(1, c, 1, 1)
    return Masked(out, m, dirty=bias is not None)


def _group_norm_module(ctx: Ctx, mod: nn.GroupNorm, args: tuple, kwargs: dict) -> Masked:
    return masked_group_norm(args[0], mod.num_groups, mod.weight, mod.bias, mod.eps)


def _group_norm_function(ctx: Ctx, fn: Any, args: tuple, kwargs: dict) -> Masked:
    names: Sequence[str] = ("input", "num_groups", "weight", "bias", "eps")
    values = dict(zip(names, args))
    values.update(kwargs)
    return masked_group_norm(values["input"], values["num_groups"], values.get("weight"), values.get("bias"),
                             values.get("eps", 1e-5))


register_builtin(MODULE_RULES, (nn.GroupNorm,), _group_norm_module)
register_builtin(FUNCTION_RULES, (F.group_norm,), _group_norm_function)


def _global_response_norm(ctx: Ctx, mod: nn.Module, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    expected = ("B", "H", "W", "C") if getattr(mod, "channel_dim", 1) == -1 else NCHW
    if (x.layout or NCHW) != expected:
        raise ctx.fail("GlobalResponseNorm", f"expects axes {expected}; got {x.layout or NCHW}")
    x = clean(x)  # the spatial L2 norm of the cleaned map is the norm over visible positions
    return Masked(mod(x.a), x.m, True, x.layout)  # x + bias + ...: the bias lands on removed positions


try:
    from timm.layers.grn import GlobalResponseNorm

    register_builtin(MODULE_RULES, (GlobalResponseNorm,), _global_response_norm, layouts=True)
except ImportError:  # pragma: no cover
    pass
