"""The compiled (numba) CPU solver behind :func:`masktrain.noisy_linear.noisy_linear`.

Imported lazily by :mod:`masktrain.noisy_linear`, which falls back to the batched torch solver
when this module cannot be imported or compiled. It solves the same system to the same stopping
rule (scaled residual ``max_i |r_i| / D_i <= tol``), with the same method family — conjugate
gradients preconditioned by a geometric multigrid V-cycle — written so that every stencil is one
SIMD loop:

- planar, zero-bordered layout: a level is ``(C, (h + 2) * (w + 2))`` float32, one contiguous
  flat array per channel, so a stencil is 9 loads at fixed offsets with no bounds checks; every
  loop runs over whole row spans (from the first to the last unknown of each row) and a mask
  (1 at unknowns, 0 elsewhere) keeps the other pixels at zero, so the loops have no branches;
- flat indices are unsigned (``uint64``): with signed ones numba adds a negative-index
  wrap-around test to every load, which kept LLVM from vectorising (a Jacobi sweep took
  10 ns per pixel and channel; unsigned: ~0.5 ns, AVX2 on AMD EPYC);
- the smoother is Jacobi (weight ``OMEGA`` = 1; symmetric, so with as many sweeps after the
  coarse correction as before it the V-cycle is symmetric and CG applies). Unlike Gauss-Seidel
  (the previous version of this module, a serial sweep over an index list of the unknowns at
  ~12 ns per unknown for 3 channels) every pixel of a sweep is independent, so it vectorises.
  For this stencil Jacobi smooths well: on the high frequencies the eigenvalues of
  ``D^-1 A`` lie in [2/3, 4/3], so one sweep with weight 1 damps them by at least 1/3;
- each image gets its hierarchy once and solves its channels with it (the operator is the same
  for all channels); images run in parallel (``prange``), each worker reusing one workspace.

CG itself keeps float64 arithmetic in its operator, dot products and stopping test (float32
storage of the iterates: rounding ~1e-7 on values in [0, 1], far below ``tol``); the V-cycle
(the preconditioner, which does not limit the final accuracy) runs in float32.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from numba.core.errors import NumbaError

__all__ = ["NumbaError", "clamp_removed", "solve_batch"]

DIRECT, DIAGONAL = 1.0 / 6.0, 1.0 / 12.0
# Multigrid settings, chosen by time at 224² (benchmarks/attribution.py masks, tol 2e-6, 1 thread):
# two Jacobi sweeps each way, an unscaled piecewise-constant coarse correction and 10 sweeps on the
# coarsest grid took 7-10 CG iterations on patches, blobs and rectangles (one sweep: 10-15 iterations
# and no faster; three: 6-8, no faster; coarse scale 1.2: 9-11; Jacobi weight 0.8-0.9: no better;
# bilinear transfer instead of piecewise-constant: one iteration fewer at a higher cost per cycle).
# A coarse cell is an unknown only when all its children are (``COARSE_NEED`` = 4; 1-3: more iterations).
SWEEPS, COARSE_SCALE, COARSE_NEED, COARSEST_SWEEPS, OMEGA = 2, 1.0, 4, 10, 1.0
FLOAT = np.float32
F_DIRECT, F_DIAGONAL = FLOAT(DIRECT), FLOAT(DIAGONAL)
U, ONE = numba.uint64, numba.uint64(1)
# fastmath lets LLVM vectorise the loops and their reductions (the inputs are finite)
JIT = dict(cache=True, fastmath=True, error_model="numpy")


@numba.njit(**JIT)
def _diag(h, w):
    """Sum of in-image neighbour weights of every pixel, flat zero-bordered ``(h + 2) * (w + 2)`` float32."""
    wp = w + 2
    ones = np.zeros((h + 2) * wp)
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            ones[i * wp + j] = 1.0
    d = np.zeros((h + 2) * wp, FLOAT)
    for i in range(1, h + 1):
        for j in range(1, w + 1):
            k = i * wp + j
            d[k] = ((ones[k - 1] + ones[k + 1] + ones[k - wp] + ones[k + wp]) * DIRECT
                    + (ones[k - wp - 1] + ones[k - wp + 1] + ones[k + wp - 1] + ones[k + wp + 1]) * DIAGONAL)
    return d


@numba.njit(**JIT)
def _spans(m, h, w):
    """The loop ranges of a level with mask ``m`` (flat bordered): per flat row ``i``, the first and
    last flat column of an unknown (``lo[i] > hi[i]``: none), and the first and last row with one."""
    wp = w + 2
    lo = np.ones(h + 2, np.int64)
    hi = np.zeros(h + 2, np.int64)
    r0, r1 = h + 1, 0
    for i in range(1, h + 1):
        a, b = w + 1, 0
        for j in range(1, w + 1):
            if m[i * wp + j] != 0:
                a = min(a, j)
                b = j
        lo[i], hi[i] = a, b
        if b >= a:
            r0 = min(r0, i)
            r1 = i
    return lo, hi, r0, r1


@numba.njit(**JIT)
def _coarsen(out, m, h, w, need):
    """Writes into ``out`` the coarse mask of fine mask ``m``: a cell of 2x2 children is an unknown when at
    least ``need`` of its in-image children are (``need`` >= 4: all of them). Returns its count of unknowns."""
    hc, wc = (h + 1) // 2, (w + 1) // 2
    wp, wcp = w + 2, wc + 2
    count = 0
    for ic in range(hc):
        for jc in range(wc):
            nin, nrem = 0, 0
            for di in range(2):
                for dj in range(2):
                    i, j = 2 * ic + di, 2 * jc + dj
                    if i < h and j < w:
                        nin += 1
                        nrem += m[(i + 1) * wp + j + 1] != 0
            unknown = nrem >= min(need, nin)
            out[(ic + 1) * wcp + jc + 1] = FLOAT(unknown)
            count += unknown
    return count


@numba.njit(**JIT)
def _first_sweep(dst, r, wdinv, lo, hi, r0, r1, wp, C):
    """A Jacobi sweep from zero: ``dst = omega D^-1 r`` (``wdinv`` = omega / D at unknowns, 0 elsewhere)."""
    for c in range(C):
        d, rr = dst[c], r[c]
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                d[k] = wdinv[k] * rr[k]


@numba.njit(**JIT)
def _sweep(dst, src, r, wdinv, om1, lo, hi, r0, r1, wp, C):
    """A Jacobi sweep ``dst = (1 - omega) src + omega D^-1 (r + N src)`` over the row spans (``src`` is
    zero off the unknowns and ``wdinv`` is zero there, so ``dst`` stays zero off them too)."""
    uwp = U(wp)
    for c in range(C):
        s, d, rr = src[c], dst[c], r[c]
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                nb = ((s[k - ONE] + s[k + ONE] + s[k - uwp] + s[k + uwp]) * F_DIRECT
                      + (s[k - uwp - ONE] + s[k - uwp + ONE] + s[k + uwp - ONE] + s[k + uwp + ONE]) * F_DIAGONAL)
                d[k] = om1 * s[k] + wdinv[k] * (rr[k] + nb)


@numba.njit(**JIT)
def _sweep_dot(dst, src, r, wdinv, om1, lo, hi, r0, r1, wp, C, rz):
    """:func:`_sweep`, and ``rz[c] = <r, dst>`` per channel (float64): CG's ``<r, z>`` when this is the
    V-cycle's last sweep, without another pass over ``r`` and ``z``."""
    uwp = U(wp)
    for c in range(C):
        s, d, rr = src[c], dst[c], r[c]
        tot = 0.0
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                nb = ((s[k - ONE] + s[k + ONE] + s[k - uwp] + s[k + uwp]) * F_DIRECT
                      + (s[k - uwp - ONE] + s[k - uwp + ONE] + s[k + uwp - ONE] + s[k + uwp + ONE]) * F_DIAGONAL)
                dk = om1 * s[k] + wdinv[k] * (rr[k] + nb)
                d[k] = dk
                tot += float(rr[k]) * dk
        rz[c] = tot


