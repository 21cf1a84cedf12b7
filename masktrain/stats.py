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


def miller_madow_correction(counts: np.ndarray) -> np.ndarray:
    """Miller–Madow bias correction (bits) of the plug-in MI from joint counts ``(..., K, K)``:
    each entropy gains (m − 1) / (2n ln 2) for its m occupied cells, so MI gains
    ((m_x − 1) + (m_y − 1) − (m_xy − 1)) / (2n ln 2)."""
    counts = np.asarray(counts)
    n = np.maximum(counts.sum(axis=(-2, -1)), 1)
    m_xy = (counts > 0).sum(axis=(-2, -1))
    m_x = (counts.sum(axis=-1) > 0).sum(axis=-1)
    m_y = (counts.sum(axis=-2) > 0).sum(axis=-1)
    return ((m_x - 1) + (m_y - 1) - (m_xy - 1)) / (2 * n * math.log(2))


def mutual_information_mm(counts: np.ndarray) -> np.ndarray:
    """Miller–Madow bias-corrected MI (bits) from joint counts ``(..., K, K)`` (can be slightly negative)."""
    return mutual_information_from_counts(counts) + miller_madow_correction(counts)


def mi_permutation_test(
    labels: np.ndarray,
    preds: np.ndarray,
    k: int,
    n_permutations: int = 10000,
    seed: int | np.random.Generator = 0,
    n_boot: int = 500,
) -> dict:
    """Mutual information between labels and predictions, tested against independence.

    Permuting the labels against the predictions reproduces the shuffled-silhouette
    control (silhouette class unrelated to the input) with the same marginals, so the
    null includes the plug-in estimator's positive bias. p-value = (1 + #{null >= observed}) / (1 + P),
    one-sided (MI is large under any dependence, toward or away). All ``P`` permutations are one
    batched contingency count (``(P, n)`` index matrix), ~0.5 s for P = 10⁴, n = 500.

    ``value`` is the plug-in MI (bits); ``miller_madow`` the bias-corrected estimate; ``ci95`` is the
    bootstrap percentile interval of the Miller–Madow estimate, shifted so the bootstrap
    distribution is centred on the estimate (resamples repeat rows, which adds bias of their own).
    Measured (K = 10, n = 300, 100 runs each): it covers 0 in 92% of independent runs (the plug-in's
    percentile interval: never) and the true MI in 93% of dependent ones.

    Returns ``{"value", "miller_madow", "p_value", "null_mean", "null_q95", "excess", "ci95", "n", "n_permutations"}``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    n = len(labels)
    observed = mutual_information(labels, preds, k)
    if n < 2:
        return {"value": observed, "miller_madow": 0.0, "p_value": 1.0, "null_mean": 0.0, "null_q95": 0.0, "excess": 0.0,
                "ci95": [0.0, 0.0], "n": n, "n_permutations": 0, "unit": "bits", "interval": "bias-shifted bootstrap, Miller–Madow"}
    rng = _rng(seed)
    perm = rng.permuted(np.broadcast_to(labels, (n_permutations, n)), axis=1)
    null = mutual_information_from_counts(contingency(perm, np.broadcast_to(preds, perm.shape), k))
    p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations))
    mm = float(mutual_information_mm(contingency(labels, preds, k)))
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = mutual_information_mm(contingency(labels[idx], preds[idx], k))
    # Resamples repeat rows, which adds plug-in bias that Miller–Madow does not remove: centre the
    # bootstrap distribution on the estimate (bias-shifted percentile interval).
    lo, hi = np.quantile(boot - (boot.mean() - mm), [0.025, 0.975])
    return {
        "value": observed,
        "miller_madow": mm,
        "p_value": p_value,
        "null_mean": float(null.mean()),
        "null_q95": float(np.quantile(null, 0.95)),
        "excess": observed - float(null.mean()),
        "ci95": [float(lo), float(hi)],
        "interval": "bias-shifted bootstrap, Miller–Madow",
        "n": n,
        "n_permutations": int(n_permutations),
        "unit": "bits",
    }


# --- tests and multiplicity ----------------------------------------------------------------

def binomial_greater(k: int, n: int, p0: float) -> float:
    """One-sided exact binomial p-value of ``k`` successes in ``n`` against success rate ``p0`` (H1: rate > p0)."""
    from scipy.stats import binomtest

    if n <= 0 or not np.isfinite(p0):
        return 1.0
    return float(binomtest(int(k), int(n), min(max(float(p0), 0.0), 1.0), alternative="greater").pvalue)


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired successes ``a``, ``b`` ``(n,)`` bool: a binomial test of
    the discordant pairs (a only vs. b only) against 1/2. Tests acc(a) − acc(b) ≠ 0 on the same rows."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def _p_array(p_values: Sequence[float]) -> np.ndarray:
    """p-values as float64; a missing or non-finite p counts as 1 (no evidence), so it never rejects."""
    return np.asarray([1.0 if v is None or not np.isfinite(v) else float(v) for v in p_values], dtype=np.float64)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error), in the input order."""
    p = _p_array(p_values)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return [float(v) for v in out]


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (q-values; false-discovery rate), in the input order."""
    p = _p_array(p_values)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return [float(v) for v in out]


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


# --- DeLong's test for AUC -----------------------------------------------------------------

def delong_components(scores: np.ndarray, positive: np.ndarray) -> tuple[float, np.ndarray]:
    """AUC of ``scores (n,)`` for ``positive (n,)`` bool (ties count ½) and each sample's DeLong
    structural component ``(n,)``: ``V10`` for a positive (the share of negatives it outranks),
    ``V01`` for a negative (the share of positives that outrank it).

    Sun & Xu's (2014) fast DeLong: from midranks, O(n log n) instead of the O(m·n) kernel.
    With ``Tz`` the midrank over all samples and ``Tx`` / ``Ty`` those within the positives /
    negatives, ``V10 = (Tz - Tx) / n_neg`` and ``V01 = 1 - (Tz - Ty) / n_pos``; the AUC is the mean
    of either. NaN AUC (and components) when a group is empty.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    m, n = int(positive.sum()), int((~positive).sum())
    out = np.full(scores.shape, np.nan)
    if m == 0 or n == 0:
        return float("nan"), out
    tz = rankdata(scores)
    out[positive] = (tz[positive] - rankdata(scores[positive])) / n
    out[~positive] = 1.0 - (tz[~positive] - rankdata(scores[~positive])) / m
    return float(out[positive].mean()), out


