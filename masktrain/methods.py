"""Masking methods: the one seam through which anything evaluates "a masked input".

A method turns ``(classifier, images, keep)`` into logits (or pooled features). Fill
methods fill removed pixels in pixel space and run the plain model; ``layer`` runs the
layer-masked model on ``(normalised images, keep)``. Callers take the method name as a
parameter and never special-case one.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from masktrain.errors import UserError
from masktrain.fills import FILLS, IMAGENET_MEAN, fill
from masktrain.masks import as_dense
from masktrain.models import Classifier


class MaskingMethod:
    """Base: ``logits(...) -> (B, K)``, ``features(...) -> (B, D)``, ``render(...) -> (B, 3, H, W)``.

    ``inplace=True`` lets a method overwrite ``images`` (the training step does, to
    avoid allocating a second batch). ``keep`` is a dense keep mask or a
    :class:`~masktrain.masks.BoxKeep`.
    """

    name: str = ""

    def logits(self, model: Classifier, images: Tensor, keep: Tensor, generator: torch.Generator | None = None, inplace: bool = False) -> Tensor:
        raise NotImplementedError

    def render(self, images: Tensor, keep: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the model receives, in pixel space, for looking at."""
        raise NotImplementedError

    def features(self, model: Classifier, images: Tensor, keep: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FillMethod(MaskingMethod):
    """Colour-fill the removed pixels, then run the unmodified model."""

    def __init__(self, name: str, mean: Sequence[float] = IMAGENET_MEAN) -> None:
        self.name, self.mean = name, tuple(mean)

    def apply(self, images: Tensor, keep: Tensor, generator: torch.Generator | None = None, inplace: bool = False) -> Tensor:
        return fill(images, keep, self.name, generator, self.mean, inplace)

    def render(self, images, keep, generator=None):
        return self.apply(images, keep, generator)

    def logits(self, model, images, keep, generator=None, inplace=False):
        return model(self.apply(images, keep, generator, inplace))

    def features(self, model, images, keep, generator=None):
        return model.features(self.apply(images, keep, generator))


class LayerMethod(MaskingMethod):
    """Layer masking (Balasubramanian & Feizi, 2023): the mask reaches every activation map."""

    name = "layer"

    def render(self, images, keep, generator=None):
        return images * as_dense(keep)

    def logits(self, model, images, keep, generator=None, inplace=False):
        keep = as_dense(keep)
        return model.layer_masked("logits")(model.normalize(images * keep), keep)

    def features(self, model, images, keep, generator=None):
        keep = as_dense(keep)
        return model.layer_masked("features")(model.normalize(images * keep), keep)


METHOD_NAMES: tuple[str, ...] = tuple(FILLS) + ("layer",)


def get_method(name: str, mean: Sequence[float] = IMAGENET_MEAN) -> MaskingMethod:
    """A masking method by name; ``mean`` is the dataset mean colour used by ``grey``."""
    if name == "layer":
        return LayerMethod()
    if name in FILLS:
        return FillMethod(name, mean)
    raise UserError(f"masking method {name!r} is unknown; choose one of {list(METHOD_NAMES)}")
