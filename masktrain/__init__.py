"""masktrain: random-mask augmentation, layer masking and shape-leakage probes for CNNs.

Conventions shared by every module (docs/design.md, "Conventions"): a *keep mask* is a float
tensor ``(B, 1, H, W)`` in {0, 1} with 1 = visible, 0 = removed; images are float
``(B, 3, H, W)`` in [0, 1] (pixel space) until the model's own normalisation.
"""

__version__ = "0.1.0"
