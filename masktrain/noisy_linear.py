"""Noisy linear imputation (ROAD, Rong et al., ICML 2022), solved for a whole batch on the device.

Each removed pixel takes the weighted mean of its in-image 8 neighbours (weight 1/6 for the
4 direct, 1/12 for the 4 diagonal ones); visible pixels are fixed. This is ROAD's
``NoisyLinearImputer`` (``road/imputations.py``) exactly:

- a neighbour outside the image does not count, and the remaining weights are renormalised
  (ROAD's diagonal is ``-(1 - sum of the out-of-image weights)``); a removed neighbour is an
  unknown, a visible one goes to the right-hand side;
- each channel is its own system with the same matrix;
- Gaussian noise of standard deviation ``noise_std`` is added to the *solution* at removed
  pixels only, independently per pixel and channel.

For the removed pixels ``R`` the system is ``(D - W_RR) x = W_RV v`` with ``D`` the sum of
in-image weights. The weights are symmetric, every row is weakly diagonally dominant and
every connected hole touches a visible pixel (unless nothing is visible), so the matrix is
symmetric positive definite: we solve it with conjugate gradients preconditioned by a
geometric multigrid V-cycle. Two implementations, chosen by ``solver=``:

- ``auto`` on CPU tensors: the compiled solver of :mod:`masktrain.noisy_linear_kernels`
  (numba) — planar arrays, every stencil one vectorised loop over the row spans of the
  holes, Jacobi smoothing, all channels with one hierarchy; 7-10 CG iterations at 224² on
  patches, blobs and rectangles. Images run in parallel over ``torch.get_num_threads()`` threads.
- ``torch`` (and ``auto`` on any other device, e.g. CUDA): the batched tensor solver below,
  the operator applied as a separable 3x3 stencil over the whole batch. Its preconditioner
  (``preconditioner=``) is a multigrid V-cycle with damped-Jacobi smoothing (default;
  :func:`_vcycle`; ~10-30 iterations whatever the size of the holes) or Jacobi
  (``"jacobi"``, started from a coarse-to-fine guess; hundreds of iterations for wide holes).

Stopping rule (the stated tolerance, the same for both): every image and channel stops when
its scaled residual ``max_i |r_i| / D_i`` — how far any removed pixel is from the weighted mean
of its neighbours — is at most ``tol``. With ``tol=2e-6`` (default) the compiled solver matched
ROAD's own imputer (noise 0) at 224² to at most 2.0e-5 max abs error on random patches, blobs,
two rectangles, a big square hole, thin lines, 98% removed and single-pixel holes
(benchmarks/attribution.py, 2026-12-02); the torch multigrid solver to 4.3e-5 in an earlier
session. The error is ~5-10x ``tol`` (on a constant image at 48²: up to 1.04e-5), so the default
keeps a wide margin under the 1e-3 goal. The tests check both solvers against a direct sparse
solve (to 2e-4).

Speed on a CPU (AMD EPYC, 2 cores, AVX2, **shared** with other jobs, load 3.6-5.0, 2026-12-02;
batch 16 at 224², ROAD timed per image as its users call it, side by side in one run of
``benchmarks/attribution.py``; README "Speed of noisy_linear"): the compiled solver was 25x /
33x / 55x faster per image than ROAD at 1 thread on patches / blobs / rectangles (the
Gauss-Seidel version before it, run just before: 11x / 12x / 24x), 47-135x on a big square
hole, thin lines and 98% removed, 17x on single-pixel holes (where ROAD is fast: it spends most
of its time building its sparse system). Quiet, same machine and day (two runs of
``--repeats 3``): 49.6-51.1x / 24.4-27.7x / 43.3-44.7x at 1 thread and 48.6-56.5x / 34.0-42.4x /
79.4-85.1x at 2 threads, so the 50x goal is met at 2 threads on patches and rectangles, not on
blobs. This version, quiet, AMD EPYC with AVX-512 (2026-12-02, session 5): 109.9x / 51.0x / 108.9x
at 1 thread and 114.4x / 61.6x / 137.0x at 2 (README). The torch solver was 2-3x ROAD at 1 thread
in an earlier session (AVX-512 machine); it is meant for a GPU, where it has not been measured (no GPU was available).

Two deliberate differences from ROAD, both outside its defined cases: an image with no
visible pixel (ROAD's matrix is singular there) gets the fallback colour, and with
``clamp=True`` (default) the noisy result is clipped to [0, 1] so the output stays a valid
image in this toolkit's pixel space (with ``noise_std=0`` the solution is a convex
combination of visible pixels and clamping changes nothing).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from masktrain.optional_kernels import OptionalKernels, numba_threads_like_torch

DIRECT, DIAGONAL = 1.0 / 6.0, 1.0 / 12.0
SOLVERS = ("auto", "torch")

KERNELS = OptionalKernels("masktrain.noisy_linear_kernels", "masktrain.noisy_linear", "the torch solver")


def _solve_compiled(values: Tensor, keep: Tensor, tol: float, max_iter: int, min_side: int) -> Optional[Tensor]:
    """The CPU fast path (:mod:`masktrain.noisy_linear_kernels`): ``values`` ``(n, C, H, W)`` float32/64
    (removed pixels are never read), ``keep`` ``(n, 1, H, W)``, every image with a visible pixel.
    Returns a new tensor (``values`` at visible pixels), or None when the compiled solver is unavailable."""
    kernels = KERNELS.get()
    if kernels is None:
        return None
    removed = (keep[:, 0] < 0.5).to(torch.uint8).contiguous()
    values = values.contiguous()
    out = torch.empty_like(values)
    try:
        with numba_threads_like_torch() as threads:
            kernels.solve_batch(values.numpy(), removed.numpy(), out.numpy(), float(tol), int(max_iter),
                                max(2, min_side // 2), kernels.COARSE_SCALE, kernels.COARSEST_SWEEPS,
                                kernels.COARSE_NEED, kernels.SWEEPS, threads, kernels.OMEGA)
    except kernels.NumbaError as exc:  # numba compiles on first call; nothing was returned yet
        KERNELS.disable(exc)
        return None
    return out


def _clamp_compiled(kernels, out: Tensor, keep: Tensor) -> bool:
    """Clips the removed pixels of ``out`` ``(B, C, H, W)`` (contiguous, CPU) to [0, 1] in place with the compiled
    kernel (one vectorised pass; torch.where took ~9 ms per batch of 16 at 224² at 1 thread); False when
    it cannot compile (then the caller clamps with torch)."""
    removed = (keep[:, 0] < 0.5).to(torch.uint8).contiguous()
    try:
        with numba_threads_like_torch():
            kernels.clamp_removed(out.numpy(), removed.numpy())
    except kernels.NumbaError as exc:
        KERNELS.disable(exc)
        return False
    return True


def _neighbour_sum(x: Tensor) -> Tensor:
    """Weighted sum (1/6 direct, 1/12 diagonal) of the in-image 8 neighbours of every pixel of
    ``(N, 1, H, W)``, zero outside the image. The stencil is ``(s s^T) / 12 - centre / 3`` with
    ``s = [1, 2, 1]``: two separable shifted adds, cheaper on a CPU than a 3x3 convolution."""
    p = F.pad(x, (1, 1, 0, 0))
    h = p[..., :-2] + p[..., 2:] + 2 * x
    p = F.pad(h, (0, 0, 1, 1))
    v = p[..., :-2, :] + p[..., 2:, :] + 2 * h
    return v / 12 - x / 3


def _operator(v: Tensor, removed: Tensor, diag: Tensor) -> Tensor:
    """``A v = removed * (diag * v - K v)``: the system's matrix on ``(N, 1, H, W)`` (``v`` zero at visible pixels)."""
    return removed * (diag * v - _neighbour_sum(v))


