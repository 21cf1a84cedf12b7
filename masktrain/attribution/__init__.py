"""Perturbation attributions under any masking method, and their evaluation (MoRF/LeRF, object agreement).

- :func:`attribute` — occlusion, LIME, KernelSHAP, feature ablation (Captum) with "removed"
  done by a masking method (``black``, ``grey``, ``blur``, ``noisy_linear``, ..., ``layer``).
- :func:`removal_curves`, :func:`curve_area`, :func:`morf_lerf_gap`, :func:`mass_inside`,
  :func:`topk_iou` — pure, per-image evaluation functions.
"""
from masktrain.attribution.explain import (
    ATTRIBUTIONS,
    AttributionConfig,
    MaskedForward,
    attribute,
    register_attribution,
    with_keep_channel,
)
from masktrain.attribution.faithfulness import (
    DEFAULT_FRACTIONS,
    curve_area,
    mass_inside,
    morf_lerf_gap,
    rank_pixels,
    removal_curves,
    removal_keep,
    topk_iou,
)
from masktrain.attribution.features import grid_features, make_features, slic_features

__all__ = [
    "ATTRIBUTIONS", "AttributionConfig", "DEFAULT_FRACTIONS", "MaskedForward", "attribute", "curve_area",
    "grid_features", "make_features", "mass_inside", "morf_lerf_gap", "rank_pixels", "register_attribution",
    "removal_curves", "removal_keep", "slic_features", "topk_iou", "with_keep_channel",
]
