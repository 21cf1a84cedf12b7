"""DeLong's paired AUC test (masktrain.stats.delong_macro_auc_test) against implementations written from the definition."""
import numpy as np
import pytest
from scipy.stats import norm

from masktrain import stats


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann-Whitney kernel psi(x_i, y_j) = 1 if x_i > y_j, 1/2 if equal, 0 else: (m, n)."""
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def proc_paired_delong(score_a, score_b, positive):
    """pROC's roc.test(paired=TRUE, method="delong") for one binary AUC, from DeLong et al. (1988) directly:
    O(m n) kernels, V10 / V01 per sample, S10 and S01 as 2x2 covariance matrices."""
    pos = positive.astype(bool)
    v10, v01, auc = [], [], []
    for s in (score_a, score_b):
        psi = _kernel(s[pos], s[~pos])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        auc.append(psi.mean())
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))
    m, n = pos.sum(), (~pos).sum()
    contrast = np.array([1.0, -1.0])
    var = contrast @ (s10 / m + s01 / n) @ contrast
    d = auc[0] - auc[1]
    return d, np.sqrt(var), 2 * norm.sf(abs(d / np.sqrt(var)))


def macro_delong_by_definition(scores_a, scores_b, labels, k):
    """The macro-AUC test from its definition: for each class c and condition, the O(m n) kernel gives the
    structural components; each image's influence on AUC_c is (V10 - AUC_c)/m_c or (V01 - AUC_c)/n_c; the
    covariance matrix of the 2K AUCs is sum over true classes g of n_g * cov_g(influences) (images of one class
    iid), and var(D) = c' Sigma c with c = (+1/K for a, -1/K for b)."""
    n = len(labels)
    phis, aucs = [], []
    for s in (scores_a, scores_b):
        for c in range(k):
            pos = labels == c
            psi = _kernel(s[pos, c], s[~pos, c])
            auc = psi.mean()
            phi = np.empty(n)
            phi[pos] = (psi.mean(axis=1) - auc) / pos.sum()
            phi[~pos] = (psi.mean(axis=0) - auc) / (~pos).sum()
            phis.append(phi)
            aucs.append(auc)
    phis = np.stack(phis)  # (2K, n)
    sigma = sum((labels == g).sum() * np.cov(phis[:, labels == g]) for g in range(k))
    contrast = np.r_[np.full(k, 1.0 / k), np.full(k, -1.0 / k)]
    d = contrast @ np.array(aucs)
    se = np.sqrt(contrast @ sigma @ contrast)
    return d, se, 2 * norm.sf(abs(d / se))


def _scores(rng, labels, k, signal, ties=False):
    logits = rng.normal(size=(len(labels), k)) + signal * np.eye(k)[labels]
    if ties:
        logits = np.round(logits * 2) / 2  # many tied scores
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("ties", [False, True])
def test_binary_case_is_procs_paired_delong(ties):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    # scores on a grid of multiples of 1/64, so 1 - p is exact and class 0's ranking is class 1's reversed
    p_a = np.clip(np.round((0.5 + 0.2 * (2 * labels - 1) + rng.normal(0, 0.25, 60)) * 64) / 64, 0, 1)
    p_b = np.clip(np.round((0.5 + 0.1 * (2 * labels - 1) + rng.normal(0, 0.25, 60)) * 64) / 64, 0, 1)
    if ties:
        p_a, p_b = np.round(p_a * 8) / 8, np.round(p_b * 8) / 8
    a, b = np.stack([1 - p_a, p_a], 1), np.stack([1 - p_b, p_b], 1)
    d, se, p = proc_paired_delong(p_a, p_b, labels == 1)
    out = stats.delong_macro_auc_test(a, b, labels, 2)
    assert out["value"] == pytest.approx(d, abs=1e-12)
    assert out["se"] == pytest.approx(se, abs=1e-10) and out["p_value"] == pytest.approx(p, abs=1e-10)
    assert out["ci95"] == pytest.approx([d - 1.959963984540054 * se, d + 1.959963984540054 * se], abs=1e-10)


@pytest.mark.parametrize("k,n,ties", [(3, 45, False), (4, 80, True), (9, 120, False)])
def test_macro_case_matches_the_definition(k, n, ties):
    rng = np.random.default_rng(k)
    labels = rng.permutation(np.arange(n) % k)
    a, b = _scores(rng, labels, k, 1.0, ties), _scores(rng, labels, k, 0.5, ties)
    d, se, p = macro_delong_by_definition(a, b, labels, k)
    out = stats.delong_macro_auc_test(a, b, labels, k)
    assert out["value"] == pytest.approx(d, abs=1e-12) and out["classes"] == k
    assert out["se"] == pytest.approx(se, abs=1e-10) and out["p_value"] == pytest.approx(p, abs=1e-10)
    from sklearn.metrics import roc_auc_score  # an independent AUC: sklearn's macro one-vs-rest

    assert out["auc_a"] == pytest.approx(roc_auc_score(labels, a, multi_class="ovr", average="macro"), abs=1e-12)


def test_components_are_the_kernel_means():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=40), 1)
    pos = rng.random(40) < 0.4
    auc, v = stats.delong_components(s, pos)
    psi = _kernel(s[pos], s[~pos])
    assert auc == pytest.approx(psi.mean(), abs=1e-14)
    np.testing.assert_allclose(v[pos], psi.mean(axis=1), atol=1e-14)
    np.testing.assert_allclose(v[~pos], psi.mean(axis=0), atol=1e-14)


def test_standard_error_matches_the_spread_over_repeated_samples():
    """Calibration: over 400 simulated test sets (K = 3, n = 150, two correlated score sets) the DeLong SE of
    the macro difference is within 10% of the difference's standard deviation, and a 5% test of a true null
    rejects at about 5%."""
    rng = np.random.default_rng(11)
    k, n, reps = 3, 150, 400
    diffs, ses, pvals_null = [], [], []
    for _ in range(reps):
        labels = rng.integers(0, k, n)
        shared = rng.normal(size=(n, k))
        a = shared + rng.normal(size=(n, k)) + 1.2 * np.eye(k)[labels]
        b = shared + rng.normal(size=(n, k)) + 0.8 * np.eye(k)[labels]
        out = stats.delong_macro_auc_test(a, b, labels, k)
        diffs.append(out["value"])
        ses.append(out["se"])
        c = shared + rng.normal(size=(n, k)) + 1.2 * np.eye(k)[labels]  # same distribution as a: null true
        pvals_null.append(stats.delong_macro_auc_test(a, c, labels, k)["p_value"])
    assert np.mean(ses) == pytest.approx(np.std(diffs, ddof=1), rel=0.10)
    assert 0.02 <= np.mean(np.array(pvals_null) < 0.05) <= 0.09


def test_degenerate_inputs():
    labels = np.array([0, 0, 1, 1, 2])  # class 2 has one image: its variance cannot be estimated
    s = np.random.default_rng(0).random((5, 3))
    out = stats.delong_macro_auc_test(s, s[::-1], labels, 3)
    assert np.isfinite(out["value"]) and np.isnan(out["se"]) and np.isnan(out["p_value"])
    same = stats.delong_macro_auc_test(s[:4], s[:4], labels[:4], 3)  # identical conditions: no difference
    assert same["value"] == 0.0 and same["p_value"] == 1.0 and same["classes"] == 2
    assert np.isnan(stats.delong_macro_auc_test(s[:2], s[:2], labels[:2], 3)["value"])  # one class only