def _levels(removed: Tensor, min_side: int) -> list[tuple[Tensor, Tensor]]:
    """The multigrid hierarchy ``[(removed, diag), ...]``, finest first: a coarse cell is an unknown
    when all its 2x2 children are (near a visible pixel the error is small and the smoother handles it)."""
    def diag_of(h: int, w: int) -> Tensor:
        return _neighbour_sum(torch.ones(1, 1, h, w, device=removed.device, dtype=removed.dtype))

    levels = [(removed, diag_of(*removed.shape[-2:]))]
    while min(removed.shape[-2:]) >= 2 * min_side and bool(removed.any()):
        removed = (F.avg_pool2d(removed, 2, ceil_mode=True) > 0.999).to(removed.dtype)
        levels.append((removed, diag_of(*removed.shape[-2:])))
    return levels


def _vcycle(r: Tensor, levels: list, level: int = 0, omega: float = 0.8, coarse_scale: float = 0.5,
            coarsest_sweeps: int = 8) -> Tensor:
    """One multigrid V-cycle from zero for ``A e = r``: a symmetric, positive definite preconditioner.

    One damped-Jacobi sweep before and after the coarse correction (Jacobi is symmetric, so the
    cycle is), piecewise-constant prolongation ``P`` with restriction ``P^T`` (sums of children),
    the same 8-neighbour stencil re-discretised on each coarser grid, and the coarse correction
    scaled by ``coarse_scale`` = 1/2: the Galerkin operator ``P^T A P`` of piecewise-constant
    aggregation is about twice the re-discretised one. The coarsest grid gets a few Jacobi sweeps.
    ``omega`` = 0.8 < 2 / lambda_max(D^-1 A) = 1.5 keeps every sweep convergent.
    """
    removed, diag = levels[level]
    inv = omega * removed / diag
    x = inv * r
    if level == len(levels) - 1:
        for _ in range(coarsest_sweeps - 1):
            x = x + inv * (r - _operator(x, removed, diag))
        return x
    H, W = r.shape[-2:]
    rc = levels[level + 1][0] * F.avg_pool2d(r - _operator(x, removed, diag), 2, ceil_mode=True, divisor_override=1)
    ec = _vcycle(rc, levels, level + 1, omega, coarse_scale, coarsest_sweeps)
    x = x + coarse_scale * removed * F.interpolate(ec, scale_factor=2, mode="nearest")[..., :H, :W]
    return x + inv * (r - _operator(x, removed, diag))


