"""Batch norm over visible positions only.

Evaluation (running statistics): ``bn(a) * m`` (``a`` is 0 where removed, so this is ``bn(a·m)·m``).

Training (or a BN without running statistics): per channel, mean and biased variance
over the visible positions of the batch (``n = sum(m)`` positions, the same for every
channel), normalise, affine, ``* m``. Running statistics are updated like torch's BN:
``running = (1 - f) * running + f * stat`` with ``f = momentum`` (or ``1 /
num_batches_tracked`` when momentum is None), the variance unbiased with ``n / (n - 1)``,
and ``num_batches_tracked`` incremented.

Speed: rather than a chain of elementwise ops, the removed positions are set to the
visible mean ``mu`` (a differentiable function of ``a``), which makes the all-position
mean equal ``mu`` and the all-position variance ``p * var`` (``p = n / N``); torch's fused
batch norm with ``eps * p`` and weight ``* sqrt(p)`` then computes exactly the visible-only
normalisation, forward and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masktrain.layer_masking.masked import MaskCache, Masked, clean


def _visible_fraction(mask: Tensor, cache: MaskCache) -> tuple[float, float]:
    """``(n, p)``: number of visible positions over the batch and their share of all positions."""

    def compute():
        n = float(mask.sum())
        return n, n / mask.numel()

    return cache.get(mask, "visible", compute)


def masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Masked, cache: MaskCache, overwrite: bool = False) -> Masked:
    """Batch norm ``bn`` applied to ``x`` (``a`` ``(B, C, h, w)``) with statistics over visible positions.

    ``overwrite``: ``x.a`` is read by nothing else and not saved for backward (e.g. a conv output),
    so training mode may zero and shift it in place instead of allocating.
    """
    use_batch_stats = bn.training or bn.running_mean is None or bn.running_var is None
    if not use_batch_stats:
        # F.batch_norm, not bn(): subclasses such as timm's BatchNormAct2d append their own act.
        out = F.batch_norm(x.a, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if not torch.is_grad_enabled():
            return Masked(out, x.m, dirty=True)  # per position: the removed ones are zeroed lazily
        return Masked(out.mul_(x.m), x.m)  # in place: BN's backward saves its input, not its output
    if x.dirty and overwrite:
        x = Masked(x.a.mul_(x.m), x.m)
    x = clean(x)
    a, m = x.a, x.m
    n, p = _visible_fraction(m, cache)
    if n == 0:  # nothing visible anywhere in the batch: no statistics, output all removed
        return Masked(a * 0, m)
    mean = a.sum(dim=(0, 2, 3)) / n  # a is zero where removed
    removed = cache.get(m, "removed", lambda: 1 - m)
    # a's sum has no saved tensors and addcmul's gradient for a is the identity: in place is autograd-safe
    shifted = a.addcmul_(removed, mean.view(1, -1, 1, 1)) if overwrite else torch.addcmul(a, removed, mean.view(1, -1, 1, 1))
    weight = bn.weight if bn.weight is not None else torch.ones_like(mean)
    out, _, invstd = torch.native_batch_norm(
        shifted, weight * p**0.5, bn.bias, None, None, True, 0.0, bn.eps * p
    )
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), invstd.detach(), n, p)
    return Masked(out.mul_(m), m)


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, invstd: Tensor, n: float, p: float) -> None:
    # invstd = 1 / sqrt(p * var + p * eps) for the shifted input, so var = 1 / (p * invstd^2) - eps.
    var = (invstd.double().pow(-2) / p - bn.eps).clamp_(min=0).to(mean.dtype)
    unbiased = var * (n / max(n - 1.0, 1.0))
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
