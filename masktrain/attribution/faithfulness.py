"""Evaluating attribution maps: MoRF / LeRF removal curves (ROAD), their areas, and agreement with the object.

All functions are pure and batched and return per-image values, so a probe can bootstrap
intervals over images. Attributions are ``(B, H, W)``; object masks ``(B, 1, H, W)`` or
``(B, H, W)`` with 1 = object.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from masktrain import rng
from masktrain.errors import UserError
from masktrain.fills import IMAGENET_MEAN
from masktrain.methods import get_method

DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def rank_pixels(attributions: Tensor, descending: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
    """Pixel indices ``(B, H*W)`` by attribution (most relevant first when ``descending``), ties in random order.

    Patch and superpixel maps are piecewise constant: without the random tie-break the
    removal order inside a feature would follow the raster scan (a shape of its own).
    """
    flat = attributions.flatten(1)
    shuffle = torch.argsort(rng.rand(generator, flat.shape, device=flat.device), dim=1)
    order = torch.argsort(flat.gather(1, shuffle), dim=1, descending=descending, stable=True)
    return shuffle.gather(1, order)


def removal_keep(order: Tensor, fraction: float, shape: Sequence[int]) -> Tensor:
    """Keep mask ``(B, 1, H, W)`` that removes the first ``round(fraction * H * W)`` pixels of ``order``."""
    B, n = order.shape
    k = int(round(fraction * n))
    keep = torch.ones(B, n, device=order.device)
    keep.scatter_(1, order[:, :k], 0.0)
    return keep.view(B, 1, *shape)


@torch.no_grad()
def removal_curves(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    attributions: Tensor,
    order: str = "morf",
    method: str = "noisy_linear",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    generator: Optional[torch.Generator] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    method_options: Optional[dict] = None,
) -> dict[str, Tensor]:
    """Accuracy and true-class probability as a growing fraction of pixels is removed.

    ``order="morf"`` removes the most relevant pixels first, ``"lerf"`` the least relevant.
    The removal is the masking method ``method`` (ROAD's ``noisy_linear`` by default; any
    name :func:`~masktrain.methods.get_method` knows; ``method_options`` go to its fill, e.g.
    ``{"noise_std": 0.0}``). ``generator``: a ``torch.Generator`` or a per-sample
    :class:`~masktrain.rng.SampleRandom` (tie-breaks and random fills). Returns ``fractions`` ``(F,)``,
    ``correct`` ``(B, F)`` bool and ``prob`` ``(B, F)``.
    """
    if order not in ("morf", "lerf"):
        raise UserError(f"removal order {order!r} is unknown; choose 'morf' or 'lerf'")
    removal = get_method(method, mean, **(method_options or {}))
    ranked = rank_pixels(attributions, descending=order == "morf", generator=generator)
    correct, prob = [], []
    for f in fractions:
        keep = removal_keep(ranked, f, images.shape[-2:]).to(images.dtype)
        p = removal.logits(model, images, keep, generator).float().softmax(-1)
        prob.append(p.gather(1, labels.view(-1, 1)).squeeze(1))
        correct.append(p.argmax(1) == labels)
    return {"fractions": torch.tensor(list(fractions)), "correct": torch.stack(correct, 1), "prob": torch.stack(prob, 1)}


def curve_area(values: Tensor, fractions: Sequence[float] | Tensor) -> Tensor:
    """Normalised trapezoid area ``(B,)`` under ``values`` ``(B, F)`` over ``fractions`` (mean height, in the values' units)."""
    x = torch.as_tensor(fractions, dtype=torch.float32, device=values.device)
    span = (x[-1] - x[0]).clamp_min(1e-12)
    return torch.trapezoid(values.float(), x, dim=-1) / span


def morf_lerf_gap(morf_area: Tensor, lerf_area: Tensor) -> Tensor:
    """``LeRF area - MoRF area``: large when removing the top pixels hurts and removing the bottom ones does not."""
    return lerf_area - morf_area


def _object(obj: Tensor) -> Tensor:
    return (obj.flatten(1) > 0.5).float()


def mass_inside(attributions: Tensor, obj: Tensor, positive_only: bool = False) -> Tensor:
    """Share ``(B,)`` of attribution mass (``|a|``, or ``max(a, 0)``) that lies on the object; NaN for an all-zero map."""
    a = attributions.flatten(1).float()
    a = a.clamp_min(0) if positive_only else a.abs()
    total = a.sum(1)
    return torch.where(total > 0, (a * _object(obj)).sum(1) / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


def topk_iou(attributions: Tensor, obj: Tensor, k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             absolute: bool = True) -> Tensor:
    """IoU ``(B,)`` of the ``k`` most relevant pixels with the object (``k`` default: each object's own area).

    Relevance is ``|a|`` by default (as in :func:`mass_inside`: evidence for and against the class
    both say where the model looks); ``absolute=False`` ranks by the signed value."""
    o = _object(obj)
    ranked = rank_pixels(attributions.abs() if absolute else attributions, descending=True, generator=generator)
    n = o.shape[1]
    ks = o.sum(1).long() if k is None else torch.full((o.shape[0],), int(k), device=o.device)
    top = (torch.arange(n, device=o.device)[None, :] < ks[:, None]).float()
    top_mask = torch.zeros_like(o).scatter_(1, ranked, top)
    inter = (top_mask * o).sum(1)
    union = ((top_mask + o) > 0).float().sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
