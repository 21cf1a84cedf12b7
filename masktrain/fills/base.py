"""The fill spec, its registry and :func:`fill` (see :mod:`masktrain.fills` for how to add one)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from masktrain.erase import erase_
from masktrain.errors import UserError
from masktrain.masks import BoxKeep
from masktrain.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)

#: ``dense(images, keep, generator=None, mean=..., **options) -> (B, C, H, W)``: the values removed pixels get.
DenseFn = Callable[..., Tensor]
#: ``colour(images, generator=None, mean=..., **options) -> (B, C)``: one colour per sample.
ColourFn = Callable[..., Tensor]


@dataclass(frozen=True)
class FillSpec:
    """One fill: its dense form, and its colour when it puts one colour per sample into the hole."""

    name: str
    dense: DenseFn
    colour: Optional[ColourFn] = None

    @property
    def one_colour(self) -> bool:
        """True when the hole gets one colour per sample: boxes can then be erased in place."""
        return self.colour is not None


FILLS: Registry[FillSpec] = Registry("fill", "mask.method")


def register_fill(name: str) -> Callable[[DenseFn], DenseFn]:
    """Register ``dense(images, keep, generator=None, mean=..., **options) -> (B, C, H, W)`` as fill ``name``."""

    def decorate(dense: DenseFn) -> DenseFn:
        FILLS.register(name, FillSpec(name, dense))
        return dense

    return decorate


def register_colour_fill(name: str) -> Callable[[ColourFn], ColourFn]:
    """Register ``colour(images, generator=None, mean=..., **options) -> (B, C)`` as the one-colour fill ``name``."""

    def decorate(colour: ColourFn) -> ColourFn:
        def dense(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN, **options) -> Tensor:
            return colour(images, generator, mean, **options)[..., None, None].expand_as(images)

        dense.__doc__ = colour.__doc__
        FILLS.register(name, FillSpec(name, dense, colour))
        return colour

    return decorate


def mean_colour(images: Tensor, mean: Sequence[float]) -> Tensor:
    """The dataset mean colour as ``(1, C, 1, 1)`` on ``images``' device and dtype."""
    return torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)


def check_options(spec: FillSpec, options: dict) -> None:
    """A UserError naming the fill and its options when ``options`` holds one the fill does not take."""
    fn = spec.colour or spec.dense
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    fixed = {"images", "keep", "generator", "mean"}
    valid = sorted(n for n, p in params.items() if n not in fixed and p.kind is not inspect.Parameter.VAR_POSITIONAL)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"fill {spec.name!r} does not take the option(s) {unknown}; its options are {valid or 'none'}")


def fill(
    images: Tensor,
    keep: "Tensor | BoxKeep",
    method: str,
    generator=None,
    mean: Sequence[float] = IMAGENET_MEAN,
    inplace: bool = False,
    **options,
) -> Tensor:
    """Fill removed pixels of ``images`` ``(B, 3, H, W)`` where ``keep`` ``(B, 1, H, W)`` is 0.

    Returns a ``(B, 3, H, W)`` tensor; visible pixels are returned unchanged. With
    ``inplace=True`` ``images`` itself is overwritten and returned: on the training path
    this avoids allocating a new batch, which dominates the cost at 224². ``options`` go to
    the fill (e.g. ``fill(x, keep, "blur", sigma_fraction=0.2)``). ``generator``: a
    ``torch.Generator`` or a per-sample :class:`masktrain.rng.SampleRandom`.

    ``keep`` may be a :class:`~masktrain.masks.BoxKeep`: a one-colour fill then writes the
    boxes' pixels only (the same result, without reading or writing the rest of the batch).
    """
    spec = FILLS.get(method)
    if options:
        check_options(spec, options)
    if isinstance(keep, BoxKeep):
        if spec.one_colour:
            target = images if inplace else images.clone()
            return erase_(target, keep.boxes, spec.colour(images, generator, mean, **options))
        keep = keep.dense(images.dtype)
    values = spec.dense(images, keep, generator=generator, mean=mean, **options)
    return torch.where(keep.bool(), images, values, out=images if inplace else None)


class Fill:
    """Transform-class wrapper of :func:`fill`, e.g. ``Fill("grey")(images, keep)``."""

    def __init__(self, method: str, mean: Sequence[float] = IMAGENET_MEAN, **options) -> None:
        FILLS.get(method)  # unknown names fail here
        self.method, self.mean, self.options = method, tuple(mean), dict(options)

    def __call__(self, images: Tensor, keep: Tensor, generator=None, inplace: bool = False) -> Tensor:
        return fill(images, keep, self.method, generator, self.mean, inplace, **self.options)