@numba.njit(**JIT)
def _smooth(e, t, r, wdinv, om1, lo, hi, r0, r1, wp, C, n, from_zero, rz):
    """``n`` Jacobi sweeps on ``e`` (the first from zero when ``from_zero``), ping-ponging with ``t``; with
    ``rz`` of length ``C`` the last sweep also forms ``rz[c] = <r, e>`` (:func:`_sweep_dot`; ``n`` >= 1,
    not from zero). Returns ``(result, other)``: the buffer holding the result and the spare one."""
    a, b = e, t
    start = 0
    if from_zero:
        _first_sweep(a, r, wdinv, lo, hi, r0, r1, wp, C)
        start = 1
    last = n - 1 if len(rz) > 0 else n
    for _ in range(start, last):
        _sweep(b, a, r, wdinv, om1, lo, hi, r0, r1, wp, C)
        a, b = b, a
    if last < n:
        _sweep_dot(b, a, r, wdinv, om1, lo, hi, r0, r1, wp, C, rz)
        a, b = b, a
    return a, b


@numba.njit(**JIT)
def _restrict(rc, res, e, r, dg, mc, lo, hi, r0, r1, wp, hc, wc, C):
    """``res = r - A e`` on the fine level, then ``rc`` = the sum of the 4 children's residuals at the
    coarse unknowns (``P^T`` of piecewise-constant prolongation), zero at the other coarse cells.
    ``res`` is garbage (finite) at the fine level's non-unknowns: the children of a coarse unknown are
    all fine unknowns, and the other coarse cells multiply it by ``mc`` = 0 (no mask load needed here).
    A child outside the image is a border element of ``res``: never written, so zero."""
    wcp = wc + 2
    uwp = U(wp)
    for c in range(C):
        s, rr, q, o = e[c], r[c], res[c], rc[c]
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                nb = ((s[k - ONE] + s[k + ONE] + s[k - uwp] + s[k + uwp]) * F_DIRECT
                      + (s[k - uwp - ONE] + s[k - uwp + ONE] + s[k + uwp - ONE] + s[k + uwp + ONE]) * F_DIAGONAL)
                q[k] = rr[k] - dg[k] * s[k] + nb
        # res off this image's row spans is stale (an earlier image's), but only children of coarse
        # unknowns are used here, and those are fine unknowns, inside the spans
        for ic in range(1, hc + 1):
            fb = U((2 * ic - 1) * wp - 1)
            cb = U(ic * wcp)
            for jc in range(U(1), U(wc + 1)):
                f = fb + U(2) * jc
                o[cb + jc] = mc[cb + jc] * (q[f] + q[f + ONE] + q[f + uwp] + q[f + uwp + ONE])


