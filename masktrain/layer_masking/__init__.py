"""Layer masking (Balasubramanian & Feizi, ICCV 2023) for any torch.fx-traceable CNN.

``masked = layer_mask(model)``; ``masked(x, keep)`` runs ``model`` so that every
activation map only carries visible pixels. ``register_rule`` adds a rule for a module
class, function or method of your own. See ``docs/layer_masking.md``.
"""
from masktrain.layer_masking.convert import LayerMasked, layer_mask
from masktrain.layer_masking.masked import Masked, clean, clean_, mask_view
from masktrain.layer_masking.registry import Ctx, Rule, register_rule

__all__ = ["Ctx", "LayerMasked", "Masked", "Rule", "clean", "clean_", "layer_mask", "mask_view", "register_rule"]
