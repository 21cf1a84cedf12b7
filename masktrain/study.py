"""A study: every checkpoint of a training sweep × every probe × every masking method.

``run_study(study_dir)`` finds ``<study>/<recipe>/seed<N>/checkpoints/last.ckpt`` (the layout
``python train.py -m recipe=... seed=...`` writes), evaluates each with
:func:`masktrain.evaluation.evaluate`, and aggregates regime × probe × method over seeds
(mean, spread, per-seed values with their intervals, chance). Before anything is read
as "no leakage", it checks that the baseline reads shape at all and says so plainly.
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

REGIME_ORDER = ("baseline", "mask_aug", "silhouette_aug", "layer_mask_aug")
# Probes whose headline value is an accuracy with a chance level (others: differences, AUC).
HEADLINE = {
    "shape_only": "accuracy on the silhouette's class (donor: first shape_only donor)",
    "object_removal": "acc(silhouette) − acc(bounding box)",
    "linear_probe": "cross-validated accuracy on pooled features",
    "mask_only": "accuracy from the keep mask alone",
    "missingness_curve": "area under accuracy vs. fraction removed",
}


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


def _headline(entry: dict) -> dict[str, Any]:
    """The per-run numbers a study aggregates from one report entry."""
    out = {"value": entry.get("value"), "ci95": entry.get("ci95"), "n": entry.get("n"), "chance": entry.get("chance")}
    correct = entry.get("correct") or {}
    out["correct"] = {"value": correct.get("value"), "ci95": correct.get("ci95"), "n": correct.get("n")}
    mi = entry.get("mi") or {}
    if mi:
        out["mi_excess"] = mi.get("excess")
        out["mi_p_value"] = mi.get("p_value")
    reads = entry.get("reads_shape")
    if reads:
        out["reads_shape"] = reads
    out["flags"] = list(entry.get("flags") or [])
    return out


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
    """``{regime: {probe: {key: {mean, std, min, max, n_seeds, chance, seeds: {seed: headline}}}}}``."""
    table: dict[str, Any] = {}
    for (regime, seed), report in reports.items():
        for probe, by_key in report.get("probes", {}).items():
            for key, entry in by_key.items():
                cell = table.setdefault(regime, {}).setdefault(probe, {}).setdefault(key, {"seeds": {}})
                cell["seeds"][str(seed)] = _headline(entry)
                cell["chance"] = entry.get("chance")
    for regime in table.values():
        for by_key in regime.values():
            for cell in by_key.values():
                seeds = cell["seeds"].values()
                cell.update(_spread([s["value"] for s in seeds]))
                cell["correct"] = _spread([s["correct"]["value"] for s in seeds])
                if any("mi_excess" in s for s in seeds):
                    cell["mi_excess"] = _spread([s.get("mi_excess") for s in seeds])
    return table


def baseline_check(table: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Does the baseline read shape? Its shape-only accuracy must be clearly above chance
    (the lower end of the 95% interval above chance) in every seed, for some fill."""
    base = table.get("baseline", {}).get("shape_only", {})
    if not base:
        return {"status": "unknown", "message": "no baseline runs with the shape_only probe in this study: "
                                                "nothing shows the models can read shape, so 'no leakage' would mean nothing"}
    per_method = {}
    for method, cell in base.items():
        chance = cell.get("chance") or 0.0
        above = [s["ci95"] is not None and s["ci95"][0] > chance for s in cell["seeds"].values()]
        per_method[method] = {"mean": cell["mean"], "chance": chance, "seeds_above_chance": sum(above), "n_seeds": len(above)}
    reading = [m for m, v in per_method.items() if v["n_seeds"] and v["seeds_above_chance"] == v["n_seeds"]]
    if reading:
        best = max(reading, key=lambda m: per_method[m]["mean"])
        v = per_method[best]
        message = (f"yes: the baseline reads shape — shape-only accuracy with the {best} fill is {v['mean']:.1%} "
                   f"against chance {v['chance']:.1%}, clearly above chance in {v['seeds_above_chance']}/{v['n_seeds']} seeds")
        status = "reads_shape"
    else:
        message = ("NO: the baseline's shape-only accuracy is not clearly above chance for any fill; the models may not "
                   "have learned shape, so low leakage in the augmented regimes means nothing")
        status = "does_not_read_shape"
    return {"status": status, "message": message, "per_method": per_method}


def _fmt(cell: dict | None, pct: bool = True) -> str:
    if not cell or cell.get("mean") is None:
        return "—"
    scale, unit = (100, "") if pct else (1, "")
    text = f"{scale * cell['mean']:.1f}" if pct else f"{cell['mean']:.3f}"
    if cell.get("n_seeds", 0) > 1:
        text += f" ± {scale * cell['std']:.1f}" if pct else f" ± {cell['std']:.3f}"
    return text + unit


