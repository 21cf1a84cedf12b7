"""Write an evaluation report: ``report.json``, ``report.md`` and PNG plots, atomically.

Everything is rendered into a temporary sibling directory first and moved into place
only when complete (``os.replace``), so a failure never leaves a partial report.
Optionally the same tables and plots go to W&B (offline by default, files under the
output directory).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from masktrain.io_utils import atomic_directory
from masktrain.probes import PROBES, Probe
from masktrain.probes.base import fmt_ci as _ci
from masktrain.probes.base import fmt_num as _num

def _yerr(vals: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Error-bar lengths (2, n), clipped at 0: a percentile-bootstrap interval need not contain
    the point estimate (e.g. a small-n difference), and matplotlib rejects negative lengths."""
    return [np.clip(np.nan_to_num(vals - lo), 0, None), np.clip(np.nan_to_num(hi - vals), 0, None)]


def _probe(name: str) -> Probe:
    """The registered probe a report section belongs to (a report names its probes)."""
    return PROBES.get(name)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def summary_rows(report: dict) -> list[dict]:
    """One row per (probe, key, subset): the headline numbers a person compares."""
    rows = []
    for probe, cols in report["probes"].items():
        for key, entry in cols.items():
            for e in (entry, entry.get("correct") or {}):
                if not e:
                    continue
                row = {"probe": probe, "key": key, "subset": e.get("subset"), "value": e.get("value"),
                       "ci_lo": (e.get("ci95") or [None, None])[0], "ci_hi": (e.get("ci95") or [None, None])[1],
                       "n": e.get("n"), "chance": e.get("chance")}
                row.update(_probe(probe).summary_columns(e))
                row["flags"] = "; ".join(e.get("flags", []))
                rows.append(row)
    return rows


def render_markdown(report: dict) -> str:
    """Tables a person reads: one per probe, all and correct-only subsets side by side."""
    ds, model = report["dataset"], report["model"]
    lines = [f"# Shape-leakage report: {model['name']}", ""]
    lines.append(f"Dataset **{ds['name']}** ({ds['split']} split, n = {ds['n']}, {ds['num_classes']} classes, chance = "
                 f"{1 / ds['num_classes']:.3f}). Unmasked accuracy: {_num(ds['clean_accuracy']['value'])} "
                 f"{_ci(ds['clean_accuracy']['ci95'])}; {ds['correct_subset_n']} images classified correctly form the "
                 f"`correct` subset (the paper's choice).")
    lines.append("")
    if report.get("flags"):
        lines.append("## Warnings")
        lines.append("")
        lines += [f"- ⚠️ {flag}" for flag in report["flags"]]
        lines.append("")
    for probe, cols in report["probes"].items():
        lines += [f"## {probe}", "", f"Headline: {_probe(probe).headline}. Intervals are 95%.", ""]
        lines += _probe(probe).report_rows(cols)
        lines.append("")
        warn = [f"{key}: {flag}" for key, entry in cols.items() for flag in entry.get("flags", [])]
        lines += [f"> ⚠️ {w}" for w in warn]
        if warn:
            lines.append("")
    lines += ["Per-class values, intervals for every number and the run configuration are in `report.json` "
              "(schema: docs/probes.md).", ""]
    return "\n".join(lines)


