"""A study: every checkpoint of a training sweep × every probe × every masking method.

``run_study(study_dir)`` finds ``<study>/<recipe>/seed<N>/checkpoints/last.ckpt`` (the layout
``python train.py -m recipe=... seed=...`` writes), evaluates each with
:func:`masktrain.evaluation.evaluate`, and aggregates regime × probe × method over seeds
(mean, spread, per-seed values with their intervals, chance, and a 95% interval over seeds *and*
test images from the probes' per-image outcomes). Every regime is compared with the baseline and
with ``continued_training`` (the baseline fine-tuned as long, without masks) by a paired test over
(seed, image) with Benjamini–Hochberg across the study (:mod:`masktrain.study_compare`). Before
anything is read as "no leakage", it checks that the baseline reads shape at all and says so plainly.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
import torch

from masktrain.checkpoint import load_classifier
from masktrain.errors import UserError, check
from masktrain.io_utils import atomic_write
from masktrain.probes import PROBES, Probe
from masktrain.study_compare import cell_intervals, collect_outcomes, compare_regimes, render_comparisons

REGIME_ORDER = ("baseline", "continued_training", "mask_aug", "silhouette_aug", "layer_mask_aug")


@dataclass(frozen=True)
class Run:
    regime: str
    seed: int
    checkpoint: Path


def find_runs(study_dir: str | os.PathLike) -> list[Run]:
    """Runs of a sweep directory, ordered baseline first; a UserError when there are none."""
    root = Path(study_dir)
    check(root.is_dir(), f"study={str(root)!r} is not a directory; pass the multirun directory of a training sweep")
    runs = []
    for ckpt in sorted(root.glob("*/seed*/checkpoints/last.ckpt")):
        match = re.fullmatch(r"seed(-?\d+)", ckpt.parents[1].name)
        if match:
            runs.append(Run(ckpt.parents[2].name, int(match.group(1)), ckpt))
    if not runs:
        raise UserError(
            f"study={str(root)!r} holds no runs (expected <recipe>/seed<N>/checkpoints/last.ckpt, "
            f"as written by `python train.py -m recipe=baseline,mask_aug seed=0,1,2`)"
        )
    rank = {r: i for i, r in enumerate(REGIME_ORDER)}
    return sorted(runs, key=lambda r: (rank.get(r.regime, len(rank)), r.regime, r.seed))


def _spread(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n_seeds": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n_seeds": len(values),
    }


def aggregate(reports: dict[tuple[str, int], dict]) -> dict[str, Any]:
    """``{regime: {probe: {key: {mean, std, min, max, n_seeds, chance, seeds: {seed: cell}}}}}``; each
    probe says which numbers of an entry a study keeps (``study_cell``) and which it spreads over seeds."""
    table: dict[str, Any] = {}
    for (regime, seed), report in reports.items():
        for probe, by_key in report.get("probes", {}).items():
            for key, entry in by_key.items():
                cell = table.setdefault(regime, {}).setdefault(probe, {}).setdefault(key, {"seeds": {}})
                cell["seeds"][str(seed)] = PROBES.get(probe).study_cell(entry)
                cell["chance"] = entry.get("chance")
    for regime in table.values():
        for probe, by_key in regime.items():
            for cell in by_key.values():
                seeds = cell["seeds"].values()
                cell.update(_spread([s["value"] for s in seeds]))
                cell["correct"] = _spread([s["correct"]["value"] for s in seeds])
                for extra in PROBES.get(probe).study_spreads:
                    if any(extra in s for s in seeds):
                        cell[extra] = _spread([s.get(extra) for s in seeds])
    return table


def study_fdr(reports: dict[tuple[str, int], dict], alpha: float = 0.05) -> dict[str, Any]:
    """Benjamini–Hochberg across the study, in place: the family is every headline (``subset: all``)
    ``reads_shape`` verdict of every run (regime × seed × probe × key × donor); each verdict gains
    ``q_study`` / ``significant_study`` / ``family_study``. The study's tables and checks read
    ``significant_study``."""
    from masktrain.probes.base import apply_fdr, iter_verdicts

    verdicts, seen = [], set()
    for report in reports.values():
        for path, verdict in iter_verdicts(report.get("probes", {})):
            if "correct" not in path and id(verdict) not in seen:
                seen.add(id(verdict))
                verdicts.append(verdict)
    family = (f"every headline (subset 'all') reads_shape verdict of the study: regime × seed × probe × key × donor "
              f"({len(verdicts)} tests)")
    apply_fdr(verdicts, alpha, "study", family)
    return {"tests": len(verdicts), "method": "Benjamini–Hochberg", "alpha": alpha, "family": family}


def probe_cells(study: dict[str, Any], probe: str) -> dict[str, dict[str, dict]]:
    """``{regime: {key: cell}}`` of one probe."""
    return {regime: by_probe.get(probe, {}) for regime, by_probe in study["table"].items()}


def _study_probes(study: dict[str, Any]) -> list[Probe]:
    names = list(study.get("probes") or [])
    names += [p for r in study["table"].values() for p in r if p not in names]
    return [PROBES.get(n) for n in names if any(n in r for r in study["table"].values())]


def checks(study: dict[str, Any]) -> dict[str, dict]:
    """What each probe says must hold before the study is read (e.g. the baseline reads shape)."""
    out = {}
    for probe in _study_probes(study):
        check_ = probe.study_check(study, probe_cells(study, probe.name))
        if check_:
            out[probe.name] = check_
    return out


def render_markdown(study: dict[str, Any]) -> str:
    lines = [f"# Study: {study['study_dir']}", ""]
    lines += [f"{len(study['runs'])} runs ({', '.join(study['regimes'])}; seeds {', '.join(map(str, study['seeds']))}), "
              f"methods {', '.join(study['methods'])}, {study['n_images']} images per probe. "
              f"Evaluated in {study['timing']['total_s']:.0f} s on {study['hardware']}.", ""]
    for c in study.get("checks", {}).values():
        lines += [f"## {c['title']}", "", c["message"], ""]
    for probe in _study_probes(study):
        lines += probe.study_markdown(study, probe_cells(study, probe.name))
    lines += render_comparisons(study, _study_probes(study))
    if study["flags"]:
        lines += ["## Flags", ""] + [f"- {f}" for f in study["flags"]] + [""]
    lines += ["Per-run reports: `reports/<regime>_seed<N>/report.md`. Definitions: docs/probes.md.", ""]
    return "\n".join(lines)


def plot_study(study: dict[str, Any], path: Path) -> None:
    """study.png: every probe's panels side by side (by default grouped bars: methods × regimes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [panel for probe in _study_probes(study) for panel in probe.study_panels(study, probe_cells(study, probe.name))]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel(ax)
    if panels:
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{Path(study['study_dir']).name} (bars: mean over seeds, whiskers: sd)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def build_study(reports: dict[tuple[str, int], dict], root: Path, runs: Sequence[Run], probes: Sequence[str],
                methods: Sequence[str], n_images: int | None, started: float, n_boot: int = 2000,
                n_permutations: int = 10000) -> dict[str, Any]:
    """The study dict from every run's report (``{(regime, seed): report}``, each with its per-image ``outcomes``):
    the table over seeds with two-level bootstrap intervals, the study-wide BH of the verdicts, the between-regime
    comparisons and the checks."""
    multiplicity = study_fdr(reports)
    table = aggregate(reports)
    t0 = time.perf_counter()
    outcomes = collect_outcomes(reports)
    regimes = list(dict.fromkeys(r.regime for r in runs))
    cell_intervals(table, outcomes, n_boot=n_boot)
    fingerprints = {key: (rep.get("dataset") or {}).get("fingerprint") for key, rep in reports.items()}
    comparisons, comparison_tests = compare_regimes(outcomes, fingerprints, regimes, n_boot=n_boot, n_permutations=n_permutations)
    stats_s = time.perf_counter() - t0
    study = {
        "study_dir": str(root),
        "runs": [{"regime": r.regime, "seed": r.seed, "checkpoint": str(r.checkpoint)} for r in runs],
        "regimes": regimes,
        "seeds": sorted({r.seed for r in runs}),
        "methods": list(methods),
        "probes": list(probes),
        "n_images": n_images,
        "table": table,
        "multiplicity": multiplicity,
        "comparisons": comparisons,
        "comparison_tests": comparison_tests,
        "flags": sorted({f"{regime}: {flag}" for (regime, _), rep in reports.items() for flag in rep.get("flags", [])}),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
                    + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "timing": {"total_s": time.perf_counter() - started, "intervals_and_comparisons_s": stats_s},
    }
    study["checks"] = checks(study)
    # The first check is the one stated first (kept under its old name for readers of study.json).
    study["baseline_check"] = next(iter(study["checks"].values()), {"status": "unknown", "message": "no probe of this study checks the baseline"})
    return study


