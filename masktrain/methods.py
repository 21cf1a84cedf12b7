"""Masking methods: the one seam through which anything evaluates "a masked input".

A method turns ``(classifier, images, keep)`` into logits (or pooled features). Fill
methods fill removed pixels in pixel space and run the plain model; ``layer`` runs the
layer-masked model on ``(normalised images, keep)``. Callers take the method name as a
parameter and never special-case one.

Methods are chosen by name from :data:`METHODS`: every fill (:data:`masktrain.fills.FILLS`,
also one registered later) is a :class:`FillMethod`; other methods register a factory
``factory(name, mean) -> MaskingMethod``::

    METHODS.register("mine", lambda name, mean: MyMethod())
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from masktrain.errors import UserError
from masktrain.fills import FILLS, IMAGENET_MEAN, fill
from masktrain.fills.base import check_options
from masktrain.masks import as_dense
from masktrain.models import Classifier
from masktrain.registry import Registry


class MaskingMethod:
    """Base: ``logits(...) -> (B, K)``, ``features(...) -> (B, D)``, ``render(...) -> (B, 3, H, W)``.

    ``inplace=True`` lets a method overwrite ``images`` (the training step does, to
    avoid allocating a second batch). ``keep`` is a dense keep mask or a
    :class:`~masktrain.masks.BoxKeep`.
    """

    name: str = ""
    #: True when a keep mask of all ones gives the model exactly the unmasked image (pixel fills),
    #: so probes may reuse the clean logits instead of a forward pass.
    identity_when_nothing_removed: bool = False

    def logits(self, model: Classifier, images: Tensor, keep: Tensor, generator: torch.Generator | None = None, inplace: bool = False) -> Tensor:
        raise NotImplementedError

    def render(self, images: Tensor, keep: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the model receives, in pixel space, for looking at."""
        raise NotImplementedError

    def features(self, model: Classifier, images: Tensor, keep: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def features_and_logits(self, model: Classifier, images: Tensor, keep: Tensor,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(features, logits)`` of the same masked input (one forward pass where the model allows)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _once_if_identical(model: torch.nn.Module, fn, x: Tensor):
    """``fn(x)``, run on one row when every row of ``x`` is the same image (a constant fill over the
    whole image, or a constant fill on a constant donor) and broadcast: the outputs are the same
    rows, without the cost of a full batch. Only in evaluation (no autograd, ``model`` in eval mode:
    a train-mode batch norm would make rows depend on the batch)."""
    if torch.is_grad_enabled() or model.training or x.shape[0] < 2 or not bool((x == x[:1]).all()):
        return fn(x)
    out = fn(x[:1])
    expand = lambda t: t.expand(x.shape[0], *t.shape[1:]).contiguous()  # noqa: E731
    return tuple(expand(t) for t in out) if isinstance(out, tuple) else expand(out)


class FillMethod(MaskingMethod):
    """Colour-fill the removed pixels, then run the unmodified model."""

    identity_when_nothing_removed = True  # fill() returns the visible pixels unchanged

    def __init__(self, name: str, mean: Sequence[float] = IMAGENET_MEAN, **options) -> None:
        self.name, self.mean, self.options = name, tuple(mean), dict(options)  # options: the fill's, e.g. noise_std

    def apply(self, images: Tensor, keep: Tensor, generator: torch.Generator | None = None, inplace: bool = False) -> Tensor:
        return fill(images, keep, self.name, generator, self.mean, inplace, **self.options)

    def render(self, images, keep, generator=None):
        return self.apply(images, keep, generator)

    def logits(self, model, images, keep, generator=None, inplace=False):
        return _once_if_identical(model, model, self.apply(images, keep, generator, inplace))

    def features(self, model, images, keep, generator=None):
        return _once_if_identical(model, model.features, self.apply(images, keep, generator))

    def features_and_logits(self, model, images, keep, generator=None):
        x = self.apply(images, keep, generator)  # one fill: both outputs see the same input
        if hasattr(model, "features_and_logits"):
            return _once_if_identical(model, model.features_and_logits, x)
        return _once_if_identical(model, model.features, x), _once_if_identical(model, model, x)


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

    def features_and_logits(self, model, images, keep, generator=None):
        return self.features(model, images, keep, generator), self.logits(model, images, keep, generator)


MethodFactory = Callable[[str, Sequence[float]], MaskingMethod]
METHODS: Registry[MethodFactory] = Registry("masking method", "methods / mask.method")
METHODS.register("layer", lambda name, mean: LayerMethod())
METHODS.include(FILLS, lambda name, spec: FillMethod)


def get_method(name: str, mean: Sequence[float] = IMAGENET_MEAN, **options) -> MaskingMethod:
    """A masking method by name; ``mean`` is the dataset mean colour used by ``grey``.

    ``options`` go to a fill method's fill (e.g. ``get_method("noisy_linear", noise_std=0.0)``);
    a method or fill that does not take them is a UserError."""
    factory = METHODS.get(name)
    if not options:
        return factory(str(name), mean)
    if factory is not FillMethod:
        raise UserError(f"masking method {name!r} takes no options (got {sorted(options)})")
    check_options(FILLS.get(name), options)
    return FillMethod(str(name), mean, **options)
