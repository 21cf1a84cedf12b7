"""A study's intervals with test-sampling error, and the between-regime tests behind "raised" / "lowered".

Inputs are the per-image outcomes every probe exposes (:meth:`masktrain.probes.base.Probe.outcomes`):
for each run (regime, seed) and each headline number (probe × key), one outcome per test image whose
mean is the run's headline value.

- **Cell intervals** (:func:`cell_intervals`): per regime × probe × key, a two-level bootstrap
  (seeds, then test images within each seed; :func:`masktrain.hierarchical.two_level_bootstrap`) of
  the mean over seeds.
- **Comparisons** (:func:`compare_regimes`): every regime other than a reference against each
  reference present (``baseline``; ``continued_training``, the baseline fine-tuned as long as the
  augmented regimes without masks), and ``continued_training`` against ``baseline``, per headline
  number. The test images are the same for every regime of a seed (the data seed is fixed; the
  reports' dataset fingerprints are checked), so outcomes pair by (seed, image). Difference = mean
  over seeds of the per-seed mean paired difference; p = a stratified sign-flip test of the paired
  differences (10⁴ flips; exact under "the two regimes are exchangeable on every (seed, image)
  pair", conditional on the trained seeds); interval = the two-level bootstrap of the paired
  differences, which also resamples seeds. q = Benjamini–Hochberg over the family of every
  comparison of the study. A comparison is called ``raised`` / ``lowered`` only when q < α **and**
  the interval excludes 0 on that side: the sign-flip test sees test-sampling error only, the
  interval guards against a difference carried by one seed.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from masktrain import hierarchical, stats
from masktrain.rng import derive_seed, name_key

#: Regimes the others are compared against, in this order; the second is also compared with the first.
REFERENCES = ("baseline", "continued_training")
RAISED, LOWERED, NO_CHANGE = "raised", "lowered", "no evidence of a change"

#: ``{regime: {probe: {key: {seed: (N,) outcomes}}}}``
Outcomes = dict[str, dict[str, dict[str, dict[int, np.ndarray]]]]


def collect_outcomes(reports: dict[tuple[str, int], dict]) -> Outcomes:
    """The per-image outcomes of every run, regrouped by regime, probe, key and seed."""
    out: Outcomes = {}
    for (regime, seed), report in reports.items():
        for probe, by_key in (report.get("outcomes") or {}).items():
            for key, values in by_key.items():
                out.setdefault(regime, {}).setdefault(probe, {}).setdefault(key, {})[int(seed)] = np.asarray(values, dtype=np.float64)
    return out


def cell_intervals(table: dict[str, Any], outcomes: Outcomes, n_boot: int = 2000, seed: int = 0) -> None:
    """In place: every cell of ``table`` gains ``ci95`` (two-level bootstrap, seeds × test images; None when its
    probe has no per-image outcomes) and ``interval`` (how it was made)."""
    for regime, by_probe in table.items():
        for probe, by_key in by_probe.items():
            for key, cell in by_key.items():
                per_seed = outcomes.get(regime, {}).get(probe, {}).get(key)
                if not per_seed:
                    cell["ci95"] = None
                    cell["interval"] = {"method": "none: this probe's headline has no per-image outcomes"}
                    continue
                seeds = sorted(per_seed)
                boot = hierarchical.two_level_bootstrap([per_seed[s] for s in seeds], n_boot,
                                                        derive_seed(seed, name_key(regime), name_key(probe), name_key(key)))
                cell["ci95"] = boot["ci95"]
                cell["interval"] = {"method": "two-level percentile bootstrap: seeds, then test images within each seed",
                                    "value": boot["value"], "n_seeds": boot["n_seeds"], "n_images": boot["n_images"],
                                    "n_boot": boot["n_boot"]}


def comparison_pairs(regimes: list[str]) -> list[tuple[str, str]]:
    """(regime, reference) pairs: every non-reference regime against each reference present, then the
    later references against the earlier ones (continued_training vs. baseline)."""
    refs = [r for r in REFERENCES if r in regimes]
    pairs = [(r, ref) for r in regimes if r not in REFERENCES for ref in refs]
    pairs += [(refs[j], refs[i]) for j in range(len(refs)) for i in range(j)]
    return pairs


def word(difference: float | None, ci95, q: float | None, alpha: float) -> str:
    """``raised`` / ``lowered`` when q < α and the interval excludes 0 on that side, else ``no evidence of a change``."""
    if difference is None or q is None or ci95 is None or not q < alpha:
        return NO_CHANGE
    if ci95[0] > 0:
        return RAISED
    if ci95[1] < 0:
        return LOWERED
    return NO_CHANGE


def compare_regimes(outcomes: Outcomes, fingerprints: dict[tuple[str, int], str | None], regimes: list[str],
                    alpha: float = 0.05, n_boot: int = 2000, n_permutations: int = 10000, seed: int = 0) -> tuple[dict, dict]:
    """``({regime: {reference: {probe: {key: comparison}}}}, multiplicity)``; see the module docstring.

    A comparison: ``difference``, ``ci95``, ``p_value``, ``q_value``, ``verdict``, ``per_seed`` (each seed's mean
    paired difference), ``n_seeds``, ``n_pairs``, ``discordant``, ``unpaired_seeds`` (seeds dropped because one
    regime lacks them or scored other test images)."""
    results: dict[str, Any] = {}
    flat: list[dict] = []
    for regime, ref in comparison_pairs(regimes):
        for probe, by_key in outcomes.get(regime, {}).items():
            for key, per_seed in by_key.items():
                ref_seeds = outcomes.get(ref, {}).get(probe, {}).get(key)
                if not ref_seeds:
                    continue
                paired, unpaired = [], []
                for s in sorted(set(per_seed) | set(ref_seeds)):
                    same = (s in per_seed and s in ref_seeds and per_seed[s].shape == ref_seeds[s].shape
                            and fingerprints.get((regime, s)) == fingerprints.get((ref, s)))
                    (paired if same else unpaired).append(s)
                diffs = hierarchical.paired_differences([per_seed[s] for s in paired], [ref_seeds[s] for s in paired])
                salt = derive_seed(seed, name_key(regime), name_key(ref), name_key(probe), name_key(key))
                test = hierarchical.sign_flip_test(diffs, n_permutations, derive_seed(salt, 1))
                boot = hierarchical.two_level_bootstrap(diffs, n_boot, derive_seed(salt, 2))
                comparison = {
                    "regime": regime, "reference": ref, "probe": probe, "key": key,
                    "difference": test["value"], "ci95": boot["ci95"], "p_value": test["p_value"],
                    "per_seed": {str(s): float(d.mean()) for s, d in zip(paired, diffs)},
                    "n_seeds": test["n_seeds"], "n_pairs": test["n_pairs"], "discordant": test["discordant"],
                    "n_permutations": test["n_permutations"], "n_boot": boot["n_boot"], "unpaired_seeds": unpaired,
                }
                results.setdefault(regime, {}).setdefault(ref, {}).setdefault(probe, {})[key] = comparison
                flat.append(comparison)
    qs = stats.benjamini_hochberg([c["p_value"] for c in flat])
    for c, q in zip(flat, qs):
        c["q_value"] = q
        c["verdict"] = word(c["difference"], c["ci95"], q, alpha)
    family = (f"every between-regime comparison of the study: each regime against each reference present "
              f"({', '.join(REFERENCES)}), and {REFERENCES[1]} against {REFERENCES[0]}, × every probe headline with "
              f"per-image outcomes × key ({len(flat)} tests)")
    multiplicity = {
        "tests": len(flat), "method": "Benjamini–Hochberg", "alpha": alpha, "family": family,
        "test": f"two-sided stratified sign-flip test of the per-image paired differences (pairs: seed × test image; "
                f"{n_permutations} flips; statistic: mean over seeds of the per-seed mean difference)",
        "interval": f"two-level percentile bootstrap of the paired differences: seeds, then images within each seed ({n_boot} draws)",
        "rule": f"'{RAISED}' / '{LOWERED}': q < {alpha} and the 95% interval excludes 0 on that side; otherwise '{NO_CHANGE}'",
    }
    return results, multiplicity


def _fmt_diff(value: float | None, pct: bool) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.1f}" if pct else f"{value:+.3f}"


def comparison_text(c: dict | None, pct: bool) -> str:
    """A table cell: difference [95% CI] q, and the verdict word."""
    if not c or c.get("difference") is None:
        return "—"
    lo, hi = c["ci95"] or (None, None)
    q = c.get("q_value")
    text = f"{_fmt_diff(c['difference'], pct)} [{_fmt_diff(lo, pct)}, {_fmt_diff(hi, pct)}] q={q:.2g}"
    verdict = c.get("verdict", NO_CHANGE)
    return f"{text} **{verdict}**" if verdict in (RAISED, LOWERED) else f"{text} {verdict}"


def render_comparisons(study: dict, probes: list) -> list[str]:
    """study.md's section of between-regime comparisons: one table per probe (rows: regime − reference, columns: keys)."""
    comparisons = study.get("comparisons") or {}
    if not comparisons:
        return []
    m = study.get("comparison_tests", {})
    lines = ["## Between-regime comparisons", "",
             f"Difference of the headline (regime − reference; points when in %) [95% interval: {m.get('interval', '')}], "
             f"q = Benjamini–Hochberg over {m.get('tests', 0)} tests ({m.get('test', '')}). "
             f"A change is named (in bold) only when q < {m.get('alpha', 0.05)} and the interval excludes 0 on its side; "
             f"otherwise the cell says {NO_CHANGE!r}.", ""]
    for probe in probes:
        rows = [(regime, ref) for regime, by_ref in comparisons.items() for ref, by_probe in by_ref.items() if probe.name in by_probe]
        if not rows:
            continue
        keys = sorted({k for regime, ref in rows for k in comparisons[regime][ref][probe.name]},
                      key=lambda k: (study.get("methods", []).index(k) if k in study.get("methods", []) else 99, k))
        lines += [f"### {probe.name}: {probe.study_headline or probe.headline}", "",
                  "| regime − reference | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for regime, ref in rows:
            by_key = comparisons[regime][ref][probe.name]
            lines.append(f"| {regime} − {ref} | " + " | ".join(comparison_text(by_key.get(k), probe.percent) for k in keys) + " |")
        lines.append("")
    return lines
