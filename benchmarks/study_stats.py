"""Cost of a study's intervals and between-regime tests (masktrain.study_compare) on a study-sized fake.

5 regimes (baseline, continued_training, mask_aug, silhouette_aug, layer_mask_aug) × 3 seeds × 5 probes ×
3 methods, 500 test images per run: 0/1 outcomes for four probes and a many-valued one (the per-image
area of a 9-point curve, like missingness_curve). Prints the time of build_study's statistics part
(``timing.intervals_and_comparisons_s``) and of the rest of build_study, side by side in one run.

    python benchmarks/study_stats.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from masktrain.study import Run, build_study

REGIMES = ("baseline", "continued_training", "mask_aug", "silhouette_aug", "layer_mask_aug")
PROBES = ("shape_only", "object_removal", "linear_probe", "backgrounds", "missingness_curve")
METHODS = ("black", "grey", "layer")


def fake_reports(n: int = 500, seeds=(0, 1, 2)) -> dict:
    rng = np.random.default_rng(0)
    reports = {}
    for regime in REGIMES:
        for seed in seeds:
            probes, outcomes = {}, {}
            for probe in PROBES:
                for method in METHODS:
                    if probe == "missingness_curve":
                        v = (rng.random((n, 9)) < 0.5) @ np.full(9, 1 / 9)
                    elif probe == "object_removal":
                        v = (rng.random(n) < 0.4).astype(float) - (rng.random(n) < 0.3)
                    else:
                        v = (rng.random(n) < 0.3).astype(float)
                    probes.setdefault(probe, {})[method] = {"value": float(v.mean()), "ci95": [0, 1], "n": n, "chance": 0.1,
                                                            "correct": {"value": None, "ci95": None, "n": 0}, "flags": []}
                    outcomes.setdefault(probe, {})[method] = v
            reports[(regime, seed)] = {"probes": probes, "outcomes": outcomes, "flags": [], "dataset": {"fingerprint": str(seed)}}
    return reports


def main() -> None:
    reports = fake_reports()
    runs = [Run(r, s, Path(f"{r}/seed{s}")) for r, s in reports]
    for _ in range(2):
        t0 = time.perf_counter()
        study = build_study(reports, Path("fake"), runs, list(PROBES), list(METHODS), 500, time.perf_counter())
        total = time.perf_counter() - t0
        stats_s = study["timing"]["intervals_and_comparisons_s"]
        print(f"build_study {total:.2f} s, of which intervals + {study['comparison_tests']['tests']} comparisons "
              f"{stats_s:.2f} s ({len(study['table']) * len(PROBES) * len(METHODS)} cells)", file=sys.stdout)


if __name__ == "__main__":
    main()
