"""Statistics over (seed, image) outcomes: a two-level bootstrap interval and a stratified sign-flip test.

A study holds, per regime and seed, one outcome per test image for each headline number (e.g. 1/0
for a correct/wrong answer, or −1/0/+1 for a paired arm difference); the headline of one run is
their mean. Two sources of error spread the study's mean over seeds: which seeds were trained
(training randomness) and which test images were drawn (test-sampling error). Here:

- :func:`two_level_bootstrap` — resample seeds with replacement, then the images within each drawn
  seed with replacement (independently for every draw of a seed), and take the mean over the drawn
  seeds of their resampled means. Percentile 95% interval.
- :func:`sign_flip_test` — paired per-image differences ``d[s, i] = a[s, i] − b[s, i]`` (the same
  test image ``i`` of seed ``s`` under two regimes); under "the two regimes are exchangeable on
  every (seed, image) pair" each difference's sign is a fair coin, independently. The statistic is
  the mean over seeds of the per-seed mean difference, the null its distribution under random sign
  flips (stratified by seed: a seed's images are flipped among themselves, weights fixed). Two-sided
  p = (1 + #{|T*| ≥ |T|}) / (1 + P).

Inputs are lists over seeds of 1-D float arrays ``(n_s,)``; non-finite entries (an image a number
does not use) are dropped, and a pair is dropped when either side is non-finite.

Speed: outcomes take few distinct values (0/1 accuracies, −2…2 paired differences), and then a
resample's mean depends only on how many draws hit each value — a multinomial count — and a
sign-flipped sum only on how many of each |d| level flip — a fair-coin count, the set bits among
raw random bits. Both are drawn directly (exactly the same distributions as resampling / flipping
every image), so the cost hardly grows with the number of images; many-valued outcomes fall back
to index and sign matrices.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: Outcomes with at most this many distinct values are resampled in the count form (multinomial draws; each cell
#: costs one vectorised binomial, so beyond ~16 cells an index matrix is cheaper at n ≈ 500).
MAX_LEVELS = 16
#: Differences with at most this many distinct nonzero sizes are sign-flipped in the count form (fair-coin counts).
MAX_FLIP_LEVELS = 64
_CHUNK = 1_000_000  # elements per index/sign matrix chunk in the many-valued fallback


def finite(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each seed's finite outcomes ``(n_s,)`` (float64); seeds with none are dropped."""
    out = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    out = [v[np.isfinite(v)] for v in out]
    return [v for v in out if v.size]


