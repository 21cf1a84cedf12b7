"""The value carried through a layer-masked graph, and the per-forward mask cache.

A :class:`Masked` pairs activations ``a`` ``(B, C, h, w)`` with a keep mask ``m``
``(B, 1, h, w)`` (1 = visible). Invariant: ``a`` is exactly zero where ``m == 0``,
so sums over all positions are sums over visible positions and zero-preserving
functions (``f(0) = 0``) need no re-masking — unless ``dirty`` is set.

``dirty`` (lazy re-masking): ``a`` may hold values at removed positions. Only the
visible positions of a map ever reach a visible output, so ops that work position by
position (batch norm with running statistics, activations, 1×1 convolutions, adds and
products, channel concatenation) need not zero the removed positions; the next op that
reads across positions or sums over them (a k×k convolution's neighbour padding, pooling,
training-mode batch norm) calls :func:`clean` first, or zeroes them fused into its own pass
(ReLU). Visible values are bit-for-bit those of the eager ``f(a·m)·m`` rules.

Gradients: no reader sends a gradient back to a removed position of a dirty map. The op
that zeroes them (``a·m``, the ReLU's clamp) has a backward that is zero there, and the
per-position ops in between pass zeros on. So the op that produced a dirty map (a conv, a
training-mode batch norm) needs no ``g·m`` pass in its backward; a new rule that reads a dirty
map across positions must clean it first (:func:`clean`), which keeps this true.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch
from torch import Tensor

Layout = Tuple[str, ...]
NCHW: Layout = ("B", "C", "H", "W")


@dataclass
class Masked:
    """Activations ``a``, zero where the keep mask ``m`` ``(B, 1, h, w)`` is 0.

    ``layout`` names the axes of ``a``: ``None`` is ``(B, C, H, W)``; ops that keep every
    position separate may permute or split the channel axis, e.g. ``("B", "H", "W", "C")``
    after ``permute(0, 2, 3, 1)`` (ConvNeXt) or ``("B", "C", "C", "H", "W")`` after a
    channel reshape (split attention). ``B``, ``H`` and ``W`` occur once each; ``C`` any
    number of times. :func:`mask_view` broadcasts ``m`` to ``a``'s layout.
    """

    a: Tensor
    m: Tensor
    dirty: bool = False  # a may be non-zero where m == 0 (see the module docstring)
    layout: Optional[Layout] = None  # None: (B, C, H, W)


def mask_view(x: Masked) -> Tensor:
    """The keep mask as a view broadcastable against ``x.a`` (``m`` itself for ``(B, C, H, W)``)."""
    return x.m if x.layout is None else view_mask(x.m, x.layout)


def view_mask(m: Tensor, layout: Layout) -> Tensor:
    """``m`` ``(B, 1, h, w)`` viewed in ``layout``: size 1 on every ``C`` axis (no copy)."""
    base = m[:, 0]  # (B, h, w)
    v = base.permute([("B", "H", "W").index(name) for name in layout if name != "C"])
    for i, name in enumerate(layout):
        if name == "C":
            v = v.unsqueeze(i)
    return v


def clean(x: Masked) -> Masked:
    """``x`` with ``a`` zero at removed positions (a new tensor if it was dirty)."""
    return Masked(x.a * mask_view(x), x.m, False, x.layout) if x.dirty else x


def clean_(x: Masked, cache: Optional["MaskCache"] = None) -> Masked:
    """:func:`clean`, zeroing ``x.a`` in place (and clearing ``x.dirty``) where that is safe.

    Safe without autograd recording: zeroing removed positions changes no visible value, so
    every other reader of ``x`` (or of a view of ``x.a``, which carries the same mask) sees
    the same visible values, now already clean. Under autograd ``x.a`` may be saved for
    backward, so a new tensor is made as by :func:`clean`. Saves one full-size allocation
    and pass per later reader (the SE squeeze and the gate multiply read the same map).
    With ``cache``, a map whose mask is all visible (masks grow with every k×k convolution,
    so deep layers often are) is only marked clean.
    """
    if not x.dirty:
        return x
    if cache is not None and all_visible(x.m, cache):
        x.dirty = False  # nothing is removed: there is nothing to zero
        return x
    if torch.is_grad_enabled() or not (x.a.is_contiguous() or x.a.is_contiguous(memory_format=torch.channels_last)):
        return clean(x)
    x.a.mul_(mask_view(x))
    x.dirty = False
    return x


def all_visible(mask: Tensor, cache: "MaskCache") -> bool:
    """Whether ``mask`` is all ones, computed once per mask and forward (CPU only: on an
    accelerator the answer would cost a device synchronisation; there it is ``False``)."""
    if mask.device.type != "cpu":
        return False
    return cache.get(mask, "all_visible", lambda: bool(mask.amin() > 0))


class MaskCache:
    """Mask-only results computed once per distinct mask within one forward.

    Many convolutions share a mask (every conv of a ResNet stage after its first), so
    pooled masks and neighbour-padding coefficients are keyed by ``(id(mask), key)``.
    The mask object itself is kept alive in the entry so its ``id`` cannot be reused.
    """

    def __init__(self) -> None:
        self._store: Dict[Tuple[int, Hashable], Tuple[Any, Any]] = {}

    def get(self, mask: Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        k = (id(mask), key)
        hit = self._store.get(k)
        if hit is None:
            hit = (mask, compute())
            self._store[k] = hit
        return hit[1]

    def const(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """A mask-independent constant (e.g. a box filter) built once per forward."""
        k = (0, key)
        hit = self._store.get(k)
        if hit is None:
            hit = (None, compute())
            self._store[k] = hit
        return hit[1]
