"""The three layer-masking properties, checked on one model (used by the tests and the census).

(a) an all-ones keep mask gives the unconverted model's output;
(b) removed pixels are never read: changing them changes no output bit;
(c) a training-mode forward and backward gives finite gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from masktrain.layer_masking.convert import layer_mask


@dataclass
class PropertyReport:
    """Outcome of :func:`check_properties`; ``ok`` when all three hold."""

    ones_rel_err: float  # (a) ||masked(x, 1) - model(x)|| / ||model(x)||
    removed_unread: bool  # (b)
    grads_finite: bool  # (c)
    mask_changes_output: bool  # the mask has an effect at all (rel. change > 1e-4)
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.ones_rel_err <= self.tolerance and self.removed_unread and self.grads_finite

    def problems(self) -> str:
        out = []
        if not self.ones_rel_err <= self.tolerance:
            out.append(f"all-ones keep differs from plain (rel err {self.ones_rel_err:.2e})")
        if not self.removed_unread:
            out.append("output depends on removed pixels")
        if not self.grads_finite:
            out.append("non-finite or missing gradients")
        return "; ".join(out)


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return torch.cat([_first_tensor(v).flatten(1) for v in value], 1)
    if isinstance(value, dict):
        return torch.cat([_first_tensor(v).flatten(1) for v in value.values()], 1)
    raise TypeError(f"model output of type {type(value).__name__}")


def _rel(out: Tensor, ref: Tensor) -> float:
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def patch_keep(batch: int, size: int, patch: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Random ``patch``² cells removed with probability 1/2, ``(B, 1, size, size)``; image 1 also
    loses its top half (a large removed region)."""
    g = torch.Generator().manual_seed(seed)
    cells = (torch.rand(batch, 1, -(-size // patch), -(-size // patch), generator=g) > 0.5).to(dtype)
    keep = cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :size, :size].contiguous()
    if batch > 1:
        keep[1, :, : size // 2] = 0
    return keep


def check_properties(
    model: nn.Module,
    size: int = 64,
    batch: int = 2,
    patch: int = 8,
    tolerance: float = 1e-5,
    masked: Optional[nn.Module] = None,
    seed: int = 1,
) -> PropertyReport:
    """Convert ``model`` (unless ``masked`` is given) and check the three properties at ``size``².

    Leaves ``model`` in eval mode with its gradients set (from (c)).
    """
    masked = layer_mask(model) if masked is None else masked
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.randn(batch, 3, size, size, generator=g).to(dtype)
    keep = patch_keep(batch, size, patch, seed + 1, dtype)
    with torch.no_grad():
        plain = _first_tensor(model(x))
        ones = _first_tensor(masked(x, torch.ones_like(keep)))
        out = _first_tensor(masked(x, keep))
        noisy = x + 10 * torch.randn(x.shape, generator=g).to(dtype) * (1 - keep)
        unread = torch.equal(_first_tensor(masked(noisy, keep)), out)
    masked.train()
    try:
        model.zero_grad(set_to_none=True)
        _first_tensor(masked(x, keep)).square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = bool(grads) and all(bool(torch.isfinite(g_).all()) for g_ in grads)
    finally:
        model.eval()
    return PropertyReport(_rel(ones, plain), unread, finite, _rel(out, plain) > 1e-4, tolerance)
