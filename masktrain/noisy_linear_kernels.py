"""The compiled (numba) CPU solver behind :func:`masktrain.noisy_linear.noisy_linear`.

Imported lazily by :mod:`masktrain.noisy_linear`, which falls back to the batched torch solver
when this module cannot be imported or compiled. It solves the same system to the same stopping
rule (scaled residual ``max_i |r_i| / D_i <= tol``), with the same method family — conjugate
gradients preconditioned by a geometric multigrid V-cycle — but on the compact set of removed
pixels only, with every stencil fused into one loop:

- each image gets its multigrid hierarchy once and solves its 3 channels with it (the
  operator is the same for all channels); images run in parallel (``prange``);
- every level is a zero-bordered flat array of side ``(H + 2) x (W + 2)`` plus the list of its
  unknowns (removed pixels / coarse cells), so a stencil is 8 loads at fixed offsets with no
  bounds checks and the loops visit only unknowns;
- the smoother is Gauss-Seidel (forward before the coarse correction, backward after it, so
  the V-cycle is symmetric and CG applies): 6-8 CG iterations at 224² where the torch solver's
  damped-Jacobi cycle needs 10-30;
- the loops are written out for 3 channels (other counts are padded by the caller) with scalar
  accumulators, and the smoother works in float32 with the neighbour just written kept in a
  register: 1.3-1.5x faster than the first version, which kept per-channel accumulators in
  arrays (a store and a load per unknown) and promoted every update to float64.

Why this exists: the torch solver makes ~10 full-image passes over memory per stencil; at
224² on a CPU that made it slower than ROAD's direct solve (benchmarks/attribution.py). Here a
stencil is one loop over the unknowns: 16-27x faster than ROAD per image at 1 thread on the
issue's masks (AMD EPYC, 2 cores, AVX2, quiet; README, "Speed of noisy_linear").
What is left is the scalar Gauss-Seidel sweep (~12 ns per unknown for 3 channels there): each
update reads the one just written, so it does one pixel per instruction.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from numba.core.errors import NumbaError

__all__ = ["NumbaError", "solve_batch"]

DIRECT, DIAGONAL = 1.0 / 6.0, 1.0 / 12.0
# Multigrid settings, chosen by CG iteration counts at 224² (benchmarks/attribution.py masks, tol 2e-6):
# two Gauss-Seidel sweeps each way and an unscaled coarse correction took 6-8 iterations on patches,
# blobs and rectangles (one sweep: 9-12; coarse scale 0.5: up to 22; 1.5: up to 14). A coarse cell is
# an unknown only when all its children are (``COARSE_NEED`` = 4; 3 or fewer was no better).
SWEEPS, COARSE_SCALE, COARSE_NEED, COARSEST_SWEEPS = 2, 1.0, 4, 4
# Storage of the iterates (dot products and the stopping test accumulate in float64): float32 halves
# the memory traffic of every stencil; its rounding (~1e-7 on values in [0, 1]) is far below tol.
FLOAT = np.float32
# the stencil weights in FLOAT: the smoother's arithmetic stays in float32 (a float64 constant would
# promote every update and put two conversions on its dependency chain)
F_DIRECT, F_DIAGONAL = FLOAT(DIRECT), FLOAT(DIAGONAL)


@numba.njit(cache=True, inline="always")
def _nsum(v, k, wp):
    """Weighted 8-neighbour sum of flat ``v`` at ``k`` (row stride ``wp``; the zero border stands in for outside)."""
    return ((v[k - 1] + v[k + 1] + v[k - wp] + v[k + wp]) * DIRECT
            + (v[k - wp - 1] + v[k - wp + 1] + v[k + wp - 1] + v[k + wp + 1]) * DIAGONAL)


@numba.njit(cache=True, inline="always")
def _nsum_c(v, k, c, wp):
    """:func:`_nsum` of channel ``c`` of ``v`` ``(pixels, C)``."""
    return ((v[k - 1, c] + v[k + 1, c] + v[k - wp, c] + v[k + wp, c]) * DIRECT
            + (v[k - wp - 1, c] + v[k - wp + 1, c] + v[k + wp - 1, c] + v[k + wp + 1, c]) * DIAGONAL)


@numba.njit(cache=True, inline="always")
def _nsum32(v, k, c, wp):
    """:func:`_nsum_c` in float32 (for the multigrid cycle; CG's operator keeps float64)."""
    return ((v[k - 1, c] + v[k + 1, c] + v[k - wp, c] + v[k + wp, c]) * F_DIRECT
            + (v[k - wp - 1, c] + v[k - wp + 1, c] + v[k + wp - 1, c] + v[k + wp + 1, c]) * F_DIAGONAL)


@numba.njit(cache=True)
def _diag(h, w):
    """Sum of in-image neighbour weights of every pixel, flat zero-bordered ``(h + 2) * (w + 2)``."""
    wp = w + 2
    ones = np.zeros((h + 2) * wp)
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            ones[i * wp + j] = 1.0
    d = np.zeros((h + 2) * wp)
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            d[i * wp + j] = _nsum(ones, i * wp + j, wp)
    return d


@numba.njit(cache=True)
def _unknowns(removed, h, w):
    """Flat (bordered) indices of the nonzero entries of flat bordered ``removed``, row-major."""
    wp = w + 2
    n = 0
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            if removed[i * wp + j]:
                n += 1
    idx = np.empty(n, np.int64)
    n = 0
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            if removed[i * wp + j]:
                idx[n] = i * wp + j
                n += 1
    return idx


@numba.njit(cache=True)
def _coarsen(removed, h, w, need):
    """Coarse unknowns: a cell of 2x2 children is one when at least ``need`` of its in-image children are
    (``need`` >= 4: all of them)."""
    hc, wc = (h + 1) // 2, (w + 1) // 2
    wp, wcp = w + 2, wc + 2
    out = np.zeros((hc + 2) * wcp, np.uint8)
    for ic in range(hc):
        for jc in range(wc):
            nin, nrem = 0, 0
            for di in range(2):
                for dj in range(2):
                    i, j = 2 * ic + di, 2 * jc + dj
                    if i < h and j < w:
                        nin += 1
                        nrem += removed[(i + 1) * wp + j + 1] != 0
            out[(ic + 1) * wcp + jc + 1] = nrem >= min(need, nin)
    return out, hc, wc


@numba.njit(cache=True)
def _gs(e, r, idx, dinv, wp, forward):
    """One Gauss-Seidel sweep over the unknowns ``idx`` for the 3 channels of ``e``/``r`` ``(pixels, 3)``
    (``e`` zero off the unknowns), written for latency: each update depends on the one before it only
    through the neighbour just written (left in a forward sweep, right in a backward one), which is
    kept in a register and added last, in float32. The other 7 neighbours and ``r`` are summed first,
    off the dependency chain (the chain is one multiply-add and a multiply instead of a store-to-load
    forward, three adds and two float64 conversions)."""
    n = idx.size
    zero = np.float32(0.0)
    a0, a1, a2 = zero, zero, zero
    last = -2
    for s in range(n):
        t = s if forward else n - 1 - s
        k = idx[t]
        far = k + 1 if forward else k - 1  # the horizontal neighbour not yet updated in this sweep
        # the other horizontal neighbour was updated just before when it is an unknown (then it is the
        # previous entry of the row-major list); otherwise it is off the unknowns, where e is zero
        cont = last == (k - 1 if forward else k + 1)
        dv = dinv[t]
        u = k - wp
        d = k + wp
        s0 = r[k, 0] + F_DIRECT * (e[far, 0] + e[u, 0] + e[d, 0]) + F_DIAGONAL * (
            e[u - 1, 0] + e[u + 1, 0] + e[d - 1, 0] + e[d + 1, 0])
        s1 = r[k, 1] + F_DIRECT * (e[far, 1] + e[u, 1] + e[d, 1]) + F_DIAGONAL * (
            e[u - 1, 1] + e[u + 1, 1] + e[d - 1, 1] + e[d + 1, 1])
        s2 = r[k, 2] + F_DIRECT * (e[far, 2] + e[u, 2] + e[d, 2]) + F_DIAGONAL * (
            e[u - 1, 2] + e[u + 1, 2] + e[d - 1, 2] + e[d + 1, 2])
        a0 = (s0 + F_DIRECT * (a0 if cont else zero)) * dv
        a1 = (s1 + F_DIRECT * (a1 if cont else zero)) * dv
        a2 = (s2 + F_DIRECT * (a2 if cont else zero)) * dv
        e[k, 0] = a0
        e[k, 1] = a1
        e[k, 2] = a2
        last = k


@numba.njit(cache=True)
def _vcycle(r0, e0, idxs, dinvs, parents, shapes, es, rs, coarse_scale, coarsest_sweeps, sweeps):
    """``e0`` := one symmetric V-cycle from zero for ``A e = r0``, all 3 channels (arrays ``(pixels, 3)``;
    level 0 arrays are ``r0``/``e0``, coarser ones ``rs[l]``/``es[l]``).

    Level ``l``: unknowns ``idxs[l]`` (flat bordered indices), their inverse diagonals ``dinvs[l]``,
    and the coarse cell of each unknown ``parents[l]`` (not for the coarsest)."""
    nl = len(idxs)
    zero = FLOAT(0.0)
    for lev in range(nl):
        wp = shapes[lev][1] + 2
        idx, dinv = idxs[lev], dinvs[lev]
        r = r0 if lev == 0 else rs[lev]
        e = e0 if lev == 0 else es[lev]
        for k in idx:
            e[k, 0] = zero
            e[k, 1] = zero
            e[k, 2] = zero
        if lev == nl - 1:
            for _ in range(coarsest_sweeps):
                _gs(e, r, idx, dinv, wp, True)
                _gs(e, r, idx, dinv, wp, False)
            break
        for _ in range(sweeps):  # forward Gauss-Seidel from zero
            _gs(e, r, idx, dinv, wp, True)
        # restriction P^T of the residual: a coarse cell gets the sum of its children's residuals
        rc, par = rs[lev + 1], parents[lev]
        for k in idxs[lev + 1]:
            rc[k, 0] = zero
            rc[k, 1] = zero
            rc[k, 2] = zero
        for t in range(idx.size):
            k, kc = idx[t], par[t]
            dg = FLOAT(1.0) / dinv[t]
            # a coarse cell that is not an unknown collects a sum too; it is never read
            rc[kc, 0] += r[k, 0] - (e[k, 0] * dg - _nsum32(e, k, 0, wp))
            rc[kc, 1] += r[k, 1] - (e[k, 1] * dg - _nsum32(e, k, 1, wp))
            rc[kc, 2] += r[k, 2] - (e[k, 2] * dg - _nsum32(e, k, 2, wp))
    cs = FLOAT(coarse_scale)
    for lev in range(nl - 2, -1, -1):
        wp = shapes[lev][1] + 2
        idx, dinv, par = idxs[lev], dinvs[lev], parents[lev]
        r = r0 if lev == 0 else rs[lev]
        e = e0 if lev == 0 else es[lev]
        ec = es[lev + 1]
        for t in range(idx.size):  # piecewise-constant prolongation (ec is zero off the coarse unknowns)
            k, kc = idx[t], par[t]
            e[k, 0] += cs * ec[kc, 0]
            e[k, 1] += cs * ec[kc, 1]
            e[k, 2] += cs * ec[kc, 2]
        for _ in range(sweeps):  # backward Gauss-Seidel: the cycle is symmetric
            _gs(e, r, idx, dinv, wp, False)


@numba.njit(cache=True)
def _parents(idx, w):
    """Flat bordered index of the coarse cell of each fine unknown ``idx`` (fine row stride ``w + 2``)."""
    wp, wcp = w + 2, (w + 1) // 2 + 2
    out = np.empty(idx.size, np.int64)
    for t in range(idx.size):
        i, j = idx[t] // wp - 1, idx[t] % wp - 1
        out[t] = (i // 2 + 1) * wcp + j // 2 + 1
    return out


@numba.njit(cache=True)
def _workspace(C, H, W, min_side):
    """Arrays one worker reuses for all its images (fresh ones per image cost page faults).

    Returns the level shapes (finest first, as far as the shape allows coarsening), their
    diagonals, per-level coarse ``e``/``r`` arrays and the six level-0 vectors ``v x r z p q``."""
    shapes = [(H, W)]
    h, w = H, W
    while min(h, w) >= 2 * min_side:
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    diags = [_diag(hh, ww) for hh, ww in shapes]
    # level 0 uses the CG vectors r and z: no arrays of its own (placeholders keep the lists typed)
    es = [np.zeros((1, C), FLOAT)]
    rs = [np.zeros((1, C), FLOAT)]
    for lev in range(1, len(shapes)):
        hh, ww = shapes[lev]
        es.append(np.zeros(((hh + 2) * (ww + 2), C), FLOAT))
        rs.append(np.zeros(((hh + 2) * (ww + 2), C), FLOAT))
    vecs = np.zeros((6, (H + 2) * (W + 2), C), FLOAT)
    return shapes, diags, es, rs, vecs


@numba.njit(cache=True)
def _solve_image(values, removed2d, out, tol, max_iter, coarse_scale, coarsest_sweeps, need, sweeps,
                 shapes, diags, es, rs, vecs):
    """One image: ``values`` ``(C, H, W)`` (removed pixels ignored), ``removed2d`` ``(H, W)`` uint8;
    writes the solution into ``out`` ``(C, H, W)``; returns the CG iteration count (all channels at once).
    The remaining arguments are a :func:`_workspace` for this shape."""
    C, H, W = values.shape
    wp = W + 2
    npx = (H + 2) * wp
    rem = np.zeros(npx, np.uint8)
    for i in range(H):
        for j in range(W):
            rem[(i + 1) * wp + j + 1] = removed2d[i, j]
    idxs = [_unknowns(rem, H, W)]
    cur = rem
    for lev in range(1, len(shapes)):
        h, w = shapes[lev - 1]
        coarse, hc, wc = _coarsen(cur, h, w, need)
        ix = _unknowns(coarse, hc, wc)
        if ix.size == 0:
            break
        cur = coarse
        idxs.append(ix)
        es[lev][:] = 0.0  # the previous image's unknowns: a stencil reads them as neighbours
    nl = len(idxs)
    dinvs = [(1.0 / diags[lev][idxs[lev]]).astype(FLOAT) for lev in range(nl)]
    parents = [_parents(idxs[lev], shapes[lev][1]) for lev in range(nl - 1)]
    if len(parents) == 0:
        parents.append(np.zeros(0, np.int64))  # typed, never read: a single level has no coarse cells
    v, x, r, z, p, q = vecs[0], vecs[1], vecs[2], vecs[3], vecs[4], vecs[5]
    z[:] = 0.0  # z and p are read by stencils: zero off this image's unknowns
    p[:] = 0.0
    idx, dinv = idxs[0], dinvs[0]
    dg = diags[0][idx]  # float64: CG's operator and dot products stay in float64
    n = idx.size
    for c in range(C):
        for i in range(H):
            for j in range(W):
                v[(i + 1) * wp + j + 1, c] = 0.0 if removed2d[i, j] else values[c, i, j]
                out[c, i, j] = values[c, i, j]
    # The loops below are written out for the 3 channels with scalar accumulators: an accumulator in an
    # array would go through memory on every unknown (a store-to-load chain), as the first version did.
    w0, w1, w2 = 0.0, 0.0, 0.0  # the scaled residual max |r_i| / D_i per channel (the stopping rule)
    for t in range(n):
        k = idx[t]
        b0, b1, b2 = _nsum_c(v, k, 0, wp), _nsum_c(v, k, 1, wp), _nsum_c(v, k, 2, wp)
        r[k, 0], r[k, 1], r[k, 2] = b0, b1, b2  # b: the visible neighbours' weighted sum; x starts at 0
        x[k, 0], x[k, 1], x[k, 2] = 0.0, 0.0, 0.0
        w0, w1, w2 = max(w0, abs(b0) / dg[t]), max(w1, abs(b1) / dg[t]), max(w2, abs(b2) / dg[t])
    act0, act1, act2 = w0 > tol, w1 > tol, w2 > tol
    it = 0
    if act0 or act1 or act2:
        _vcycle(r, z, idxs, dinvs, parents, shapes[:nl], es[:nl], rs[:nl], coarse_scale, coarsest_sweeps, sweeps)
    rz0, rz1, rz2 = 0.0, 0.0, 0.0
    for k in idx:
        p[k, 0], p[k, 1], p[k, 2] = z[k, 0], z[k, 1], z[k, 2]
        rz0 += float(r[k, 0]) * z[k, 0]
        rz1 += float(r[k, 1]) * z[k, 1]
        rz2 += float(r[k, 2]) * z[k, 2]
    while it < max_iter and (act0 or act1 or act2):
        pq0, pq1, pq2 = 0.0, 0.0, 0.0
        for t in range(n):  # q = A p and <p, q>
            k = idx[t]
            d = dg[t]
            p0, p1, p2 = float(p[k, 0]), float(p[k, 1]), float(p[k, 2])
            q0 = p0 * d - _nsum_c(p, k, 0, wp)
            q1 = p1 * d - _nsum_c(p, k, 1, wp)
            q2 = p2 * d - _nsum_c(p, k, 2, wp)
            q[k, 0], q[k, 1], q[k, 2] = q0, q1, q2
            pq0 += p0 * q0
            pq1 += p1 * q1
            pq2 += p2 * q2
        # a converged channel stops moving; pq <= 0 only once its residual is at rounding level
        al0 = rz0 / pq0 if act0 and pq0 > 0.0 else 0.0
        al1 = rz1 / pq1 if act1 and pq1 > 0.0 else 0.0
        al2 = rz2 / pq2 if act2 and pq2 > 0.0 else 0.0
        w0, w1, w2 = 0.0, 0.0, 0.0
        for t in range(n):  # x += alpha p, r -= alpha q, and the stopping test on the new r
            k = idx[t]
            x[k, 0] += al0 * p[k, 0]
            x[k, 1] += al1 * p[k, 1]
            x[k, 2] += al2 * p[k, 2]
            r0 = r[k, 0] - al0 * q[k, 0]
            r1 = r[k, 1] - al1 * q[k, 1]
            r2 = r[k, 2] - al2 * q[k, 2]
            r[k, 0], r[k, 1], r[k, 2] = r0, r1, r2
            w0, w1, w2 = max(w0, abs(r0) * dinv[t]), max(w1, abs(r1) * dinv[t]), max(w2, abs(r2) * dinv[t])
        it += 1
        act0, act1, act2 = act0 and w0 > tol, act1 and w1 > tol, act2 and w2 > tol
        if not (act0 or act1 or act2) or it >= max_iter:
            break
        _vcycle(r, z, idxs, dinvs, parents, shapes[:nl], es[:nl], rs[:nl], coarse_scale, coarsest_sweeps, sweeps)
        o0, o1, o2 = rz0, rz1, rz2
        rz0, rz1, rz2 = 0.0, 0.0, 0.0
        for k in idx:
            rz0 += float(r[k, 0]) * z[k, 0]
            rz1 += float(r[k, 1]) * z[k, 1]
            rz2 += float(r[k, 2]) * z[k, 2]
        be0 = rz0 / o0 if o0 > 0.0 else 0.0
        be1 = rz1 / o1 if o1 > 0.0 else 0.0
        be2 = rz2 / o2 if o2 > 0.0 else 0.0
        for k in idx:
            p[k, 0] = z[k, 0] + be0 * p[k, 0]
            p[k, 1] = z[k, 1] + be1 * p[k, 1]
            p[k, 2] = z[k, 2] + be2 * p[k, 2]
    for k in idx:
        i, j = k // wp - 1, k % wp - 1
        for c in range(C):
            out[c, i, j] = x[k, c]
    return it


@numba.njit(cache=True, parallel=True)
def solve_batch(values, removed, out, tol, max_iter, min_side, coarse_scale, coarsest_sweeps, need, sweeps, workers):
    """The whole batch: ``values``/``out`` ``(B, 3, H, W)`` float32 or float64 (the loops are written out for
    3 channels; :func:`masktrain.noisy_linear._solve_compiled` pads other channel counts), ``removed`` ``(B, H, W)``
    uint8 (every image with at least one visible pixel). Returns the CG iteration count per image.

    ``workers`` (the thread count) workers, each with its own workspace, take every ``workers``-th image."""
    B, C, H, W = values.shape
    iters = np.zeros(B, np.int64)
    workers = max(1, min(B, workers))
    for wk in prange(workers):
        shapes, diags, es, rs, vecs = _workspace(C, H, W, min_side)
        for b in range(wk, B, workers):
            iters[b] = _solve_image(values[b], removed[b], out[b], tol, max_iter, coarse_scale, coarsest_sweeps,
                                    need, sweeps, shapes, diags, es, rs, vecs)
    return iters
