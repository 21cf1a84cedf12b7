"""Statistics behind every reported number: Wilson and bootstrap intervals, mutual
information with a permutation test, and the summary dict a probe entry is made of.

Arrays are 1-D numpy arrays over samples (``n``); class labels are ints in ``[0, K)``.
Resampling is vectorised (an index matrix ``(B, n)``), never a Python loop per draw.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (``(0, 1)`` when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    n_boot: int = 1000,
    seed: int | np.random.Generator = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval.

    ``statistic(idx)`` takes an index matrix ``(B, n)`` of resampled rows and returns
    ``(B,)`` values, so all draws are computed at once.
    """
    if n <= 0:
        return float("nan"), float("nan")
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    values = np.asarray(statistic(idx), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_mean_ci(x: np.ndarray, n_boot: int = 1000, seed: int | np.random.Generator = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of ``x`` ``(n,)``."""
    x = np.asarray(x, dtype=np.float64)
    return bootstrap_ci(lambda idx: x[idx].mean(axis=1), len(x), n_boot, seed)


def contingency(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """Joint counts ``(..., K, K)`` of (label, prediction); leading dims broadcast over rows."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    flat = labels * k + preds
    if flat.ndim == 1:
        return np.bincount(flat, minlength=k * k).reshape(k, k)
    rows = flat.shape[0]
    offset = (np.arange(rows) * k * k)[:, None]
    return np.bincount((flat + offset).ravel(), minlength=rows * k * k).reshape(rows, k, k)


def mutual_information_from_counts(counts: np.ndarray) -> np.ndarray:
    """Plug-in mutual information in bits from joint counts ``(..., K, K)`` -> ``(...)``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=(-2, -1), keepdims=True)
    p = counts / np.maximum(total, 1)
    pa = p.sum(axis=-1, keepdims=True)
    pb = p.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pa * pb)), 0.0)
    return terms.sum(axis=(-2, -1))


def mutual_information(labels: np.ndarray, preds: np.ndarray, k: int) -> float:
    """Plug-in mutual information (bits) between two label arrays ``(n,)`` over ``K`` classes."""
    if len(labels) == 0:
        return 0.0
    return float(mutual_information_from_counts(contingency(labels, preds, k)))


def mi_permutation_test(
    labels: np.ndarray,
    preds: np.ndarray,
    k: int,
    n_permutations: int = 1000,
    seed: int | np.random.Generator = 0,
    n_boot: int = 500,
) -> dict:
    """Mutual information between labels and predictions, tested against independence.

    Permuting the labels against the predictions reproduces the shuffled-silhouette
    control (silhouette class unrelated to the input) with the same marginals, so the
    null includes the plug-in estimator's positive bias. p-value = (1 + #{null >= observed}) / (1 + P).

    Returns ``{"value", "p_value", "null_mean", "null_q95", "excess", "ci95", "n", "n_permutations"}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    n = len(labels)
    observed = mutual_information(labels, preds, k)
    if n < 2:
        return {"value": observed, "p_value": 1.0, "null_mean": 0.0, "null_q95": 0.0, "excess": 0.0,
                "ci95": [0.0, 0.0], "n": n, "n_permutations": 0}
    rng = _rng(seed)
    perm = np.argsort(rng.random((n_permutations, n)), axis=1)
    null = mutual_information_from_counts(contingency(labels[perm], np.broadcast_to(preds, perm.shape), k))
    p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations))
    ci = bootstrap_ci(lambda idx: mutual_information_from_counts(contingency(labels[idx], preds[idx], k)), n, n_boot, rng)
    return {
        "value": observed,
        "p_value": p_value,
        "null_mean": float(null.mean()),
        "null_q95": float(np.quantile(null, 0.95)),
        "excess": observed - float(null.mean()),
        "ci95": [ci[0], ci[1]],
        "n": n,
        "n_permutations": int(n_permutations),
        "unit": "bits",
    }


def entropy_bits(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (bits) of probability vectors along ``axis``."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(probs > 0, probs * np.log2(probs), 0.0).sum(axis=axis)


def _class_name(names: Sequence[str] | None, c: int) -> str:
    return names[c] if names is not None and c < len(names) else str(c)


def proportion(
    success: np.ndarray,
    labels: np.ndarray,
    k: int,
    chance: float | None = None,
    class_names: Sequence[str] | None = None,
    subset: str = "all",
) -> dict:
    """Summary of a proportion (e.g. accuracy): value, n, chance, Wilson 95% interval, per-class values.

    success: ``(n,)`` bool; labels: ``(n,)`` class per sample (for ``per_class``).
    """
    success = np.asarray(success, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    n, hits = int(success.size), int(success.sum())
    per_class = {}
    for c in range(k):
        sel = labels == c
        nc, kc = int(sel.sum()), int(success[sel].sum())
        lo, hi = wilson(kc, nc)
        per_class[_class_name(class_names, c)] = {"value": kc / nc if nc else None, "n": nc, "ci95": [lo, hi]}
    lo, hi = wilson(hits, n)
    return {
        "value": hits / n if n else None,
        "n": n,
        "k": hits,
        "chance": 1.0 / k if chance is None else chance,
        "ci95": [lo, hi],
        "per_class": per_class,
        "subset": subset,
        "interval": "wilson",
    }


def mean_value(
    values: np.ndarray,
    labels: np.ndarray,
    k: int,
    chance: float | None,
    class_names: Sequence[str] | None = None,
    subset: str = "all",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Summary of a per-sample mean (e.g. a paired accuracy difference): bootstrap 95% interval, per class."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    per_class = {}
    for c in range(k):
        v = values[labels == c]
        ci = bootstrap_mean_ci(v, n_boot, seed + c + 1) if v.size else (float("nan"), float("nan"))
        per_class[_class_name(class_names, c)] = {"value": float(v.mean()) if v.size else None, "n": int(v.size), "ci95": [ci[0], ci[1]]}
    ci = bootstrap_mean_ci(values, n_boot, seed)
    return {
        "value": float(values.mean()) if values.size else None,
        "n": int(values.size),
        "chance": chance,
        "ci95": [ci[0], ci[1]],
        "per_class": per_class,
        "subset": subset,
        "interval": "bootstrap",
    }


def independence_chance(labels: np.ndarray, preds: np.ndarray, k: int) -> float:
    """Expected accuracy if predictions were independent of labels with the observed marginals: Σ p(y) p(ŷ)."""
    n = len(labels)
    if n == 0:
        return float("nan")
    py = np.bincount(labels, minlength=k) / n
    pp = np.bincount(preds, minlength=k) / n
    return float((py * pp).sum())