def render_markdown(study: dict[str, Any]) -> str:
    lines = [f"# Study: {study['study_dir']}", ""]
    lines += [f"{len(study['runs'])} runs ({', '.join(study['regimes'])}; seeds {', '.join(map(str, study['seeds']))}), "
              f"methods {', '.join(study['methods'])}, {study['n_images']} images per probe. "
              f"Evaluated in {study['timing']['total_s']:.0f} s on {study['hardware']}.", ""]
    lines += ["## Does the baseline read shape?", "", study["baseline_check"]["message"], ""]
    for probe, description in HEADLINE.items():
        keys = sorted({k for r in study["table"].values() for k in r.get(probe, {})},
                      key=lambda k: study["methods"].index(k) if k in study["methods"] else len(study["methods"]))
        if not keys:
            continue
        pct = probe != "missingness_curve"
        chance = next((c.get("chance") for r in study["table"].values() for c in r.get(probe, {}).values() if c.get("chance")), None)
        unit = " (%, mean ± sd over seeds)" if pct else " (mean ± sd over seeds)"
        lines += [f"## {probe}", "", f"{description}{unit}" + (f"; chance {100 * chance:.1f}%" if chance and probe != "object_removal" else ""), ""]
        lines += ["| regime | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for regime in study["regimes"]:
            cells = study["table"].get(regime, {}).get(probe, {})
            lines.append(f"| {regime} | " + " | ".join(_fmt(cells.get(k), pct) for k in keys) + " |")
        if probe == "shape_only":
            lines += ["", "Mutual information between silhouette class and prediction, excess over the shuffled "
                          "null (bits, mean ± sd) — two-sided: it also catches a model that avoids the shape's class:", ""]
            lines += ["| regime | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
            for regime in study["regimes"]:
                cells = study["table"].get(regime, {}).get(probe, {})
                lines.append(f"| {regime} | " + " | ".join(_fmt(cells.get(k, {}).get("mi_excess"), pct=False) for k in keys) + " |")
        lines.append("")
    if study["flags"]:
        lines += ["## Flags", ""] + [f"- {f}" for f in study["flags"]] + [""]
    lines += ["Per-run reports: `reports/<regime>_seed<N>/report.md`. Definitions: docs/probes.md.", ""]
    return "\n".join(lines)


def plot_study(study: dict[str, Any], path: Path) -> None:
    """One panel per probe: grouped bars (methods × regimes), error bars = sd over seeds, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [p for p in HEADLINE if any(p in r for r in study["table"].values())]
    fig, axes = plt.subplots(1, len(probes), figsize=(4.2 * len(probes), 3.6), squeeze=False)
    regimes = study["regimes"]
    width = 0.8 / max(1, len(regimes))
    for ax, probe in zip(axes[0], probes):
        keys = sorted({k for r in study["table"].values() for k in r.get(probe, {})},
                      key=lambda k: study["methods"].index(k) if k in study["methods"] else len(study["methods"]))
        for i, regime in enumerate(regimes):
            cells = study["table"].get(regime, {}).get(probe, {})
            means = [cells.get(k, {}).get("mean") or 0.0 for k in keys]
            stds = [cells.get(k, {}).get("std") or 0.0 for k in keys]
            xs = [j + (i - (len(regimes) - 1) / 2) * width for j in range(len(keys))]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=regime)
        chance = next((c.get("chance") for r in study["table"].values() for c in r.get(probe, {}).values() if c.get("chance")), None)
        if chance and probe != "object_removal":
            ax.axhline(chance, color="k", linestyle="--", linewidth=1, label="chance")
        if probe == "object_removal":
            ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=30, ha="right")
        ax.set_title(probe)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{Path(study['study_dir']).name} (synthetic shapes data; bars: mean over seeds, whiskers: sd)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    table = aggregate(reports)
    regimes = list(dict.fromkeys(r.regime for r in runs))
    study = {
        "study_dir": str(root),
        "runs": [{"regime": r.regime, "seed": r.seed, "checkpoint": str(r.checkpoint)} for r in runs],
        "regimes": regimes,
        "seeds": sorted({r.seed for r in runs}),
        "methods": list(methods),
        "probes": list(probes),
        "n_images": n_images,
        "table": table,
        "baseline_check": baseline_check(table, methods),
        "flags": sorted({f"{regime}: {flag}" for (regime, _), rep in reports.items() for flag in rep.get("flags", [])}),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
                    + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "timing": {"total_s": time.perf_counter() - started},
    }
    if write:
        _write_atomic(root / "study.json", json.dumps(study, indent=2, default=float))
        _write_atomic(root / "study.md", render_markdown(study))
        plot_study(study, root / "study.png")
        log(study["baseline_check"]["message"])
    return study
