"""Perturbation attributions (occlusion, LIME, KernelSHAP, feature ablation) under any masking method.

Captum does the estimation; masktrain supplies what "a feature is removed" means. The
input Captum perturbs is ``(N, 4, H, W)``: the image's 3 channels and a keep channel. Its
baseline is the same image with the keep channel at 0, so removing a feature leaves the
pixels alone and only zeroes the keep mask there; :class:`MaskedForward` splits the keep
channel off and evaluates ``method.logits(model, images, keep)``. Every masking method —
the colour fills (``black``, ``grey``, ``blur``, ``noisy_linear``, ...) and ``layer`` — is
therefore used through the same seam, and never special-cased.

Attributions are ``(B, H, W)``: each pixel carries its feature's (or, for occlusion, the
mean of its windows') effect on the target output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from masktrain.attribution.features import make_features
from masktrain.errors import UserError
from masktrain.fills import IMAGENET_MEAN
from masktrain.methods import MaskingMethod, get_method


class MaskedForward:
    """Captum forward function: ``(N, 4, H, W)`` (images in [0, 1] + keep channel) -> ``(N, K)``.

    ``output="logits"`` or ``"probs"`` (softmax). ``generator`` drives random fills
    (``noise``, ``random_colour``, ``noisy_linear``'s noise).
    """

    def __init__(self, model: torch.nn.Module, method: MaskingMethod, output: str = "logits",
                 generator: Optional[torch.Generator] = None) -> None:
        if output not in ("logits", "probs"):
            raise UserError(f"attribution output {output!r} is unknown; choose 'logits' or 'probs'")
        self.model, self.method, self.output, self.generator = model, method, output, generator

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        images, keep = x[:, :3], (x[:, 3:] > 0.5).to(x.dtype)
        logits = self.method.logits(self.model, images, keep, self.generator)
        return logits.softmax(-1) if self.output == "probs" else logits


def with_keep_channel(images: Tensor) -> tuple[Tensor, Tensor]:
    """``(input, baseline)`` for Captum, each ``(B, 4, H, W)``: keep channel 1 in the input, 0 in the baseline."""
    ones = images.new_ones(images.shape[0], 1, *images.shape[-2:])
    return torch.cat([images, ones], 1), torch.cat([images, 0 * ones], 1)


@dataclass
class AttributionConfig:
    """Options shared by the estimators (each reads the ones it needs).

    ``features`` ``grid`` (``patch`` px cells) or ``slic`` (``n_segments``) for LIME,
    KernelSHAP and ablation; ``window`` / ``stride`` for occlusion; ``n_samples``
    perturbations per image for LIME and KernelSHAP, evaluated ``perturbations_per_eval``
    at a time; ``interpretable_model`` for LIME: ``linear`` (least squares), ``ridge``
    or ``lasso`` (Captum's default, alpha 0.01); ``kernel_width`` of LIME's sample weights
    ``exp(-d^2 / width^2)``, ``d`` the cosine distance of a sample's binary feature vector to
    all-ones (the original LIME's image kernel and width 0.25; Captum's default measures the
    distance in input space, where our keep channel barely moves it).
    """

    features: str = "grid"
    patch: int = 16
    n_segments: int = 50
    compactness: float = 10.0
    window: int = 16
    stride: int = 8
    n_samples: int = 500
    perturbations_per_eval: int = 50
    interpretable_model: str = "linear"
    alpha: float = 0.01
    kernel_width: float = 0.25
    output: str = "logits"


Estimator = Callable[[MaskedForward, Tensor, Tensor, int, Tensor, AttributionConfig], Tensor]
#: ``estimator(forward, input (1, 4, H, W), baseline, target, feature_ids (1, 1, H, W), config) -> (H, W)``
ATTRIBUTIONS: dict[str, Estimator] = {}
#: estimators that need interpretable features (occlusion slides its own window)
NEEDS_FEATURES: set[str] = set()


def register_attribution(name: str, needs_features: bool = True) -> Callable[[Estimator], Estimator]:
    def decorate(fn: Estimator) -> Estimator:
        ATTRIBUTIONS[name] = fn
        if needs_features:
            NEEDS_FEATURES.add(name)
        return fn

    return decorate


def _features4(ids: Tensor) -> Tensor:
    return ids.expand(-1, 4, -1, -1)  # one feature id per pixel, shared by its 4 channels


def _interpretable_model(cfg: AttributionConfig):
    from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression, SkLearnRidge

    models = {"linear": lambda: SkLearnLinearRegression(), "ridge": lambda: SkLearnRidge(alpha=cfg.alpha),
              "lasso": lambda: SkLearnLasso(alpha=cfg.alpha)}
    if cfg.interpretable_model not in models:
        raise UserError(f"LIME interpretable_model {cfg.interpretable_model!r} is unknown; choose one of {sorted(models)}")
    return models[cfg.interpretable_model]()


def _lime_kernel(width: float):
    def similarity(original, perturbed, interpretable, **kwargs) -> float:
        z = interpretable.float().flatten()
        d = 1.0 - z.sum() / (z.norm() * z.numel() ** 0.5).clamp_min(1e-12)  # cosine distance to all-ones
        return float(torch.exp(-(d ** 2) / width ** 2))

    return similarity


@register_attribution("lime")
def lime(forward, x, baseline, target, ids, cfg):
    from captum.attr import Lime

    a = Lime(forward, interpretable_model=_interpretable_model(cfg), similarity_func=_lime_kernel(cfg.kernel_width)).attribute(
        x, baselines=baseline, target=target, feature_mask=_features4(ids), n_samples=cfg.n_samples,
        perturbations_per_eval=cfg.perturbations_per_eval)
    return a[0, 3]


@register_attribution("kernel_shap")
def kernel_shap(forward, x, baseline, target, ids, cfg):
    from captum.attr import KernelShap

    a = KernelShap(forward).attribute(x, baselines=baseline, target=target, feature_mask=_features4(ids),
                                      n_samples=cfg.n_samples, perturbations_per_eval=cfg.perturbations_per_eval)
    return a[0, 3]


@register_attribution("ablation")
def ablation(forward, x, baseline, target, ids, cfg):
    """Each feature removed alone (exact, ``n_features`` evaluations)."""
    from captum.attr import FeatureAblation

    a = FeatureAblation(forward).attribute(x, baselines=baseline, target=target, feature_mask=_features4(ids),
                                           perturbations_per_eval=cfg.perturbations_per_eval)
    return a[0, 3]


@register_attribution("occlusion", needs_features=False)
def occlusion(forward, x, baseline, target, ids, cfg):
    """A ``window`` x ``window`` patch slid with ``stride``; a pixel gets the mean effect of its windows."""
    from captum.attr import Occlusion

    a = Occlusion(forward).attribute(x, sliding_window_shapes=(4, cfg.window, cfg.window), strides=(4, cfg.stride, cfg.stride),
                                     baselines=baseline, target=target, perturbations_per_eval=cfg.perturbations_per_eval)
    return a[0, 3]


def attribute(
    model: torch.nn.Module,
    images: Tensor,
    targets: Tensor,
    attribution: str = "lime",
    removal: str = "grey",
    seeds: Optional[Sequence[int]] = None,
    config: Optional[AttributionConfig] = None,
    features: Optional[Tensor] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    removal_options: Optional[dict] = None,
) -> Tensor:
    """Attribution maps ``(B, H, W)`` of ``model`` for ``targets`` ``(B,)`` on ``images`` ``(B, 3, H, W)`` in [0, 1].

    ``attribution`` is a name in :data:`ATTRIBUTIONS`; ``removal`` is the masking method
    that removes a feature (any name :func:`masktrain.methods.get_method` knows, ``layer``
    included; ``mean`` is the dataset mean colour for ``grey``; ``removal_options`` go to its
    fill, e.g. ``{"noise_std": 0.0}`` for ``noisy_linear``). ``seeds`` ``(B,)`` seed each
    image's sampling and random fills (default: the image's index), so an image's map does
    not depend on which batch it came in. ``features`` ``(B, 1, H, W)`` overrides the
    interpretable features made from ``config``.

    Captum's estimators explain one example at a time; the perturbations of an image are
    evaluated in batches of ``config.perturbations_per_eval``.
    """
    if attribution not in ATTRIBUTIONS:
        raise UserError(f"attribution method {attribution!r} is unknown; choose one of {sorted(ATTRIBUTIONS)}")
    cfg = config or AttributionConfig()
    method = get_method(removal, mean, **(removal_options or {}))
    B = images.shape[0]
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} images")
    if features is None and attribution in NEEDS_FEATURES:
        features = make_features(images, cfg.features, cfg.patch, cfg.n_segments, cfg.compactness)
    x, baseline = with_keep_channel(images)
    out = images.new_zeros(B, *images.shape[-2:])
    for i in range(B):
        g = torch.Generator(device=images.device).manual_seed(seeds[i])
        forward = MaskedForward(model, method, cfg.output, g)
        ids = features[i: i + 1] if features is not None else None
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
            torch.manual_seed(seeds[i])  # Captum samples perturbations from the global generator
            out[i] = ATTRIBUTIONS[attribution](forward, x[i: i + 1], baseline[i: i + 1], int(targets[i]), ids, cfg)
    return out
