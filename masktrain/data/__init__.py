"""Datasets that yield ``(image (3, H, W) in [0, 1], label, object_mask (1, H, W) in {0, 1})``."""