def _macro_influence(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AUCs ``(len(classes),)`` and each sample's first-order influence on their mean ``(n,)``:
    ``(V10 - AUC_c) / m_c`` as a positive of class c, ``(V01 - AUC_c) / n_c`` as a negative, averaged over classes."""
    n = len(labels)
    aucs = np.empty(len(classes))
    influence = np.zeros(n)
    for i, c in enumerate(classes):
        pos = labels == c
        auc, v = delong_components(scores[:, c], pos)
        aucs[i] = auc
        size = np.where(pos, pos.sum(), n - pos.sum())
        influence += (v - auc) / size
    return aucs, influence / max(len(classes), 1)


def delong_macro_auc_test(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, k: int,
                          z: float = Z95) -> dict:
    """DeLong's paired test of one-vs-rest macro AUC, condition a vs. condition b on the same images.

    ``scores_a``, ``scores_b``: ``(n, K)`` class scores of the same ``n`` images; ``labels (n,)``.
    Tested: the macro AUC difference ``D = mean_c AUC_a,c − mean_c AUC_b,c`` over the classes with
    both positives and negatives in ``labels`` (the classes :func:`macro_auc` averages). Its
    variance is DeLong's, with every covariance included -- between the two conditions (paired)
    and between the classes (each image is a positive of one class and a negative of the others):
    each image gets its structural component for every class and condition, ``D``'s first-order
    influence is their contrast, and the variance is the sum over the true classes ``g`` of
    ``n_g · var(influence within g)`` (sample variance, ``ddof=1``). For ``K = 2`` this is exactly
    pROC's ``roc.test(paired=TRUE, method="delong")`` (``S10/m + S01/n`` of the difference).

    Returns ``{"value": D, "se", "z", "p_value" (two-sided, normal), "ci95" (D ± z·se), "auc_a",
    "auc_b", "classes", "test"}``; ``se``/``p_value`` NaN when a true class has fewer than 2 images
    (its variance cannot be estimated) or no class qualifies. A zero variance with ``D = 0`` gives
    p = 1.
    """
    from scipy.stats import norm

    labels = np.asarray(labels, dtype=np.int64)
    scores_a, scores_b = np.asarray(scores_a, np.float64)[:, :k], np.asarray(scores_b, np.float64)[:, :k]
    counts = np.bincount(labels, minlength=k)[:k]
    classes = np.flatnonzero((counts > 0) & (counts < len(labels)))
    out = {"value": float("nan"), "se": float("nan"), "z": float("nan"), "p_value": float("nan"),
           "ci95": [float("nan"), float("nan")], "auc_a": float("nan"), "auc_b": float("nan"),
           "classes": int(len(classes)), "test": "DeLong (paired, one-vs-rest macro AUC, covariances across classes)",
           "interval": "DeLong normal"}
    if len(classes) == 0:
        return out
    auc_a, infl_a = _macro_influence(scores_a, labels, classes)
    auc_b, infl_b = _macro_influence(scores_b, labels, classes)
    d = float(auc_a.mean() - auc_b.mean())
    out.update(value=d, auc_a=float(auc_a.mean()), auc_b=float(auc_b.mean()))
    present = np.flatnonzero(counts > 0)
    if (counts[present] < 2).any():
        return out
    diff = infl_a - infl_b
    var = float(sum(counts[g] * diff[labels == g].var(ddof=1) for g in present))
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        p = 1.0 if d == 0.0 else 0.0
        zval = 0.0 if d == 0.0 else float(np.sign(d) * np.inf)
    else:
        zval = d / se
        p = float(2 * norm.sf(abs(zval)))
    out.update(se=se, z=float(zval), p_value=p, ci95=[d - z * se, d + z * se])
    return out