def run_study(
    study_dir: str | os.PathLike,
    probes: Sequence[str],
    methods: Sequence[str],
    n_images: int | None = None,
    device: str | torch.device | None = None,
    options: dict | None = None,
    data_overrides: Callable[[dict], dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate every run of ``study_dir`` and write study.json, study.md and study.png into it."""
    from masktrain.evaluation import evaluate
    from masktrain.reports import write_report

    from masktrain.tracking import is_rank_zero

    started = time.perf_counter()
    root = Path(study_dir)
    runs = find_runs(root)
    write = is_rank_zero()  # under torchrun every rank evaluates its shard; rank 0 writes the files
    reports: dict[tuple[str, int], dict] = {}
    for run in runs:
        log(f"evaluating {run.regime} seed {run.seed}: {run.checkpoint}")
        model, config = load_classifier(run.checkpoint)
        data_cfg = config["data"] if data_overrides is None else data_overrides(config["data"])
        datamodule = hydra.utils.instantiate(data_cfg)
        report = evaluate(model, datamodule, probes=probes, methods=methods, n_images=n_images, device=device,
                          options=options, seed=0)
        report.setdefault("model", {})["run"] = {"regime": run.regime, "seed": run.seed, "checkpoint": str(run.checkpoint)}
        if write:
            write_report(report, root / "reports" / f"{run.regime}_seed{run.seed}", plots=False)
        reports[(run.regime, run.seed)] = report
    study = build_study(reports, root, runs, probes, methods, n_images, started)
    if write:
        atomic_write(root / "study.json", json.dumps(study, indent=2, default=float))
        atomic_write(root / "study.md", render_markdown(study))
        plot_study(study, root / "study.png")
        log(study["baseline_check"]["message"])
    return study
