"""The compiled (numba) neighbour padding behind :func:`masktrain.layer_masking.neighbour_padding.neighbour_pad`
under ``no_grad`` on CPU.

Imported lazily (:class:`masktrain.optional_kernels.OptionalKernels`); when it cannot be imported or
compiled, the torch path (shifted adds and ``addcmul_`` per chunk) runs instead, with one warning.

``pad_nchw`` does every round of ``a <- a + c_r * box3x3(a)`` for one ``(h, w)`` plane while the plane is
in cache, one pass over it per round: a ring of three rows of horizontal sums (taken from the values
before the round) feeds the vertical sum and the multiply-add of each row, in place. The sums are
added in the torch path's order (``(a[x] + a[x-1]) + a[x+1]`` along W, then the same along H, zero
padding at the border; then ``a + s * c``), and numba does not contract to FMA without ``fastmath``,
so the result equals the torch shifted-add path bit for bit (float32 and float64).
"""
from __future__ import annotations

import numba
import numpy as np
from numba.core.errors import NumbaError

__all__ = ["NumbaError", "pad_nchw"]


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _row_sums(row, out):  # pragma: no cover - compiled
    """``out[x] = (row[x] + row[x-1]) + row[x+1]`` with zeros beyond both ends."""
    w = row.shape[0]
    if w == 1:
        out[0] = row[0]
        return
    out[0] = row[0] + row[1]
    for x in range(1, w - 1):
        out[x] = (row[x] + row[x - 1]) + row[x + 1]
    out[w - 1] = row[w - 1] + row[w - 2]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _pad_plane(plane, mask, coeffs, b, rounds, dirty, ring):  # pragma: no cover - compiled
    h, w = plane.shape
    if dirty:
        for y in range(h):
            for x in range(w):
                plane[y, x] *= mask[b, y, x]
    for r in range(rounds):
        c = coeffs[r, b]
        _row_sums(plane[0], ring[0])
        for y in range(h):
            # ring[y % 3] holds row y's sums; fetch row y+1's before row y changes (it is still old)
            if y + 1 < h:
                _row_sums(plane[y + 1], ring[(y + 1) % 3])
            cur, row, cy = ring[y % 3], plane[y], c[y]
            if y > 0 and y + 1 < h:
                up, down = ring[(y - 1) % 3], ring[(y + 1) % 3]
                for x in range(w):
                    row[x] = row[x] + ((cur[x] + up[x]) + down[x]) * cy[x]
            elif y + 1 < h:  # top row
                down = ring[1]
                for x in range(w):
                    row[x] = row[x] + (cur[x] + down[x]) * cy[x]
            elif y > 0:  # bottom row
                up = ring[(y - 1) % 3]
                for x in range(w):
                    row[x] = row[x] + (cur[x] + up[x]) * cy[x]
            else:  # a single row
                for x in range(w):
                    row[x] = row[x] + cur[x] * cy[x]


@numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def pad_nchw(a, mask, coeffs, needed, dirty):  # pragma: no cover - compiled
    """Neighbour-pad ``a`` ``(B, C, h, w)`` (C-contiguous) in place, parallel over its ``(b, c)`` planes.

    ``mask`` ``(B, h, w)``; ``coeffs`` ``(R, B, h, w)``: round ``r``'s coefficients ``(1 - m_r) / (box(m_r) + eps)``;
    ``needed`` ``(B,)`` int64: rounds to run for image ``b`` (0: left as it is, not even cleaned);
    ``dirty``: multiply by ``mask`` first (in every image padded). Same dtype for ``a``, ``mask``, ``coeffs``.
    """
    batch, channels, h, w = a.shape
    for p in numba.prange(batch * channels):
        b = p // channels
        rounds = needed[b]
        if rounds == 0:
            continue
        ring = np.empty((3, w), dtype=a.dtype)
        _pad_plane(a[b, p % channels], mask, coeffs, b, rounds, dirty, ring)