def plot_leakage(report: dict, path: Path) -> bool:
    """Headline value per probe and key with 95% intervals, against chance (both subsets)."""
    cols = {p: c for p, c in report["probes"].items() if _probe(p).summary_panel}
    if not cols:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.8), squeeze=False)
    for ax, (probe, entries) in zip(axes[0], cols.items()):
        keys = list(entries)
        x = np.arange(len(keys))
        for j, subset in enumerate(("all", "correct")):
            es = [entries[k] if subset == "all" else entries[k]["correct"] for k in keys]
            vals = np.array([e["value"] if e["value"] is not None else np.nan for e in es], dtype=float)
            lo = np.array([e["ci95"][0] if e["ci95"][0] is not None else np.nan for e in es], dtype=float)
            hi = np.array([e["ci95"][1] if e["ci95"][1] is not None else np.nan for e in es], dtype=float)
            ax.errorbar(x + (j - 0.5) * 0.25, vals, yerr=_yerr(vals, lo, hi), fmt="o",
                        capsize=3, label=subset)
        chance = next(iter(entries.values())).get("chance")
        if chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1, label="chance" if chance else "no leakage")
        ax.set_xticks(x, keys, rotation=30, ha="right")
        ax.set_title(probe, fontsize=10)
        ax.set_ylabel(_probe(probe).headline, fontsize=7)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_SEP = "::"  # probe::key in outcomes.npz (keys such as "original/grey" hold a slash)


def save_outcomes(outcomes: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """``{probe: {key: (n,) per-image outcomes}}`` as one compressed ``.npz`` (array name ``probe::key``)."""
    arrays = {f"{probe}{_SEP}{key}": np.asarray(v, dtype=np.float64) for probe, by_key in outcomes.items() for key, v in by_key.items()}
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_outcomes(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The per-image outcomes :func:`write_report` stored in ``outcomes.npz`` (``{}`` when there is no file)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for name in data.files:
            probe, _, key = name.partition(_SEP)
            out.setdefault(probe, {})[key] = data[name]
    return out


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md, outcomes.npz (the per-image outcomes a study reads, kept out of
    report.json to keep it small) and the plots (leakage.png and each probe's own) into ``out_dir``
    atomically; returns the paths written."""
    out = Path(out_dir)
    with atomic_directory(out, last="report.json") as tmp:
        data = _jsonable({k: v for k, v in report.items() if k != "outcomes"})
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False))
        (tmp / "report.md").write_text(render_markdown(data))
        written = ["report.json", "report.md"]
        if report.get("outcomes"):
            save_outcomes(report["outcomes"], tmp / "outcomes.npz")
            written.append("outcomes.npz")
        if plots:
            if plot_leakage(data, tmp / "leakage.png"):
                written.append("leakage.png")
            for probe, cols in data["probes"].items():
                if cols:
                    written += _probe(probe).plots(data, cols, tmp)
    return {name: out / name for name in written}


def log_wandb(report: dict, files: dict[str, Path], out_dir: str | os.PathLike, project: str = "masktrain",
              mode: str = "offline", name: str | None = None, group: str | None = None) -> str:
    """Log the summary table, per-probe tables and plots to W&B (never prompts; files under ``out_dir``).
    Returns the W&B run directory."""
    os.environ.setdefault("WANDB_MODE", mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    run = wandb.init(project=project, dir=str(out_dir), mode=os.environ["WANDB_MODE"], name=name, group=group,
                     job_type="evaluate", config=_jsonable(report.get("config", {})), reinit="finish_previous")
    try:
        data = _jsonable({k: v for k, v in report.items() if k != "outcomes"})
        rows = summary_rows(data)
        cols = list(dict.fromkeys(c for r in rows for c in r if c != "flags")) + ["flags"]
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        payload: dict[str, Any] = {"evaluation/summary": table}
        for probe in report["probes"]:
            sub = [[r.get(c) for c in cols] for r in rows if r["probe"] == probe]
            payload[f"evaluation/{probe}"] = wandb.Table(columns=cols, data=sub)
        for fname, path in files.items():
            if fname.endswith(".png"):
                payload[f"evaluation/{Path(fname).stem}"] = wandb.Image(str(path))
        for probe, by_key in data["probes"].items():
            payload.update(_probe(probe).wandb_media(data, by_key, files))
        run.log(payload)
        run.summary.update({f"{r['probe']}/{r['key']}/{r['subset']}": r["value"] for r in rows})
        return str(run.dir)
    finally:
        run.finish()