def multinomial_counts(n: int, probs: np.ndarray, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``(*size, L)`` multinomial counts of ``n`` draws over ``L`` cells: one vectorised binomial per cell
    (the count of cell l given the draws left for cells l.. is Binomial(left, p_l / Σ_{j≥l} p_j)), which is far
    faster than ``Generator.multinomial`` for many draws."""
    probs = np.asarray(probs, dtype=np.float64)
    out = np.empty(size + (probs.size,), dtype=np.int64)
    remaining = np.full(size, n, dtype=np.int64)
    tail = probs[::-1].cumsum()[::-1]  # Σ_{j≥l} p_j
    for cell in range(probs.size - 1):
        p = min(1.0, probs[cell] / tail[cell]) if tail[cell] > 0 else 0.0
        out[..., cell] = rng.binomial(remaining, p)
        remaining = remaining - out[..., cell]
    out[..., -1] = remaining
    return out


def resample_means(x: np.ndarray, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Means of ``prod(size)`` ordinary bootstrap resamples of ``x`` ``(n,)`` (n draws with replacement), shape ``size``."""
    n = x.size
    levels, counts = np.unique(x, return_counts=True)
    if levels.size <= MAX_LEVELS:
        draws = multinomial_counts(n, counts / n, size, rng)  # (*size, L): how many of the n draws hit each value
        return draws @ levels / n
    total = int(np.prod(size))
    out = np.empty(total)
    step = max(1, _CHUNK // n)
    for start in range(0, total, step):
        stop = min(total, start + step)
        out[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out.reshape(size)


def two_level_bootstrap(per_seed: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean over seeds of the per-seed mean outcome, with a two-level (seeds, then images) percentile interval.

    per_seed: one outcome vector ``(n_s,)`` per seed. Returns ``{"value", "ci95", "n_seeds", "n_images", "n_boot"}``
    (value None when there are no outcomes). With one seed only the image level is resampled.
    """
    xs = finite(per_seed)
    if not xs:
        return {"value": None, "ci95": None, "n_seeds": 0, "n_images": 0, "n_boot": int(n_boot)}
    rng = np.random.default_rng(seed)
    s = len(xs)
    # Draw b fills its s slots with seeds pick[b] (with replacement); every slot resamples its seed's images afresh.
    pick = rng.integers(0, s, size=(n_boot, s))
    slots = np.empty((n_boot, s))
    for j, x in enumerate(xs):
        where = pick == j
        slots[where] = resample_means(x, (int(where.sum()),), rng)
    boot = slots.mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return {"value": float(np.mean([x.mean() for x in xs])), "ci95": [float(lo), float(hi)], "n_seeds": s,
            "n_images": int(sum(x.size for x in xs)), "n_boot": int(n_boot)}


def paired_differences(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-seed paired differences ``a − b`` over the images finite on both sides (same seed order, same images)."""
    out = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"paired outcomes need the same images: {x.shape} vs {y.shape}")
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.any():
            out.append(x[ok] - y[ok])
    return out


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array (same shape)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    return np.unpackbits(words.view(np.uint8).reshape(*words.shape, 8), axis=-1).sum(axis=-1)


def fair_coin_counts(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(size,)`` draws of Binomial(c, 1/2): the number of set bits among ``c`` raw random bits (64 per word)."""
    words = -(-c // 64)
    raw = rng.bit_generator.random_raw((size, words)).astype(np.uint64)
    if c % 64:
        raw[:, -1] &= np.uint64((1 << (c % 64)) - 1)
    return _popcount(raw).sum(axis=1, dtype=np.int64)


def sign_flip_null(diffs: Sequence[np.ndarray], n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """``(P,)`` draws of the statistic (mean over seeds of the per-seed mean difference) under random sign flips."""
    s = len(diffs)
    null = np.zeros(n_permutations)
    for d in diffs:
        n = d.size
        mags, counts = np.unique(np.abs(d[d != 0]), return_counts=True)
        if mags.size <= MAX_FLIP_LEVELS:
            # c differences of size v: their flipped sum is v·(2·#positive − c), #positive ~ Binomial(c, 1/2).
            for v, c in zip(mags, counts):
                null += v * (2.0 * fair_coin_counts(int(c), n_permutations, rng) - c) / (n * s)
            continue
        step = max(1, _CHUNK // n)
        for start in range(0, n_permutations, step):
            stop = min(n_permutations, start + step)
            signs = rng.integers(0, 2, size=(stop - start, n), dtype=np.int8).astype(np.float64) * 2 - 1
            null[start:stop] += signs @ d / (n * s)
    return null


def sign_flip_test(diffs: Sequence[np.ndarray], n_permutations: int = 10000, seed: int = 0) -> dict:
    """Two-sided stratified sign-flip test that the paired differences ``diffs`` (one ``(n_s,)`` per seed) centre on 0.

    Returns ``{"value", "p_value", "n_permutations", "n_seeds", "n_pairs", "discordant"}`` (``discordant``: pairs
    with a nonzero difference, the only ones that carry evidence)."""
    ds = [np.asarray(d, dtype=np.float64).ravel() for d in diffs]
    ds = [d[np.isfinite(d)] for d in ds]
    ds = [d for d in ds if d.size]
    if not ds:
        return {"value": None, "p_value": 1.0, "n_permutations": 0, "n_seeds": 0, "n_pairs": 0, "discordant": 0}
    observed = float(np.mean([d.mean() for d in ds]))
    null = sign_flip_null(ds, int(n_permutations), np.random.default_rng(seed))
    p = float((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + n_permutations))
    return {"value": observed, "p_value": p, "n_permutations": int(n_permutations), "n_seeds": len(ds),
            "n_pairs": int(sum(d.size for d in ds)), "discordant": int(sum((d != 0).sum() for d in ds))}
