"""Rules for ops that move axes but keep every spatial position separate.

* ``permute`` / ``transpose``: the axes of ``a`` are renamed in ``Masked.layout`` (ConvNeXt's
  channels-last block, MambaOut); the mask itself never moves.
* channel ``split`` / ``chunk`` / slices (``x[:, :c]``) / ``stack`` along a new
  channel-like axis / ``reshape`` and ``view`` that only split or merge channel axes (split
  attention's ``(B, r·C, H, W) -> (B, r, C, H, W)``): the mask is shared by every part.
* ``flatten(1)`` of a ``(B, C, h, w)`` map whose only readers are ``Linear`` layers (AlexNet,
  VGG): removed positions contribute zeros (the paper's AlexNet semantics); the mask is consumed.

Anything that merges or splits a spatial axis (token reshapes, ``flatten(2)``, ``unfold``) is refused.
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from masktrain.errors import UserError
from masktrain.layer_masking.masked import Layout, Masked, clean
from masktrain.layer_masking.ops import channel_axis, intersect, same_layout
from masktrain.layer_masking.registry import FUNCTION_RULES, METHOD_RULES, Ctx, Rule, register_builtin

NCHW: Layout = ("B", "C", "H", "W")


def _layout(x: Masked) -> Layout:
    return x.layout or NCHW


def _normalise(layout: Sequence[str]) -> Optional[Layout]:
    layout = tuple(layout)
    return None if layout == NCHW else layout


def _dims_arg(args: tuple, kwargs: dict, name: str = "dims") -> Tuple[int, ...]:
    dims = kwargs.get(name, args[1:] if len(args) > 2 else args[1] if len(args) > 1 else None)
    return tuple(dims) if isinstance(dims, (list, tuple, torch.Size)) else (dims,)


# --------------------------------------------------------------------------- permute / transpose


def _permute(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    dims = _dims_arg(args, kwargs)
    n = x.a.dim()
    dims = tuple(d % n for d in dims)
    layout = _layout(x)
    return Masked(x.a.permute(dims), x.m, x.dirty, _normalise(layout[d] for d in dims))


def _transpose(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    d0 = kwargs.get("dim0", args[1] if len(args) > 1 else None) % x.a.dim()
    d1 = kwargs.get("dim1", args[2] if len(args) > 2 else None) % x.a.dim()
    layout = list(_layout(x))
    layout[d0], layout[d1] = layout[d1], layout[d0]
    return Masked(x.a.transpose(d0, d1), x.m, x.dirty, _normalise(layout))


register_builtin(FUNCTION_RULES, (torch.permute,), _permute, layouts=True)
register_builtin(FUNCTION_RULES, (torch.transpose,), _transpose, layouts=True)
METHOD_RULES["permute"] = Rule(_permute, layouts=True)
METHOD_RULES["transpose"] = Rule(_transpose, layouts=True)


# --------------------------------------------------------------------------- reshape / view


def match_layout(old: Layout, old_shape: Sequence[int], new_shape: Sequence[int]) -> Optional[Layout]:
    """Axis names for ``new_shape`` if the reshape only splits/merges runs of channel axes.

    ``B``, ``H`` and ``W`` axes must reappear with the same size in the same order; between
    them each run of ``C`` axes may be regrouped into any axes of the same total size.
    Returns ``None`` when no such reading exists (the reshape mixes spatial positions).
    """
    tokens: List[Tuple[str, int]] = []  # ("C", product) runs and single ("B"|"H"|"W", size) axes
    for name, size in zip(old, old_shape):
        if name == "C":
            if tokens and tokens[-1][0] == "C":
                tokens[-1] = ("C", tokens[-1][1] * size)
            else:
                tokens.append(("C", size))
        else:
            tokens.append((name, size))

    def solve(t: int, j: int) -> Optional[List[str]]:
        if t == len(tokens):
            return [] if j == len(new_shape) else None
        name, size = tokens[t]
        if name != "C":
            if j < len(new_shape) and new_shape[j] == size:
                rest = solve(t + 1, j + 1)
                return None if rest is None else [name] + rest
            return None
        product, k = 1, j
        while True:  # take axes while their product divides the run; try every stopping point
            if product == size:
                rest = solve(t + 1, k)
                if rest is not None:
                    return ["C"] * (k - j) + rest
            if k == len(new_shape) or new_shape[k] == 0 or size % (product * new_shape[k]):
                return None
            product *= new_shape[k]
            k += 1

    names = solve(0, 0)
    if names is None or names.count("B") != 1 or names.count("H") != 1 or names.count("W") != 1:
        return None
    return tuple(names)


def _reshape_shape(args: tuple, kwargs: dict) -> tuple:
    shape = kwargs.get("shape", args[1:] if len(args) > 2 else args[1] if len(args) > 1 else ())
    return tuple(shape) if isinstance(shape, (list, tuple, torch.Size)) else (shape,)


def _reshape(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Masked:
    x = args[0]
    shape = _reshape_shape(args, kwargs)
    method = target if isinstance(target, str) else "reshape"
    out = getattr(x.a, method)(*shape)
    layout = match_layout(_layout(x), tuple(x.a.shape), tuple(out.shape))
    if layout is None:
        raise ctx.fail(f"{method} {tuple(x.a.shape)} -> {tuple(out.shape)}",
                       "it reshapes or mixes spatial positions of a masked activation, so the mask cannot follow")
    return Masked(out, x.m, x.dirty, _normalise(layout))


register_builtin(FUNCTION_RULES, (torch.reshape,), _reshape, layouts=True)
METHOD_RULES["reshape"] = Rule(_reshape, layouts=True)
METHOD_RULES["view"] = Rule(_reshape, layouts=True)


# --------------------------------------------------------------------------- split / chunk / stack


def _split(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> tuple:
    x = args[0]
    size = kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1] if len(args) > 1 else None))
    dim = channel_axis(ctx, "split", x, kwargs.get("dim", args[2] if len(args) > 2 else 0))
    return tuple(Masked(p, x.m, x.dirty, x.layout) for p in torch.split(x.a, size, dim))


def _chunk(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> tuple:
    x = args[0]
    chunks = kwargs.get("chunks", args[1] if len(args) > 1 else None)
    dim = channel_axis(ctx, "chunk", x, kwargs.get("dim", args[2] if len(args) > 2 else 0))
    return tuple(Masked(p, x.m, x.dirty, x.layout) for p in torch.chunk(x.a, chunks, dim))


def _stack(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Masked:
    parts = list(args[0])
    if not all(isinstance(p, Masked) for p in parts):
        raise ctx.fail("stack", "mixing masked activations with plain tensors")
    layout = list(same_layout(ctx, "stack", parts) or NCHW)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % (parts[0].a.dim() + 1)
    if dim == 0:
        raise ctx.fail("stack", "along the batch axis")
    mask, same = intersect(ctx, [p.m for p in parts])
    layout.insert(dim, "C")  # the new axis indexes branches: a channel-like axis
    out = torch.stack([p.a for p in parts], dim)
    return Masked(out, mask, not same or any(p.dirty for p in parts), _normalise(layout))


register_builtin(FUNCTION_RULES, (torch.split,), _split, layouts=True)
register_builtin(FUNCTION_RULES, (torch.chunk,), _chunk, layouts=True)
register_builtin(FUNCTION_RULES, (torch.stack,), _stack, layouts=True)
METHOD_RULES["split"] = Rule(_split, layouts=True)
METHOD_RULES["chunk"] = Rule(_chunk, layouts=True)


# --------------------------------------------------------------------------- indexing


def _index_layout(ctx: Ctx, x: Masked, index: Any) -> Layout:
    """Layout after ``x.a[index]``: full slices on B/H/W, anything basic on channel axes."""
    layout = _layout(x)
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(i is Ellipsis for i in items) > 1:
        raise ctx.fail("indexing", "more than one Ellipsis")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(layout) - consumed)
    items += [slice(None)] * (len(layout) - sum(1 for i in items if i is not None))
    out: List[str] = []
    axis = 0
    for item in items:
        if item is None:
            out.append("C")  # a new axis of size 1
            continue
        name = layout[axis]
        axis += 1
        if isinstance(item, slice):
            full = item == slice(None) or (item.start in (None, 0) and item.stop is None and item.step in (None, 1))
            if name != "C" and not full:
                raise ctx.fail("indexing", f"it slices the {name} axis of a masked activation")
            out.append(name)
        elif isinstance(item, int) and name == "C":
            continue  # an integer index drops a channel axis
        else:
            raise ctx.fail("indexing", f"index {item!r} on the {name} axis of a masked activation")
    return tuple(out)


def _getitem(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Any:
    container, index = args[0], args[1]
    if not isinstance(container, Masked):  # a tuple/list from split/chunk: pick its parts
        return operator.getitem(container, index)
    layout = _index_layout(ctx, container, index)
    if "C" not in layout:
        raise ctx.fail("indexing", "it drops every channel axis")
    return Masked(container.a[index], container.m, container.dirty, _normalise(layout))


register_builtin(FUNCTION_RULES, (operator.getitem,), _getitem, layouts=True)
METHOD_RULES["__getitem__"] = Rule(_getitem, layouts=True)


# --------------------------------------------------------------------------- flatten into Linear


_LINEAR_PASS_THROUGH = (nn.Dropout, nn.Identity)


def _feeds_only_linear(node: fx.Node) -> bool:
    """Whether every reader of ``node`` is a ``Linear`` (possibly behind dropout / identity)."""
    if not node.users:
        return False
    for user in node.users:
        module = user.meta.get("layer_masking_module")
        if isinstance(module, nn.Linear) or (user.op == "call_function" and user.target is F.linear):
            continue
        passes = isinstance(module, _LINEAR_PASS_THROUGH) or (user.op == "call_function" and user.target is F.dropout)
        if passes and _feeds_only_linear(user):
            continue
        return False
    return True


def _flatten_args(args: tuple, kwargs: dict) -> Tuple[int, int]:
    start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
    end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
    return start, end


def _flatten_static(node: fx.Node, target: Any) -> bool:
    start, end = _flatten_args(node.args, node.kwargs)
    if start == 1 and end == -1 and _feeds_only_linear(node):
        return False  # AlexNet / VGG: the zero-filled map enters the first Linear
    # Token flattens (ViT's patch embedding: flatten(2)) and flattens into anything else
    raise UserError(f"layer masking does not support flatten({start}, {end}) at {node.name}: it merges spatial "
                    f"positions of a masked activation, so the mask cannot follow (flatten(1) is supported only "
                    f"when the result feeds Linear layers: AlexNet / VGG heads)")


def _flatten(ctx: Ctx, target: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0]
    if _flatten_args(args, kwargs) != (1, -1) or ctx.node is None or not _feeds_only_linear(ctx.node):
        raise ctx.fail("flatten", "it merges spatial positions of a masked activation (flatten(1) is supported only "
                                  "when the result feeds Linear layers)")
    if x.layout is not None:
        raise ctx.fail("flatten", f"a map with axes {x.layout}")
    # Paper's AlexNet semantics: removed positions contribute zeros to the first Linear.
    return clean(x).a.flatten(1)


register_builtin(FUNCTION_RULES, (torch.flatten,), _flatten, _flatten_static, layouts=True)
METHOD_RULES["flatten"] = Rule(_flatten, _flatten_static, layouts=True)
