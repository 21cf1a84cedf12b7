"""Batch norm over visible positions only.

Evaluation (running statistics): ``bn(a)`` at visible positions (``a`` is 0 where removed, so this is
``bn(a·m)·m`` there); the removed positions are left dirty for the reader to zero.

Training (or a BN without running statistics): per channel, mean and biased variance
over the visible positions of the batch (``n = sum(m)`` positions, the same for every
channel), normalise, affine; the removed positions are left dirty (see
:class:`~masktrain.layer_masking.masked.Masked`: the reader zeroes them, and no reader sends a
gradient back to them). Running statistics are updated like torch's BN:
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

from typing import Optional

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
        return Masked(out, x.m, dirty=True)  # per position: the removed ones are zeroed lazily
    n, p = _visible_fraction(x.m, cache)
    if n == 0:  # nothing visible anywhere in the batch: no statistics, output all removed
        return Masked(clean(x).a * 0, x.m)
    removed = cache.get(x.m, "removed", lambda: 1 - x.m)
    weight = bn.weight if bn.weight is not None else torch.ones(x.a.shape[1], dtype=x.a.dtype, device=x.a.device)
    out, mean, invstd = _VisibleBatchNorm.apply(x.a, x.m, removed, weight, bn.bias, n, p, bn.eps, x.dirty, overwrite)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean, invstd, n, p)
    # Left dirty: the reader zeroes the removed positions (a ReLU in its own pass, a k×k conv's
    # padding, the next batch norm), and no reader passes a gradient back to a removed position
    # of a dirty map, so the backward needs no ``g·m`` either.
    return Masked(out, x.m, dirty=True)


class _VisibleBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over visible positions, forward as the shift trick above.

    A custom backward because autograd's, through ``mean`` and the shift, costs three extra
    full-size passes (``g·removed``, its sum, and the accumulation of the sum's expanded
    gradient). Here: the gradient of the shifted input ``gs`` comes from torch's batch-norm
    backward on ``g`` (already zero at removed positions: the output is dirty, and readers of a
    dirty map send no gradient to its removed positions); every removed position of the shifted input holds ``mu``, so ``gs``
    there is one per-channel value, known in closed form from that backward's outputs, and the
    gradient of ``a`` is ``m · (gs + (N − n)/n · gs_removed)`` (``N`` positions per channel).
    """

    @staticmethod
    def forward(ctx, a: Tensor, m: Tensor, removed: Tensor, weight: Tensor, bias: Optional[Tensor], n: float,
                p: float, eps: float, dirty: bool, overwrite: bool):
        # ``overwrite``: ``a`` is read by nothing else and saved by no autograd node (a conv output)
        if dirty:
            a = a.mul_(m) if overwrite else a * m
            overwrite = True
        mean = a.sum(dim=(0, 2, 3)) / n  # a is zero where removed
        shift = mean.view(1, -1, 1, 1)
        shifted = a.addcmul_(removed, shift) if overwrite else torch.addcmul(a, removed, shift)
        scaled = weight * p**0.5
        out, save_mean, invstd = torch.native_batch_norm(shifted, scaled, bias, None, None, True, 0.0, eps * p)
        ctx.save_for_backward(shifted, m, scaled, mean, save_mean, invstd)
        ctx.stats = (n, p, eps, bias is not None)
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx, g: Tensor, _mean: Tensor, _invstd: Tensor):
        shifted, m, scaled, mean, save_mean, invstd = ctx.saved_tensors
        n, p, eps, has_bias = ctx.stats
        need_a, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4] and has_bias
        gs, g_scaled, g_bias = torch.ops.aten.native_batch_norm_backward(
            g, shifted, scaled, None, None, save_mean, invstd, True, eps * p, [need_a, True, True])
        g_a = None
        if need_a:
            total = shifted.numel() // shifted.shape[1]
            # torch's formula at a position holding x = mu: w·invstd·(−Σg/N − (mu − mean)·invstd·Σ(g·x̂)/N),
            # with Σg = g_bias and Σ(g·x̂) = g_scaled (the normalised input x̂ = (x − mean)·invstd)
            at_removed = (-g_bias - (mean - save_mean) * invstd * g_scaled) / total * invstd * scaled
            g_a = gs.add_((at_removed * ((total - n) / n)).view(1, -1, 1, 1)).mul_(m)
        g_w = g_scaled * p**0.5 if need_w else None
        return g_a, None, None, g_w, g_bias if need_b else None, None, None, None, None, None


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, invstd: Tensor, n: float, p: float) -> None:
    # invstd = 1 / sqrt(p * var + p * eps) for the shifted input, so var = 1 / (p * invstd^2) - eps.
    var = (invstd.double().pow(-2) / p - bn.eps).clamp_(min=0).to(mean.dtype)
    unbiased = var * (n / max(n - 1.0, 1.0))
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