def _cg(b: Tensor, removed: Tensor, diag: Tensor, x: Tensor, tol: float, max_iter: int, check_every: int,
        precondition=None) -> Tensor:
    """Preconditioned CG on ``A x = b`` with ``A x = removed * (diag * x - K * x)``.

    All tensors ``(N, 1, H, W)``; ``x`` (initial guess) is zero outside ``removed``. Each of
    the ``N`` systems has its own step sizes; a converged system stops moving.
    ``precondition(r) -> z``: Jacobi (``r / diag``) when None.
    """
    inv_diag = removed / diag
    precondition = precondition or (lambda res: res * inv_diag)

    def A(v: Tensor) -> Tensor:
        return _operator(v, removed, diag)

    r = b - A(x)
    z = precondition(r)
    p = z
    rz = (r * z).sum((2, 3), keepdim=True)
    active = torch.ones_like(rz)
    for it in range(max_iter):
        if it % check_every == 0:
            done = (r.abs() * inv_diag).amax((2, 3), keepdim=True) <= tol
            active = (~done).to(r.dtype)
            if not bool(active.any()):
                break
        Ap = A(p)
        pAp = (p * Ap).sum((2, 3), keepdim=True)
        alpha = active * rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp))
        x = x + alpha * p
        r = r - alpha * Ap
        z = precondition(r)
        rz_new = (r * z).sum((2, 3), keepdim=True)
        beta = rz_new / torch.where(rz > 0, rz, torch.ones_like(rz))
        p = z + beta * p
        rz = rz_new
    return x


