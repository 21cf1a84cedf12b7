"""Statistics behind every reported number: Wilson, bootstrap, mutual information + permutation test."""
import math

import numpy as np
import pytest

from masktrain import stats


@pytest.mark.parametrize(
    "k,n,expected",
    [
        (5, 10, (0.2365930905, 0.7634069095)),   # statsmodels proportion_confint(method="wilson")
        (0, 10, (0.0, 0.2775327913)),
        (10, 10, (0.7224672087, 1.0)),
        (81, 263, (0.2553, 0.3662)),             # Wilson (1927) worked example, 4 decimals
    ],
)
def test_wilson_known_values(k, n, expected):
    lo, hi = stats.wilson(k, n)
    tol = 1e-4 if n == 263 else 1e-8
    assert lo == pytest.approx(expected[0], abs=tol)
    assert hi == pytest.approx(expected[1], abs=tol)


def test_wilson_empty_is_uninformative():
    assert stats.wilson(0, 0) == (0.0, 1.0)


def test_wilson_covers_true_proportion_at_nominal_rate():
    rng = np.random.default_rng(0)
    p, n = 0.12, 80
    ks = rng.binomial(n, p, size=4000)
    cover = np.mean([lo <= p <= hi for lo, hi in (stats.wilson(int(k), n) for k in ks)])
    assert 0.93 <= cover <= 0.975


def test_bootstrap_mean_interval_matches_normal_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, size=400)
    lo, hi = stats.bootstrap_mean_ci(x, n_boot=2000, seed=0)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_mutual_information_extremes():
    y = np.repeat(np.arange(4), 25)
    assert stats.mutual_information(y, y, 4) == pytest.approx(2.0)
    assert stats.mutual_information(y, (y + 1) % 4, 4) == pytest.approx(2.0)  # a permutation of classes is as informative
    assert stats.mutual_information(y, np.zeros_like(y), 4) == pytest.approx(0.0)


def test_contingency_batched_equals_loop():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 5, size=(3, 50)), rng.integers(0, 5, size=(3, 50))
    batched = stats.contingency(a, b, 5)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], stats.contingency(a[i], b[i], 5))


def test_mi_permutation_test_detects_dependence_and_not_independence():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 8, size=400)
    # dependent: a model that avoids the class (never predicts it) — accuracy 0, MI high
    avoid = (y + rng.integers(1, 8, size=400)) % 8
    dep = stats.mi_permutation_test(y, (y + 3) % 8, 8, n_permutations=500, seed=0)
    h_y = float(stats.entropy_bits(np.bincount(y, minlength=8) / len(y)))
    assert dep["p_value"] <= 1 / 501 + 1e-12 and dep["value"] == pytest.approx(h_y)  # MI = H(y) for a bijection
    weak = stats.mi_permutation_test(y, avoid, 8, n_permutations=500, seed=0)
    assert weak["p_value"] < 0.05 and weak["excess"] > 0
    indep = stats.mi_permutation_test(y, rng.integers(0, 8, size=400), 8, n_permutations=500, seed=0)
    assert indep["p_value"] > 0.05
    # the plug-in estimate is biased upwards; the null mean measures that bias
    assert indep["null_mean"] > 0 and abs(indep["excess"]) < 0.05


def test_mi_permutation_p_value_is_calibrated():
    rng = np.random.default_rng(4)
    ps = [stats.mi_permutation_test(rng.integers(0, 4, 60), rng.integers(0, 4, 60), 4, n_permutations=200, seed=i, n_boot=10)["p_value"]
          for i in range(100)]
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.12


def test_proportion_summary_fields():
    labels = np.array([0, 0, 1, 1, 2])
    s = stats.proportion(np.array([1, 0, 1, 1, 0], bool), labels, 3, None, ["a", "b", "c"], "all")
    assert s["value"] == pytest.approx(0.6) and s["n"] == 5 and s["chance"] == pytest.approx(1 / 3)
    assert s["per_class"]["b"]["value"] == 1.0 and s["per_class"]["c"]["n"] == 1
    assert s["ci95"][0] < 0.6 < s["ci95"][1] and s["subset"] == "all"


def test_independence_chance():
    y = np.array([0, 0, 1, 1])
    assert stats.independence_chance(y, np.zeros(4, int), 2) == pytest.approx(0.5)
    assert stats.independence_chance(np.zeros(4, int), np.zeros(4, int), 2) == pytest.approx(1.0)


def test_holm_and_benjamini_hochberg_known_values():
    # hand-computed: Holm = max-accumulated (m - i) p_(i); BH = min-accumulated p_(i) m / i from the top
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.benjamini_hochberg([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.04, 0.04])
    assert stats.benjamini_hochberg([0.5, 0.9]) == pytest.approx([0.9, 0.9])
    assert stats.holm([]) == [] and stats.holm([None, 0.2]) == pytest.approx([1.0, 0.4])


def test_exact_binomial_and_mcnemar():
    from scipy.stats import binomtest

    assert stats.binomial_greater(30, 100, 0.2) == pytest.approx(binomtest(30, 100, 0.2, alternative="greater").pvalue)
    assert stats.binomial_greater(0, 0, 0.1) == 1.0
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0], bool)
    assert stats.mcnemar(a, b) == pytest.approx(2 * 0.5 ** 6)  # 6 discordant pairs, all one way
    assert stats.mcnemar(a, a) == 1.0


def test_miller_madow_interval_covers_zero_under_independence():
    rng = np.random.default_rng(3)
    covered = 0
    for i in range(40):
        r = stats.mi_permutation_test(rng.integers(0, 10, 300), rng.integers(0, 10, 300), 10, 200, seed=i, n_boot=200)
        covered += r["ci95"][0] <= 0.0 <= r["ci95"][1]
        assert r["value"] > 0.1  # the plug-in's bias at K = 10, n = 300 (~0.2 bits) ...
        assert abs(r["miller_madow"]) < 0.1  # ... which Miller–Madow removes
    assert covered >= 32  # nominal 95%; measured 92% over 100 runs (the plug-in percentile interval: 0%)


def test_mi_default_has_ten_thousand_permutations():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    r = stats.mi_permutation_test(y, y, 5)
    assert r["n_permutations"] == 10000 and r["p_value"] == pytest.approx(1 / 10001)


def test_linear_probe_permutation_null_is_calibrated():
    """Features independent of the labels: the label-permutation test rejects at about its level
    (a Wilson interval against 1/K rejected 7.7% of the time at nominal 2.5% in the issue-13 review)."""
    from masktrain.probes.linear_probe import permutation_cv

    rng = np.random.default_rng(0)
    rejections, runs = 0, 120
    for i in range(runs):
        X = rng.normal(size=(150, 24))
        y = rng.integers(0, 5, 150)
        pred, null = permutation_cv(X, y, 5, 5, 0.1, 199, seed=i)
        p = (1 + np.sum(null >= (pred == y).mean() - 1e-12)) / (1 + len(null))
        rejections += p < 0.05
    assert rejections / runs < 0.1  # binomial 99.9% upper bound for a 5% test at 120 runs is ~0.12


def test_linear_probe_finds_a_planted_signal():
    from masktrain.probes.linear_probe import permutation_cv

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    X = rng.normal(size=(200, 16))
    X[:, 0] += 1.5 * y  # one informative feature
    pred, null = permutation_cv(X, y, 5, 5, 0.1, 199, seed=0)
    assert (pred == y).mean() > null.max()
