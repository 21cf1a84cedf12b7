"""Layer masking (Balasubramanian & Feizi, ICCV 2023) for any torch.fx-traceable CNN.

``masked = layer_mask(model)``; ``masked(x, keep)`` runs ``model`` so that every
activation map only carries visible pixels. See ``docs/layer_masking.md``.
"""
from masktrain.layer_masking.convert import LayerMasked, layer_mask
from masktrain.layer_masking.masked import Masked

__all__ = ["LayerMasked", "Masked", "layer_mask"]
