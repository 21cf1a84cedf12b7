"""``noisy_linear``: ROAD's noisy linear imputation (the solver is :mod:`masktrain.noisy_linear`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from masktrain import rng
from masktrain.fills.base import IMAGENET_MEAN, register_fill
from masktrain.noisy_linear import noisy_linear as _solve


def _normal(generator, shape, device, dtype) -> Tensor:
    """Standard normal ``shape`` = (B, ...) from two uniform draws (Box-Muller) through :func:`masktrain.rng.rand`,
    so a ``torch.Generator`` and a per-sample :class:`~masktrain.rng.SampleRandom` both work."""
    u = rng.rand(generator, (shape[0], 2, *shape[1:]), device=device, dtype=torch.float64)
    r = torch.sqrt(-2.0 * torch.log1p(-u[:, 0]))  # 1 - u in (0, 1]: log is finite
    return (r * torch.cos(2 * math.pi * u[:, 1])).to(dtype)


@register_fill("noisy_linear")
def noisy_linear(images: Tensor, keep: Tensor, generator=None, mean=IMAGENET_MEAN, noise_std: float = 0.01,
                 tol: float = 2e-6) -> Tensor:
    """Each removed pixel is the weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal;
    visible pixels fixed), one linear system per image solved for the batch, plus Gaussian noise
    ``noise_std`` (0 allowed) at removed pixels. Images with nothing visible get ``mean``.
    ``(B, 3, H, W)``."""
    if not float(noise_std) >= 0:
        from masktrain.errors import UserError

        raise UserError(f"noisy_linear noise_std must be >= 0 (got {noise_std}); set noise_std=0.01 (ROAD's default) or 0")
    out = _solve(images, keep, noise_std=0.0, fallback=mean, tol=tol)
    if noise_std > 0:
        noise = _normal(generator, out.shape, out.device, out.dtype)
        out = (out + noise_std * (1.0 - (keep > 0.5).to(out.dtype)) * noise).clamp(0.0, 1.0)
    return out