def _solve(values: Tensor, keep: Tensor, tol: float, max_iter: int, check_every: int, min_side: int,
           preconditioner: str = "multigrid") -> Tensor:
    """The full ``(N, 1, H, W)`` image: ``values`` at visible pixels, the linear solution elsewhere.

    ``values`` is zero at removed pixels, ``keep`` is ``(N, 1, H, W)`` in {0, 1} and every
    system has at least one visible pixel.
    """
    N, _, H, W = values.shape
    removed = 1.0 - keep
    if not bool(removed.any()):
        return values
    diag = _neighbour_sum(torch.ones(1, 1, H, W, device=values.device, dtype=values.dtype))
    b = removed * _neighbour_sum(values)
    x0 = torch.zeros_like(values)
    if preconditioner == "multigrid":
        levels = _levels(removed, max(2, min_side // 2))
        # ~10-30 iterations: test convergence every step (a reduction, cheap next to a V-cycle)
        x = _cg(b, removed, diag, x0, tol, max_iter, 1, lambda r: _vcycle(r, levels))
        return values + removed * x
    if min(H, W) >= 2 * min_side:
        # Coarse grid: a coarse pixel is visible when any of its children is, with their mean.
        ck = F.avg_pool2d(keep, 2, ceil_mode=True)
        cv = F.avg_pool2d(values, 2, ceil_mode=True) / ck.clamp_min(1e-12)
        ck = (ck > 0).to(values.dtype)
        coarse = _solve(cv * ck, ck, tol, max_iter, check_every, min_side, preconditioner)
        x0 = removed * F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    x = _cg(b, removed, diag, x0, tol, max_iter, check_every)
    return values + removed * x


def noisy_linear(
    images: Tensor,
    keep: Tensor,
    noise_std: float = 0.01,
    generator: Optional[torch.Generator] = None,
    fallback: Sequence[float] = (0.485, 0.456, 0.406),
    tol: float = 2e-6,
    max_iter: int = 2000,
    clamp: bool = True,
    check_every: int = 8,
    min_side: int = 8,
    preconditioner: str = "multigrid",
    solver: str = "auto",
) -> Tensor:
    """ROAD's noisy linear imputation of the removed pixels of a batch.

    Args:
        images: ``(B, C, H, W)`` in [0, 1]; removed pixels are never read.
        keep: ``(B, 1, H, W)`` keep mask, 1 = visible, 0 = removed.
        noise_std: standard deviation of the Gaussian noise added to the imputed pixels
            (ROAD's ``noise``, absolute; 0 = the plain linear solution).
        generator: for the noise.
        fallback: ``(C,)`` colour for images with no visible pixel at all.
        tol: stop once every removed pixel is within ``tol`` of the weighted mean of its
            neighbours (scaled residual, per image and channel).
        max_iter: cap on CG iterations per grid level.
        clamp: clip the result to [0, 1] (only matters with noise).
        preconditioner: ``multigrid`` (a V-cycle per CG step: ~10-30 iterations whatever the
            hole size) or ``jacobi`` (the first version: hundreds of iterations for wide holes,
            started from a coarse-to-fine guess); the torch solver only.
        solver: ``auto`` (the compiled solver of :mod:`masktrain.noisy_linear_kernels` for CPU
            tensors without grad when numba works, else the batched torch solver) or ``torch``
            (the batched torch solver on any device). Both stop at the same ``tol``.

    Returns:
        ``(B, C, H, W)``: ``images`` at visible pixels, the imputation at removed ones.
    """
    if solver not in SOLVERS:
        from masktrain.errors import UserError

        raise UserError(f"noisy_linear solver={solver!r} is not one of {', '.join(SOLVERS)}; use solver=auto")
    B, C, H, W = images.shape
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    keep = (keep > 0.5).to(work)
    visible = keep.expand(B, C, H, W)
    src = images.to(work)
    has_any = keep.flatten(1).any(1)
    every = bool(has_any.all())  # the usual case: no copy of the batch
    kernels = None
    out = None
    if bool(has_any.any()):
        idx = has_any.nonzero().flatten()
        n = idx.numel()
        solved = None
        if solver == "auto" and images.device.type == "cpu" and not src.requires_grad:
            # the compiled solver never reads removed pixels, so it gets the images as they are: the masked
            # copy the torch solver needs (torch.where) took ~9 ms per batch of 16 at 224² at 1 thread
            solved = _solve_compiled(src if every else src[idx], keep if every else keep[idx], tol, max_iter,
                                     min_side)
            if solved is not None:
                kernels = KERNELS.get()
        if solved is None:
            values = torch.where(visible.bool(), src, torch.zeros((), device=images.device, dtype=work))
            flat_keep = visible.reshape(B * C, 1, H, W)
            solved = _solve(values[idx].reshape(n * C, 1, H, W), flat_keep.view(B, C, H, W)[idx].reshape(n * C, 1, H, W),
                            tol, max_iter, check_every, min_side, preconditioner).view(n, C, H, W)
        if every:
            out = solved
        else:
            out = torch.empty_like(src)
            out[idx] = solved
    if not every:
        if out is None:
            out = torch.empty_like(src)
        colour = torch.as_tensor(fallback, device=images.device, dtype=work).view(1, -1, 1, 1)
        out[~has_any] = colour.expand(int((~has_any).sum()), C, H, W)
    if noise_std > 0:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=work)
        out = out + noise_std * (1.0 - keep) * noise
    if clamp:
        out = out.contiguous()
        if kernels is None or not _clamp_compiled(kernels, out, keep):
            out = torch.where(visible.bool(), out, out.clamp(0.0, 1.0))
    return out.to(images.dtype)