@numba.njit(**JIT)
def _prolong(e, ec, m, cs, lo, hi, r0, r1, wp, wcp, C):
    """``e += cs * m * P ec``: piecewise-constant prolongation (each fine unknown gets its coarse cell's value).

    The loop runs over the coarse cells of a row, each updating its two fine columns: with the fine
    column's coarse index ``(j + 1) >> 1`` in the loop LLVM gathered (scalar), this way it vectorises.
    It can touch one fine column past the span (or the border column ``w + 1``): ``m`` is 0 there, so
    ``e`` keeps its value (zero on the border)."""
    for c in range(C):
        d, s = e[c], ec[c]
        for i in range(r0, r1 + 1):
            base = U(i * wp) - ONE
            cbase = U(((i - 1) // 2 + 1) * wcp)
            for jc in range(U((lo[i] + 1) >> 1), U(((hi[i] + 1) >> 1) + 1)):
                k = base + U(2) * jc
                val = cs * s[cbase + jc]
                d[k] += m[k] * val
                d[k + ONE] += m[k + ONE] * val


@numba.njit(**JIT)
def _vcycle(r, es, ts, rhs, ress, ms, dgs, wdinvs, los, his, rows, shapes, om1, cs, sweeps, coarsest_sweeps, C,
            started, rz):
    """One symmetric V-cycle from zero for ``A e = r`` (``r`` ``(C, pixels)`` on level 0; coarser levels'
    right-hand sides go to ``rhs[l]``). Level ``l`` smooths in ``es[l]``/``ts[l]`` and forms its residual
    in ``ress[l]``. Returns the level-0 buffer holding ``e`` (``es[0]`` or ``ts[0]``) and writes
    ``rz[c] = <r, e>`` (float64). ``started``: ``es[0]`` already holds the first sweep from zero,
    ``omega D^-1 r`` (fused into the pass that formed ``r``)."""
    nl = len(ms)
    in_t = np.zeros(nl, np.bool_)  # the level's e ended up in ts[l] (Jacobi ping-pongs between two buffers)
    none = np.zeros(0)
    for lev in range(nl):
        wp = shapes[lev][1] + 2
        r0, r1 = rows[lev]
        rr = r if lev == 0 else rhs[lev]
        n = coarsest_sweeps if lev == nl - 1 else sweeps
        if lev == 0 and started:
            a, _ = _smooth(es[0], ts[0], rr, wdinvs[0], om1, los[0], his[0], r0, r1, wp, C, n - 1, False, none)
            in_t[lev] = n % 2 == 0
        else:
            a, _ = _smooth(es[lev], ts[lev], rr, wdinvs[lev], om1, los[lev], his[lev], r0, r1, wp, C, n, True, none)
            in_t[lev] = n % 2 == 0
        if lev == nl - 1:
            break
        hc, wc = shapes[lev + 1]
        _restrict(rhs[lev + 1], ress[lev], a, rr, dgs[lev], ms[lev + 1], los[lev], his[lev], r0, r1, wp, hc, wc, C)
    for lev in range(nl - 2, -1, -1):
        wp = shapes[lev][1] + 2
        r0, r1 = rows[lev]
        rr = r if lev == 0 else rhs[lev]
        a = ts[lev] if in_t[lev] else es[lev]
        b = es[lev] if in_t[lev] else ts[lev]
        ec = ts[lev + 1] if in_t[lev + 1] else es[lev + 1]
        _prolong(a, ec, ms[lev], cs, los[lev], his[lev], r0, r1, wp, shapes[lev + 1][1] + 2, C)
        _smooth(a, b, rr, wdinvs[lev], om1, los[lev], his[lev], r0, r1, wp, C, sweeps, False,
                rz if lev == 0 and sweeps > 0 else none)
        in_t[lev] = in_t[lev] != (sweeps % 2 == 1)
    e = ts[0] if in_t[0] else es[0]
    if nl == 1 or sweeps == 0:  # no level-0 post-sweep formed <r, e>
        wp = shapes[0][1] + 2
        r0, r1 = rows[0]
        lo, hi = los[0], his[0]
        for c in range(C):
            ec, rc = e[c], r[c]
            tot = 0.0
            for i in range(r0, r1 + 1):
                base = i * wp
                for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                    tot += float(rc[k]) * ec[k]
            rz[c] = tot
    return e


@numba.njit(**JIT)
def _workspace(C, H, W, min_side):
    """Arrays one worker reuses for all its images (fresh ones per image cost page faults).

    Returns the level shapes (finest first, as far as the shape allows coarsening), their diagonals,
    per-level ``(C, pixels)`` buffers ``es ts rhs ress`` (two for Jacobi, the right-hand side, the
    residual), per-level CG vectors ``x r p q v`` ``(5, C, pixels)`` (``v``: the visible values, zero
    at the unknowns) and per-level ``(pixels,)`` masks and ``omega / D`` (zero off the unknowns)."""
    shapes = [(H, W)]
    h, w = H, W
    while min(h, w) >= 2 * min_side:
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    dgs = [_diag(hh, ww) for hh, ww in shapes]
    es = [np.zeros((C, (hh + 2) * (ww + 2)), FLOAT) for hh, ww in shapes]
    ts = [np.zeros((C, (hh + 2) * (ww + 2)), FLOAT) for hh, ww in shapes]
    rhs = [np.zeros((C, (hh + 2) * (ww + 2)), FLOAT) for hh, ww in shapes]
    ress = [np.zeros((C, (hh + 2) * (ww + 2)), FLOAT) for hh, ww in shapes]
    vecs = [np.zeros((5, C, (hh + 2) * (ww + 2)), FLOAT) for hh, ww in shapes]
    ms = [np.zeros((hh + 2) * (ww + 2), FLOAT) for hh, ww in shapes]
    wdinvs = [np.zeros((hh + 2) * (ww + 2), FLOAT) for hh, ww in shapes]
    return shapes, dgs, es, ts, rhs, ress, vecs, ms, wdinvs


@numba.njit(**JIT)
def _rhs(r, x, e, v, m, wdinv, dinv, lo, hi, r0, r1, wp, C, tol, active):
    """The start of CG from ``x = 0``: ``r = b = m N v`` over the row spans (``v`` the visible values, zero at
    the unknowns), ``e = omega D^-1 r`` (the V-cycle's first sweep); ``active[c]``: the channel's scaled
    residual ``max_i |r_i| / D_i`` exceeds ``tol`` (counted as in :func:`_update`)."""
    uwp = U(wp)
    for c in range(C):
        vc, xc, rc, ec = v[c], x[c], r[c], e[c]
        over = 0
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                b = m[k] * ((vc[k - ONE] + vc[k + ONE] + vc[k - uwp] + vc[k + uwp]) * DIRECT
                            + (vc[k - uwp - ONE] + vc[k - uwp + ONE] + vc[k + uwp - ONE] + vc[k + uwp + ONE]) * DIAGONAL)
                rc[k] = b
                ec[k] = wdinv[k] * b
                xc[k] = 0.0
                over += abs(b) * dinv[k] > tol
        active[c] = over > 0


@numba.njit(**JIT)
def _apply(q, p, m, dg, lo, hi, r0, r1, wp, active, pq):
    """``q = A p = m (D p - N p)`` (float64 arithmetic, float32 storage) and ``pq[c] = <p, q>`` for the
    active channels; ``p`` is zero off the unknowns."""
    uwp = U(wp)
    for c in range(p.shape[0]):
        if not active[c]:
            continue
        pc, qc = p[c], q[c]
        s = 0.0
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                pk = float(pc[k])
                qk = m[k] * (pk * dg[k] - (
                    (float(pc[k - ONE]) + pc[k + ONE] + pc[k - uwp] + pc[k + uwp]) * DIRECT
                    + (float(pc[k - uwp - ONE]) + pc[k - uwp + ONE] + pc[k + uwp - ONE] + pc[k + uwp + ONE]) * DIAGONAL))
                qc[k] = qk
                s += pk * qk
        pq[c] = s


@numba.njit(**JIT)
def _update(x, r, p, q, e, wdinv, dinv, alpha, lo, hi, r0, r1, wp, tol, active):
    """For the active channels: ``x += alpha p``, ``r -= alpha q``, ``e = omega D^-1 r`` (the next V-cycle's
    first sweep), and the stopping rule on the new ``r``: the channel stays active while its scaled
    residual ``max_i |r_i| / D_i`` exceeds ``tol``.

    The rule is evaluated as a count of the pixels over ``tol`` (> 0 exactly when the max is): numba's
    ``max`` does not vectorise as a reduction, and with it this pass took 200 us per 224² image
    (3 channels) instead of 51 us (AMD EPYC, AVX-512)."""
    for c in range(p.shape[0]):
        if not active[c]:
            continue
        a = alpha[c]
        xc, rc, pc, qc, ec = x[c], r[c], p[c], q[c], e[c]
        over = 0
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                xc[k] += a * pc[k]
                rk = rc[k] - a * qc[k]
                rc[k] = rk
                ec[k] = wdinv[k] * rk
                over += abs(rk) * dinv[k] > tol
        active[c] = over > 0


@numba.njit(**JIT)
def _pcg(vec, m, dg, dinv, lo, hi, r0, r1, wp, active, tol, max_iter,
         es, ts, rhs, ress, ms, dgs, wdinvs, los, his, rows, shapes, om1, cs, sweeps, coarsest_sweeps):
    """Conjugate gradients preconditioned by the V-cycle on the finest level: ``vec`` = ``x r p q v``
    ``(5, C, pixels)`` with ``x`` = 0, ``r = b`` and ``es[0]`` = ``omega D^-1 b`` (:func:`_rhs`), ``p`` zero;
    ``active[c]``: channel ``c`` is not yet within ``tol``. Returns the iteration count (all channels).

    The V-cycle's first sweep from zero, ``omega D^-1 r``, is formed in the pass that updates ``r`` and
    ``<r, z>`` in its last sweep, so neither needs a pass of its own."""
    C = vec.shape[1]
    x, r, p, q = vec[0], vec[1], vec[2], vec[3]
    rz, rz_new, alpha, pq = np.zeros(C), np.zeros(C), np.zeros(C), np.zeros(C)
    it = 0
    if not active.any():
        return it
    e0 = es[0]
    wd0 = wdinvs[0]
    started = (sweeps if len(ms) > 1 else coarsest_sweeps) >= 1
    z = _vcycle(r, es, ts, rhs, ress, ms, dgs, wdinvs, los, his, rows, shapes, om1, cs, sweeps, coarsest_sweeps, C,
                started, rz)
    for c in range(C):
        zc, pc = z[c], p[c]
        for i in range(r0, r1 + 1):
            base = i * wp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                pc[k] = zc[k]
    while it < max_iter and active.any():
        _apply(q, p, m, dg, lo, hi, r0, r1, wp, active, pq)
        for c in range(C):
            # <p, A p> <= 0 only once the residual is at rounding level: stop moving
            alpha[c] = rz[c] / pq[c] if pq[c] > 0.0 else 0.0
        _update(x, r, p, q, e0, wd0, dinv, alpha, lo, hi, r0, r1, wp, tol, active)
        it += 1
        if not active.any() or it >= max_iter:
            break
        z = _vcycle(r, es, ts, rhs, ress, ms, dgs, wdinvs, los, his, rows, shapes, om1, cs, sweeps,
                    coarsest_sweeps, C, started, rz_new)
        for c in range(C):  # beta = <r, z> / <r, z>_old, p = z + beta p
            if not active[c]:
                continue
            zc, pc = z[c], p[c]
            beta = rz_new[c] / rz[c] if rz[c] > 0.0 else 0.0
            rz[c] = rz_new[c]
            for i in range(r0, r1 + 1):
                base = i * wp
                for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                    pc[k] = zc[k] + beta * pc[k]
    return it


@numba.njit(**JIT)
def _solve_image(values, removed2d, out, tol, max_iter, omega, cs, coarsest_sweeps, need, sweeps,
                 shapes, dgs, es, ts, rhs, ress, vecs, ms, wdinvs):
    """One image: ``values`` ``(C, H, W)`` (removed pixels ignored), ``removed2d`` ``(H, W)`` uint8; writes
    the solution into ``out`` ``(C, H, W)``; returns the CG iteration count (all channels at once).
    The remaining arguments are a :func:`_workspace` for this shape."""
    C, H, W = values.shape
    wp = W + 2
    uwp = U(wp)
    m0 = ms[0]
    rflat = removed2d.ravel()
    for i in range(U(H)):
        fb, ib = (i + ONE) * uwp + ONE, i * U(W)
        for j in range(U(W)):
            m0[fb + j] = FLOAT(rflat[ib + j] != 0)
    nl = 1
    for lev in range(1, len(shapes)):
        h, w = shapes[lev - 1]
        if _coarsen(ms[lev], ms[lev - 1], h, w, need) == 0:
            break
        nl += 1
    ms = ms[:nl]
    los = []
    his = []
    rows = []
    om = FLOAT(omega)
    for lev in range(nl):
        h, w = shapes[lev]
        lo, hi, r0, r1 = _spans(ms[lev], h, w)
        los.append(lo)
        his.append(hi)
        rows.append((r0, r1))
        m, dg, wd = ms[lev], dgs[lev], wdinvs[lev]
        lwp = w + 2
        for i in range(r0, r1 + 1):  # wd is only read inside the row spans
            base = i * lwp
            for k in range(U(base + lo[i]), U(base + hi[i] + 1)):
                wd[k] = om * m[k] / dg[k]
        es[lev][:] = 0.0  # an earlier image's values: a stencil reads them as neighbours
        ts[lev][:] = 0.0
    om1 = FLOAT(1.0 - omega)
    vec = vecs[0]
    x, r, p, v = vec[0], vec[1], vec[2], vec[4]
    p[:] = 0.0  # read as neighbours by the operator: zero off this image's unknowns
    for c in range(C):
        vc, src, dst = v[c], values[c].ravel(), out[c].ravel()
        for i in range(U(H)):
            fb, ib = (i + ONE) * uwp + ONE, i * U(W)
            for j in range(U(W)):
                val = src[ib + j]
                vc[fb + j] = FLOAT(0.0) if m0[fb + j] != 0 else val  # removed pixels are never read
                dst[ib + j] = val
    lo, hi = los[0], his[0]
    r0, r1 = rows[0]
    dinv = wdinvs[0]  # the stopping rule's 1 / D at the unknowns (0 elsewhere), = omega / D when omega = 1
    if omega != 1.0:
        dinv = m0 / dgs[0]
    active = np.zeros(C, np.bool_)
    _rhs(r, x, es[0], v, m0, wdinvs[0], dinv, lo, hi, r0, r1, wp, C, tol, active)
    it = _pcg(vec, m0, dgs[0], dinv, lo, hi, r0, r1, wp, active, tol, max_iter, es, ts, rhs, ress, ms, dgs,
              wdinvs, los, his, rows, shapes, om1, cs, sweeps, coarsest_sweeps)
    for c in range(C):
        xc, dst = x[c], out[c].ravel()
        for i in range(U(max(r0 - 1, 0)), U(max(r1, 0))):
            fb, ib = (i + ONE) * uwp, i * U(W)
            for j in range(U(lo[i + ONE]), U(hi[i + ONE] + 1)):
                if m0[fb + j] != 0:
                    dst[ib + j - ONE] = xc[fb + j]
    return it


@numba.njit(cache=True, parallel=True)
def solve_batch(values, removed, out, tol, max_iter, min_side, coarse_scale, coarsest_sweeps, need, sweeps, workers,
                omega):
    """The whole batch: ``values``/``out`` ``(B, C, H, W)`` float32 or float64, ``removed`` ``(B, H, W)`` uint8
    (every image with at least one visible pixel). Returns the CG iteration count per image.

    ``workers`` (the thread count) workers, each with its own workspace, take every ``workers``-th image."""
    B, C, H, W = values.shape
    iters = np.zeros(B, np.int64)
    workers = max(1, min(B, workers))
    for wk in prange(workers):
        shapes, dgs, es, ts, rhs, ress, vecs, ms, wdinvs = _workspace(C, H, W, min_side)
        for b in range(wk, B, workers):
            iters[b] = _solve_image(values[b], removed[b], out[b], tol, max_iter, omega, FLOAT(coarse_scale),
                                    coarsest_sweeps, need, sweeps, shapes, dgs, es, ts, rhs, ress, vecs, ms, wdinvs)
    return iters


@numba.njit(cache=True, parallel=True)
def clamp_removed(out, removed):
    """Clips ``out`` ``(B, C, H, W)`` to [0, 1] in place where ``removed`` ``(B, H, W)`` (uint8) is nonzero;
    the other pixels keep their values exactly (a select, not arithmetic)."""
    B, C, H, W = out.shape
    for b in prange(B):
        for c in range(C):
            for i in range(H):
                o, rm = out[b, c, i], removed[b, i]
                for j in range(W):
                    v = o[j]
                    lo = v if v > 0.0 else 0.0
                    o[j] = (lo if lo < 1.0 else 1.0) if rm[j] != 0 else v
