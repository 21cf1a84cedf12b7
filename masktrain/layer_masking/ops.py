"""Per-op layer-masking rules (pointwise, binary, concat, convolution, pooling, batch norm).

Further rules live in ``shape_ops`` (permute, channel split/slice/reshape, flatten into
Linear), ``norm_ops`` (Linear, LayerNorm, GroupNorm, GRN) and ``resample_ops``
(interpolation, explicit padding, functional convolution and pools, timm's "same" layers).
The registries themselves are in ``registry``.

A rule ``run(ctx, target, args, kwargs)`` receives arguments in which masked activations
are :class:`Masked` and everything else is as usual; it is called only when at least one
argument is masked (ops on plain tensors, e.g. the head after global pooling, run as
they are). ``static(node, target)`` is consulted once at conversion: it returns whether
the op's output is still masked, or raises :class:`UserError` for an unsupported use.
The mask rule of each op is documented in ``docs/layer_masking.md``.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from masktrain.errors import UserError
from masktrain.layer_masking.batch_norm import masked_batch_norm
from masktrain.layer_masking.masked import MaskCache, Masked, all_visible, clean, clean_, mask_view
from masktrain.layer_masking.registry import (  # noqa: F401  (re-exported for rules written against ops)
    FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Ctx, Rule, Run, Static, module_rule, register_builtin,
)
from masktrain.layer_masking.neighbour_padding import neighbour_pad, pool_mask, rounds_for_kernel


def _register(table: dict, keys: Sequence, run: Run, static: Optional[Static] = None, layouts: bool = False) -> None:
    register_builtin(table, keys, run, static, layouts)


def _unsupported(op: str, reason: str) -> UserError:
    return UserError(f"layer masking does not support {op}: {reason}")


def _plain(node: fx.Node, target: Any) -> bool:
    return False


# --------------------------------------------------------------------------- pointwise


def _zero_preserving_module(ctx: Ctx, mod: nn.Module, args: tuple, kwargs: dict) -> Masked:
    # f(0) = 0 and a is already 0 where removed, so f(a·m)·m = f(a): no re-masking needed.
    x = args[0]
    return Masked(mod(x.a), x.m, x.dirty, x.layout)


class _ReluClean(torch.autograd.Function):
    """``relu(a)·m`` as one clamp under autograd, with the plain ReLU's backward.

    ``clamp(a, 0, cap)`` (``cap`` = inf where visible, 0 where removed) zeroes the removed
    positions in the same pass as the ReLU. The backward is ReLU's own ``threshold_backward(g, out, 0)``,
    which is also zero at every removed position (``out`` is 0 there): a dirty map read only by a
    ReLU (the training-mode batch norm before it) needs no ``g·m`` pass of its own.
    """

    @staticmethod
    def forward(ctx, a: Tensor, zero: Tensor, cap: Tensor, inplace: bool) -> Tensor:
        if inplace:
            out = a.clamp_(zero, cap)
            ctx.mark_dirty(a)
        else:
            out = torch.clamp(a, zero, cap)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g, out, 0), None, None, None


def _relu_clean(ctx: Ctx, x: Masked, inplace: bool) -> Tensor:
    """``relu(a)·m`` in one pass: ``clamp(a, 0, cap)`` with ``cap = inf`` where visible and 0 where removed."""
    a, m = x.a, x.m
    cap = ctx.cache.get(m, ("relu_cap", x.layout), lambda: torch.where(mask_view(x) > 0, float("inf"), 0.0).to(m.dtype))
    zero = ctx.cache.const(("zero", a.dtype, a.device), lambda: torch.zeros((), dtype=a.dtype, device=a.device))
    if torch.is_grad_enabled() and a.requires_grad:
        return _ReluClean.apply(a, zero, cap, inplace)
    return a.clamp_(zero, cap) if inplace else torch.clamp(a, zero, cap)


def _relu_module(ctx: Ctx, mod: nn.ReLU, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    if x.dirty:
        return Masked(_relu_clean(ctx, x, mod.inplace), x.m, False, x.layout)
    return Masked(mod(x.a), x.m, x.dirty, x.layout)


def _remask_module(ctx: Ctx, mod: nn.Module, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    return Masked(mod(x.a), x.m, True, x.layout)  # f(0) != 0: removed positions left for the next clean


def _zero_preserving_function(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    return Masked(fn(x.a, *args[1:], **kwargs), x.m, x.dirty, x.layout)


def _remask_function(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    return Masked(fn(x.a, *args[1:], **kwargs), x.m, True, x.layout)


def _method(name: str) -> Callable:
    return lambda t, *args, **kwargs: getattr(t, name)(*args, **kwargs)


ZERO_PRESERVING_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU,
    nn.Tanh, nn.PReLU, nn.Dropout, nn.Dropout2d,
)
REMASK_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
ZERO_PRESERVING_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.mish, F.leaky_relu, F.elu, torch.tanh,
    F.dropout, F.dropout2d,
)
REMASK_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid)

# rules of modules that act on each element alone and return their input or a new tensor
ELEMENTWISE_MODULE_RUNS = (_zero_preserving_module, _relu_module, _remask_module)

_register(MODULE_RULES, ZERO_PRESERVING_MODULES, _zero_preserving_module, layouts=True)
_register(MODULE_RULES, (nn.ReLU,), _relu_module, layouts=True)
_register(MODULE_RULES, REMASK_MODULES, _remask_module, layouts=True)
_register(FUNCTION_RULES, ZERO_PRESERVING_FUNCTIONS, _zero_preserving_function, layouts=True)
_register(FUNCTION_RULES, REMASK_FUNCTIONS, _remask_function, layouts=True)
for _name in ("relu", "tanh", "contiguous", "float", "to", "type_as", "clone", "half", "double", "bfloat16"):
    # dtype/device/layout changes keep zeros zero; masks follow the activations' dtype on use
    METHOD_RULES[_name] = Rule(
        lambda ctx, name, args, kwargs: Masked(getattr(args[0].a, name)(*args[1:], **kwargs), args[0].m, args[0].dirty,
                                               args[0].layout),
        layouts=True,
    )
for _name in ("sigmoid",):
    METHOD_RULES[_name] = Rule(
        lambda ctx, name, args, kwargs: Masked(getattr(args[0].a, name)(*args[1:], **kwargs), args[0].m, True,
                                               args[0].layout),
        layouts=True,
    )


# --------------------------------------------------------------------------- masks


def intersect(ctx: Ctx, masks: Sequence[Tensor]) -> Tuple[Tensor, bool]:
    """``(mask, same)``: the product of ``masks`` ``(B, 1, h, w)``, and whether all were the same mask.

    When the intersection equals one of the inputs that object is returned, so the caches
    keyed by mask identity keep hitting (a ResNet block's output mask usually equals its input's).
    """
    first = masks[0]
    if all(m is first for m in masks[1:]):
        return first, True
    out = first
    for m in masks[1:]:
        out = out * m
    for m in masks:
        if torch.equal(out, m):
            return m, all(torch.equal(m, other) for other in masks)
    return out, False


# --------------------------------------------------------------------------- binary ops


def same_layout(ctx: Ctx, op: str, parts: Sequence[Masked]):
    """The common layout of ``parts``; refuses maps whose axes are ordered differently."""
    layout = parts[0].layout
    if any(p.layout != layout for p in parts[1:]):
        raise ctx.fail(op, f"operands with different axis orders {[p.layout for p in parts]}")
    return layout


def _additive(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    x, y = args[0], args[1]
    if isinstance(x, Masked) and isinstance(y, Masked):
        layout = same_layout(ctx, "add/sub", [x, y])
        mask, same = intersect(ctx, [x.m, y.m])
        out = _add_in_place(ctx, fn, x.a, y.a, args, kwargs)
        if out is None:
            out = fn(x.a, y.a, *args[2:], **kwargs)
        # Different masks: x + y is non-zero on the union; the intersection is cleaned lazily.
        return Masked(out, mask, x.dirty or y.dirty or not same, layout)
    masked = x if isinstance(x, Masked) else y
    xa = x.a if isinstance(x, Masked) else x
    ya = y.a if isinstance(y, Masked) else y
    return Masked(fn(xa, ya, *args[2:], **kwargs), masked.m, True, masked.layout)


_ADDS = (operator.add, operator.iadd, torch.add)


def _add_in_place(ctx: Ctx, fn: Callable, xa: Tensor, ya: Tensor, args: tuple, kwargs: dict) -> Optional[Tensor]:
    """``xa + ya`` written into an operand nothing else reads (as the plain model's ``x += shortcut``)."""
    if fn not in _ADDS or len(args) != 2 or kwargs or xa.shape != ya.shape or xa.dtype != ya.dtype:
        return None
    if 0 in ctx.overwritable:
        return xa.add_(ya)
    if 1 in ctx.overwritable:
        return ya.add_(xa)
    return None


def _multiplicative(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    x, y = args[0], args[1]
    if isinstance(x, Masked) and isinstance(y, Masked):
        layout = same_layout(ctx, "multiply", [x, y])
        mask, _ = intersect(ctx, [x.m, y.m])
        # clean operands: 0 wherever either is removed
        return Masked(fn(x.a, y.a, *args[2:], **kwargs), mask, x.dirty or y.dirty, layout)
    masked = x if isinstance(x, Masked) else y
    xa = x.a if isinstance(x, Masked) else x
    ya = y.a if isinstance(y, Masked) else y
    return Masked(fn(xa, ya, *args[2:], **kwargs), masked.m, masked.dirty, masked.layout)


def _divide(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    if isinstance(args[1], Masked):
        raise ctx.fail("division by a masked activation", "removed positions would divide by zero")
    return _multiplicative(ctx, fn, args, kwargs)


def _power(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    # a**p keeps zeros zero for p > 0 (StarReLU's relu(x)**2); any other exponent is re-masked lazily
    x, p = args[0], args[1]
    if not isinstance(x, Masked) or isinstance(p, Masked):
        raise ctx.fail("power", "a masked exponent or base tensor")
    zero_kept = isinstance(p, (int, float)) and p > 0
    return Masked(fn(x.a, p), x.m, x.dirty or not zero_kept, x.layout)


_register(FUNCTION_RULES, (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub), _additive,
          layouts=True)
_register(FUNCTION_RULES, (operator.mul, operator.imul, torch.mul), _multiplicative, layouts=True)
_register(FUNCTION_RULES, (operator.truediv, operator.itruediv, torch.div), _divide, layouts=True)
_register(FUNCTION_RULES, (operator.pow, torch.pow), _power, layouts=True)
for _name, _fn in (("add", torch.add), ("sub", torch.sub)):
    METHOD_RULES[_name] = Rule(lambda ctx, name, args, kwargs, _fn=_fn: _additive(ctx, _fn, args, kwargs), layouts=True)
for _name, _fn in (("mul", torch.mul),):
    METHOD_RULES[_name] = Rule(lambda ctx, name, args, kwargs, _fn=_fn: _multiplicative(ctx, _fn, args, kwargs),
                               layouts=True)
for _name, _fn in (("div", torch.div),):
    METHOD_RULES[_name] = Rule(lambda ctx, name, args, kwargs, _fn=_fn: _divide(ctx, _fn, args, kwargs), layouts=True)


def _in_place_binary(ctx: Ctx, name: str, args: tuple, kwargs: dict) -> Masked:
    """``x.add_(y)`` etc.: written into ``x`` itself, whose ``Masked`` is updated too, because the
    plain model may read ``x`` again without using the result (NFNet's ``out.mul_(gain)``)."""
    x, y = args[0], args[1]
    if not isinstance(x, Masked):
        raise ctx.fail(f"method .{name}()", "writing a masked value into a plain tensor in place")
    additive = name in ("add_", "sub_")
    if isinstance(y, Masked):
        if name == "div_":
            raise ctx.fail("division by a masked activation", "removed positions would divide by zero")
        same_layout(ctx, f".{name}()", [x, y])
        getattr(x.a, name)(y.a, *args[2:], **kwargs)
        mask, same = intersect(ctx, [x.m, y.m])
        x.m, x.dirty = mask, x.dirty or y.dirty or (additive and not same)
    else:
        getattr(x.a, name)(y, *args[2:], **kwargs)
        x.dirty = x.dirty or additive  # a plain addend also lands on removed positions
    return x


def _in_place_unary(ctx: Ctx, name: str, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    getattr(x.a, name)(*args[1:], **kwargs)
    x.dirty = x.dirty or name in ("sigmoid_",)  # relu_ keeps zeros zero
    return x


for _name in ("add_", "sub_", "mul_", "div_"):
    METHOD_RULES[_name] = Rule(_in_place_binary, layouts=True)
for _name in ("relu_", "sigmoid_"):
    METHOD_RULES[_name] = Rule(_in_place_unary, layouts=True)
METHOD_RULES["pow"] = Rule(lambda ctx, name, args, kwargs: _power(ctx, torch.pow, args, kwargs), layouts=True)


def channel_axis(ctx: Ctx, op: str, x: Masked, dim: int) -> int:
    """``dim`` normalised for ``x.a``, refused unless it is a channel axis of ``x``'s layout."""
    layout = x.layout or ("B", "C", "H", "W")
    d = dim % x.a.dim()
    if layout[d] != "C":
        raise ctx.fail(op, f"only along a channel axis; dim={dim} is the {layout[d]} axis of {layout}")
    return d


def _cat(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Masked:
    # Intersection rule: a position is visible in the result only if visible in every input.
    parts = list(args[0])
    if not all(isinstance(p, Masked) for p in parts):
        raise ctx.fail("concatenation", "mixing masked activations with plain tensors")
    layout = same_layout(ctx, "concatenation", parts)
    channel_axis(ctx, "concatenation", parts[0], kwargs.get("dim", args[1] if len(args) > 1 else 0))
    mask, same = intersect(ctx, [p.m for p in parts])
    out = fn([p.a for p in parts], *args[1:], **kwargs)
    return Masked(out, mask, not same or any(p.dirty for p in parts), layout)


_register(FUNCTION_RULES, (torch.cat, torch.concat), _cat, layouts=True)


# --------------------------------------------------------------------------- attributes


def _attribute(ctx: Ctx, fn: Callable, args: tuple, kwargs: dict) -> Any:
    return getattr(args[0].a, args[1])


_register(FUNCTION_RULES, (getattr,), _attribute, _plain, layouts=True)
for _name in ("size", "dim"):
    METHOD_RULES[_name] = Rule(lambda ctx, name, args, kwargs: getattr(args[0].a, name)(*args[1:], **kwargs), _plain,
                               layouts=True)


# --------------------------------------------------------------------------- convolution


def _conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(t % 2 for t in total):
            raise _unsupported("Conv2d(padding='same') with an even kernel extent", "asymmetric padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


def _conv_static(node: fx.Node, conv: nn.Conv2d) -> bool:
    if conv.padding_mode != "zeros":
        raise _unsupported(f"Conv2d(padding_mode={conv.padding_mode!r}) at {node.target}", "only zero padding")
    _conv_padding(conv)
    return True


def masked_conv(
    ctx: Ctx,
    x: Masked,
    conv: Callable[[Tensor], Tensor],
    kernel: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int, int, int],
    dilation: Tuple[int, int],
    has_bias: bool,
) -> Masked:
    """The paper's convolution rule for ``conv`` (which applies ``padding`` itself).

    ``padding`` = ``(left, right, top, bottom)`` zeros around the map (outside the image: never
    neighbour-filled). Removed positions are neighbour-padded (``min(k, (k−1)·d)`` rounds) first;
    the output mask is the max-pool of the mask with the conv's geometry.
    """
    left, right, top, bottom = padding
    if left == right and top == bottom:
        geometry = (kernel, stride, (top, left), dilation)
        mask = ctx.cache.get(x.m, ("maxpool",) + geometry, lambda: pool_mask(x.m, *geometry))
    else:
        key = ("maxpool_asym", kernel, stride, padding, dilation)
        mask = ctx.cache.get(x.m, key, lambda: pool_mask(F.pad(x.m, (left, right, top, bottom)), kernel, stride, (0, 0), dilation))
    if kernel == (1, 1) and padding == (0, 0, 0, 0):
        # each output reads one input position: removed outputs only ever see removed inputs
        return Masked(conv(x.a), mask, x.dirty or has_bias)
    rounds = rounds_for_kernel(kernel, dilation)
    # Neighbour padding needs zeros at removed positions and then writes fills there. It may
    # work in place on a tensor this conv alone reads (ctx.overwritable, or a fresh map under
    # no_grad, ctx.owned_no_grad), or on the new tensor that cleaning a dirty map makes.
    sole = 0 in ctx.overwritable or (0 in ctx.owned_no_grad and not torch.is_grad_enabled())
    out = conv(neighbour_pad(x.a, x.m, rounds, ctx.cache, in_place=sole, dirty=x.dirty))
    # Left dirty also under autograd: training-mode batch norm (the usual reader) zeroes it in
    # place in its forward and its backward ends in ``· m`` already, which saves the backward
    # ``g · m`` pass that re-masking here would add.
    return Masked(out, mask, dirty=True)


def _conv(ctx: Ctx, conv: nn.Conv2d, args: tuple, kwargs: dict) -> Masked:
    ph, pw = _conv_padding(conv)
    return masked_conv(ctx, args[0], conv, tuple(conv.kernel_size), tuple(conv.stride), (pw, pw, ph, ph),
                       tuple(conv.dilation), conv.bias is not None)


_register(MODULE_RULES, (nn.Conv2d,), _conv, _conv_static)


# --------------------------------------------------------------------------- pooling


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _max_pool(ctx: Ctx, pool: nn.MaxPool2d, args: tuple, kwargs: dict) -> Masked:
    # Paper rule: pool a (removed positions hold 0), then keep only windows that saw a visible pixel.
    x = args[0]
    geometry = (_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding),
                _pair(pool.dilation), pool.ceil_mode)
    mask = ctx.cache.get(x.m, ("maxpool",) + geometry, lambda: pool_mask(x.m, *geometry))
    return Masked(pool(clean_(x, ctx.cache).a), mask)  # a window without a visible position holds only zeros


def _max_pool_static(node: fx.Node, pool: nn.MaxPool2d) -> bool:
    if pool.return_indices:
        raise _unsupported(f"MaxPool2d(return_indices=True) at {node.target}", "indices are not maskable")
    return True


def _avg_pool(ctx: Ctx, pool: nn.AvgPool2d, args: tuple, kwargs: dict) -> Masked:
    # Paper rule: average a (removed positions count as 0); visible where the window saw a visible pixel.
    x = args[0]
    key = ("avgpool", _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding),
           pool.ceil_mode, pool.count_include_pad)
    mask = ctx.cache.get(x.m, key, lambda: (pool(x.m) > 0).to(x.m.dtype))
    return Masked(pool(clean_(x, ctx.cache).a), mask)  # a window without a visible position holds only zeros


def _is_global(output_size) -> bool:
    return all(s == 1 for s in _pair(output_size))


def visible_sum(x: Masked, axes: Tuple[int, ...], keepdim: bool, cache: Optional[MaskCache] = None) -> Tensor:
    """Sum of ``x.a`` over its spatial ``axes`` at visible positions only.

    A dirty ``(B, C, H, W)`` map is summed as one batched matrix-vector product with the mask,
    ``(B, C, HW) @ (B, HW, 1)``: one read of the map instead of zeroing it first (the SE
    squeeze of every EfficientNet block). Removed values are multiplied by exactly 0, so they
    still never reach the result.
    """
    if (x.dirty and x.layout is None and axes == (2, 3) and x.a.is_contiguous()
            and not (cache is not None and all_visible(x.m, cache))):
        b, c, h, w = x.a.shape
        total = torch.bmm(x.a.view(b, c, h * w), x.m.reshape(b, h * w, 1).to(x.a.dtype))
        return total.view(b, c, 1, 1) if keepdim else total.view(b, c)
    x = clean_(x, cache)
    return x.a.sum(dim=axes, keepdim=keepdim)


def _masked_mean(x: Masked, keepdim: bool, cache: Optional[MaskCache] = None) -> Tensor:
    """Mean over visible positions per channel: ``(B, C, 1, 1)`` or ``(B, C)``; 0 when nothing is visible."""
    count = x.m.sum(dim=(2, 3), keepdim=keepdim).clamp(min=1)
    return visible_sum(x, (2, 3), keepdim, cache) / count


def _adaptive_avg_static(node: fx.Node, target: Any) -> bool:
    size = target.output_size if isinstance(target, nn.Module) else node.kwargs.get("output_size", node.args[1])
    return not _is_global(size)


def _adaptive_avg(ctx: Ctx, output_size, x: Masked) -> Any:
    if _is_global(output_size):
        return _masked_mean(x, keepdim=True, cache=ctx.cache)  # mask consumed: a plain (B, C, 1, 1) tensor
    x = clean_(x, ctx.cache)
    total = F.adaptive_avg_pool2d(x.a, output_size)
    share = F.adaptive_avg_pool2d(x.m, output_size)
    mask = (share > 0).to(x.m.dtype)
    return Masked(total / share.clamp(min=1e-12) * mask, mask)


_register(MODULE_RULES, (nn.MaxPool2d,), _max_pool, _max_pool_static)
_register(MODULE_RULES, (nn.AvgPool2d,), _avg_pool)
_register(MODULE_RULES, (nn.AdaptiveAvgPool2d,),
          lambda ctx, mod, args, kwargs: _adaptive_avg(ctx, mod.output_size, args[0]), _adaptive_avg_static)
_register(FUNCTION_RULES, (F.adaptive_avg_pool2d,),
          lambda ctx, fn, args, kwargs: _adaptive_avg(ctx, kwargs.get("output_size", args[1] if len(args) > 1 else None), args[0]),
          _adaptive_avg_static)


def _adaptive_max_static(node: fx.Node, pool: nn.AdaptiveMaxPool2d) -> bool:
    if not _is_global(pool.output_size) or pool.return_indices:
        raise _unsupported(f"AdaptiveMaxPool2d({pool.output_size}) at {node.target}", "only global max pooling")
    return False


def _adaptive_max(ctx: Ctx, pool: nn.AdaptiveMaxPool2d, args: tuple, kwargs: dict) -> Tensor:
    x = args[0]
    hidden = x.a.masked_fill(x.m == 0, float("-inf")).amax(dim=(2, 3), keepdim=True)
    return torch.where(torch.isinf(hidden), torch.zeros_like(hidden), hidden)  # nothing visible: 0


_register(MODULE_RULES, (nn.AdaptiveMaxPool2d,), _adaptive_max, _adaptive_max_static)


def _mean_args(node_or_args, kwargs) -> Tuple[Any, bool]:
    dims = kwargs.get("dim", node_or_args[1] if len(node_or_args) > 1 else None)
    keepdim = kwargs.get("keepdim", node_or_args[2] if len(node_or_args) > 2 else False)
    return dims, keepdim


def reduce_axes(ctx: Ctx, op: str, x: Masked, dims) -> Tuple[Tuple[int, ...], str]:
    """``(axes, kind)`` for a reduction of ``x`` over ``dims``: kind ``"spatial"`` (exactly the
    H and W axes: a pool over visible positions) or ``"channel"`` (channel axes only: per position)."""
    layout = x.layout or ("B", "C", "H", "W")
    if dims is None:
        raise ctx.fail(op, "a reduction over all dims mixes the batch")
    axes = tuple(sorted({d % x.a.dim() for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}))
    names = sorted(layout[d] for d in axes)
    if names == ["H", "W"]:
        return axes, "spatial"
    if names and all(n == "C" for n in names):
        return axes, "channel"
    raise ctx.fail(op, f"only over the spatial axes (H, W) or over channels; dims {dims} of {layout}")


def _reduced_layout(layout, axes: Tuple[int, ...], keepdim: bool):
    if keepdim or layout is None and not axes:
        return layout
    kept = tuple(n for i, n in enumerate(layout or ("B", "C", "H", "W")) if i not in axes)
    return None if kept == ("B", "C", "H", "W") else kept


def _reduce(ctx: Ctx, x: Masked, dims, keepdim: bool, mean: bool, op: str) -> Any:
    axes, kind = reduce_axes(ctx, op, x, dims)
    if kind == "spatial":
        # Mean over visible positions only (0 when nothing is visible); the mask is consumed.
        total = visible_sum(x, axes, keepdim, ctx.cache)
        if not mean:
            return total
        count = mask_view(x).sum(dim=axes, keepdim=keepdim).clamp(min=1)
        return total / count
    # per position: the channel reduction of removed positions stays at removed positions
    out = x.a.mean(dim=axes, keepdim=keepdim) if mean else x.a.sum(dim=axes, keepdim=keepdim)
    layout = _reduced_layout(x.layout, axes, keepdim)
    if layout is not None and "C" not in layout:  # (B, H, W): keep a channel axis of size 1 in the layout
        raise ctx.fail(op, "a channel reduction that drops the last channel axis")
    return Masked(out, x.m, x.dirty, layout)


def _mean(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Any:
    dims, keepdim = _mean_args(args, kwargs)
    return _reduce(ctx, args[0], dims, bool(keepdim), True, "mean")


def _sum(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Any:
    dims, keepdim = _mean_args(args, kwargs)
    return _reduce(ctx, args[0], dims, bool(keepdim), False, "sum")


def _amax(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Any:
    # CBAM-style spatial attention: max over channels per position; over (H, W): max over visible positions
    x = args[0]
    dims, keepdim = _mean_args(args, kwargs)
    axes, kind = reduce_axes(ctx, "amax", x, dims)
    if kind == "spatial":
        hidden = x.a.masked_fill(mask_view(x) == 0, float("-inf")).amax(dim=axes, keepdim=bool(keepdim))
        return torch.where(torch.isinf(hidden), torch.zeros_like(hidden), hidden)  # nothing visible: 0
    layout = _reduced_layout(x.layout, axes, bool(keepdim))
    if layout is not None and "C" not in layout:
        raise ctx.fail("amax", "a channel reduction that drops the last channel axis")
    return Masked(x.a.amax(dim=axes, keepdim=bool(keepdim)), x.m, x.dirty, layout)


def _reduction_static(node: fx.Node, target: Any) -> Optional[bool]:
    # A spatial reduction consumes the mask. Which axes are spatial depends on the layout, known
    # when the graph runs; the usual (B, C, H, W) (2, 3) / (-2, -1) and channels-last (1, 2) are
    # decided here, anything else (None) when the graph runs.
    dims, _ = _mean_args(node.args, node.kwargs)
    if dims is None:
        raise _unsupported(f"{getattr(target, '__name__', target)} over all dims at {node.name}", "it mixes the batch")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    if not all(isinstance(d, int) for d in dims):
        return None
    if {d % 4 for d in dims} in ({2, 3}, {1, 2}) and len(dims) == 2 and all(-4 <= d < 4 for d in dims):
        return False
    return None


_register(FUNCTION_RULES, (torch.mean,), _mean, _reduction_static, layouts=True)
_register(FUNCTION_RULES, (torch.sum,), _sum, _reduction_static, layouts=True)
METHOD_RULES["mean"] = Rule(_mean, _reduction_static, layouts=True)
METHOD_RULES["sum"] = Rule(_sum, _reduction_static, layouts=True)
_register(FUNCTION_RULES, (torch.amax,), _amax, _reduction_static, layouts=True)
METHOD_RULES["amax"] = Rule(_amax, _reduction_static, layouts=True)


# --------------------------------------------------------------------------- normalisation


def _batch_norm(ctx: Ctx, bn: nn.Module, args: tuple, kwargs: dict) -> Masked:
    return masked_batch_norm(bn, args[0], ctx.cache, overwrite=0 in ctx.overwritable)


def apply_module(ctx: Ctx, mod: nn.Module, x: Masked) -> Any:
    """Run ``mod`` on a masked value through its registered rule (for modules inside leaf modules)."""
    rule = module_rule(type(mod))
    if rule is None:
        raise ctx.fail(type(mod).__name__, "no layer-masking rule for this module type")
    return rule.run(ctx, mod, (x,), {})


def _batch_norm_act(ctx: Ctx, bn: nn.Module, args: tuple, kwargs: dict) -> Masked:
    # timm's BatchNormAct2d = batch norm, then its own drop and act submodules.
    x = masked_batch_norm(bn, args[0], ctx.cache, overwrite=0 in ctx.overwritable)
    return apply_module(ctx, bn.act, apply_module(ctx, bn.drop, x))


def _batch_norm_act_static(node: fx.Node, bn: nn.Module) -> bool:
    for sub in (bn.drop, bn.act):
        if module_rule(type(sub)) is None:
            raise _unsupported(f"{type(sub).__name__} inside {node.target}", "no layer-masking rule for this module type")
    return True


_register(MODULE_RULES, (nn.BatchNorm2d,), _batch_norm)

try:  # timm is a dependency of masktrain, but keep the core usable without it
    from timm.layers import BatchNormAct2d, DropPath, LayerNorm2d

    _register(MODULE_RULES, (BatchNormAct2d,), _batch_norm_act, _batch_norm_act_static)
    # LayerNorm2d normalises over channels at each position: per-position, so f(a)·m.
    _register(MODULE_RULES, (LayerNorm2d,), _remask_module)
    _register(MODULE_RULES, (DropPath,), _zero_preserving_module, layouts=True)  # per-sample scaling
except ImportError:  # pragma: no cover
    pass

try:
    # timm's own activation classes (used inside BatchNormAct2d / GroupNormAct, where they are not traced)
    from timm.layers import activations as _timm_act
    from timm.layers import activations_me as _timm_act_me

    _register(MODULE_RULES, tuple(getattr(_timm_act, n) for n in (
        "Swish", "Mish", "Tanh", "HardSwish", "HardMish", "PReLU", "GELU", "GELUTanh", "QuickGELU")
        if hasattr(_timm_act, n)) + tuple(getattr(_timm_act_me, n) for n in ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe")
                                          if hasattr(_timm_act_me, n)), _zero_preserving_module, layouts=True)
    _register(MODULE_RULES, tuple(getattr(_timm_act, n) for n in ("Sigmoid", "HardSigmoid") if hasattr(_timm_act, n))
              + tuple(getattr(_timm_act_me, n) for n in ("HardSigmoidMe",) if hasattr(_timm_act_me, n)),
              _remask_module, layouts=True)
except ImportError:  # pragma: no cover
    pass

try:
    from torchvision.ops import StochasticDepth, stochastic_depth

    _register(MODULE_RULES, (StochasticDepth,), _zero_preserving_module, layouts=True)
    _register(FUNCTION_RULES, (stochastic_depth,), _zero_preserving_function, layouts=True)
except ImportError:  # pragma: no cover
    pass


# --------------------------------------------------------------------------- spatial structure lost

SHAPE_OPS = ("flatten", "view", "reshape", "permute", "transpose", "unbind", "chunk", "split", "squeeze",
             "unsqueeze", "expand", "__getitem__", "getitem", "linear", "layer_norm", "unfold")


def describe_missing(op: str) -> str:
    """Why an op without a rule cannot take a masked activation."""
    if any(s == op or op.endswith(s) for s in SHAPE_OPS):
        return "it reshapes or mixes spatial positions of a masked activation, so the mask cannot follow"
    return "no layer-masking rule for this op"
