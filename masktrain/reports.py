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
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

HEADLINE = {
    "object_removal": "leakage = acc(silhouette) − acc(bbox)",
    "shape_only": "accuracy on the silhouette's class (shape-only input)",
    "linear_probe": "cross-validated linear-probe accuracy (shape-only features)",
    "mask_only": "accuracy from the keep mask alone",
    "missingness_curve": "area under the accuracy curve (0–100% removed)",
}


def _yerr(vals: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Error-bar lengths (2, n), clipped at 0: a percentile-bootstrap interval need not contain
    the point estimate (e.g. a small-n difference), and matplotlib rejects negative lengths."""
    return [np.clip(np.nan_to_num(vals - lo), 0, None), np.clip(np.nan_to_num(hi - vals), 0, None)]


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci: Iterable | None) -> str:
    if not ci:
        return "–"
    lo, hi = list(ci)
    return f"[{_num(lo)}, {_num(hi)}]"


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
                if probe == "shape_only":
                    mi = e.get("mi", {})
                    row.update(mi_bits=mi.get("value"), mi_p=mi.get("p_value"), control=e.get("control", {}).get("value"),
                               reads_shape=e.get("reads_shape", {}).get("direction"))
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
        lines += [f"## {probe}", "", f"Headline: {HEADLINE.get(probe, 'value')}. Intervals are 95%.", ""]
        kind = next(iter(cols.values()), {}).get("key_kind", "method")
        if probe == "shape_only":
            lines.append(f"| {kind} | donor | subset | accuracy | 95% CI | control | MI (bits) | MI p | reads shape | contrast | n |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for key, entry in cols.items():
                for e in (entry, entry["correct"]):
                    for donor, d in e["donors"].items():
                        lines.append(f"| {key} | {donor} | {d['subset']} | {_num(d['value'])} | {_ci(d['ci95'])} | "
                                     f"{_num(d['control']['value'])} | {_num(d['mi']['value'])} | {_num(d['mi']['p_value'])} | "
                                     f"{d['reads_shape']['direction']} | {_num(d['fill_contrast']['value'])} | {d['n']} |")
        elif probe == "object_removal":
            lines.append(f"| {kind} | subset | leakage | 95% CI | acc silhouette | acc bbox | acc broken | n |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for key, entry in cols.items():
                for e in (entry, entry["correct"]):
                    a = e["accuracy"]
                    lines.append(f"| {key} | {e['subset']} | {_num(e['value'])} | {_ci(e['ci95'])} | {_num(a['silhouette']['value'])} | "
                                 f"{_num(a['bbox']['value'])} | {_num(a['broken']['value'])} | {e['n']} |")
        elif probe == "missingness_curve":
            lines.append(f"| {kind} | subset | AUC | 95% CI | " + " | ".join(
                f"acc@{int(100 * p['fraction'])}%" for p in next(iter(cols.values()))["curve"]) + " | top share @100% | n |")
            npts = len(next(iter(cols.values()))["curve"])
            lines.append("|---|---|---|---|" + "---|" * npts + "---|---|")
            for key, entry in cols.items():
                for e in (entry, entry["correct"]):
                    accs = " | ".join(_num(p["accuracy"]["value"]) for p in e["curve"])
                    share = e["curve"][-1]["top_class_share"]
                    lines.append(f"| {key} | {e['subset']} | {_num(e['value'])} | {_ci(e['ci95'])} | {accs} | "
                                 f"{_num(share['value'])} ({share['top_class']}) | {e['n']} |")
        else:
            lines.append(f"| {kind} | subset | value | 95% CI | chance | n |")
            lines.append("|---|---|---|---|---|---|")
            for key, entry in cols.items():
                for e in (entry, entry["correct"]):
                    lines.append(f"| {key} | {e['subset']} | {_num(e['value'])} | {_ci(e['ci95'])} | {_num(e['chance'])} | {e['n']} |")
        lines.append("")
        warn = [f"{key}: {flag}" for key, entry in cols.items() for flag in entry.get("flags", [])]
        lines += [f"> ⚠️ {w}" for w in warn]
        if warn:
            lines.append("")
    lines += ["Per-class values, intervals for every number and the run configuration are in `report.json` "
              "(schema: docs/probes.md).", ""]
    return "\n".join(lines)


def plot_missingness(report: dict, path: Path) -> bool:
    cols = report["probes"].get("missingness_curve")
    if not cols:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    k = report["dataset"]["num_classes"]
    for key, entry in cols.items():
        fr = [100 * p["fraction"] for p in entry["curve"]]
        for ax, metric in zip(axes, ("accuracy", "entropy", "top_class_share")):
            vals = [p[metric]["value"] for p in entry["curve"]]
            lo = [p[metric]["ci95"][0] for p in entry["curve"]]
            hi = [p[metric]["ci95"][1] for p in entry["curve"]]
            line = ax.plot(fr, vals, marker="o", label=key)[0]
            ax.fill_between(fr, lo, hi, color=line.get_color(), alpha=0.15)
    refs = {"accuracy": 1 / k, "entropy": math.log2(k), "top_class_share": 1 / k}
    for ax, (metric, ref) in zip(axes, refs.items()):
        ax.axhline(ref, color="grey", ls="--", lw=1, label="chance" if metric == "accuracy" else "uniform")
        ax.set_xlabel("% of image removed (random patches)")
        ax.set_title(metric.replace("_", " ") + (" (bits)" if metric == "entropy" else ""))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Missingness curves — {report['model']['name']} (subset: all, n = {report['dataset']['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_leakage(report: dict, path: Path) -> bool:
    """Headline value per probe and key with 95% intervals, against chance (both subsets)."""
    cols = {p: c for p, c in report["probes"].items() if p != "missingness_curve"}
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
        ax.set_ylabel(HEADLINE.get(probe, "value"), fontsize=7)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PLOTS = {"missingness_curves.png": plot_missingness, "leakage.png": plot_leakage}


def _move_into(tmp: Path, out: Path) -> None:
    """Move a finished report directory into place; report.json goes last so it marks completion."""
    if not out.exists():
        os.replace(tmp, out)
        return
    names = sorted(os.listdir(tmp), key=lambda n: n == "report.json")
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    shutil.rmtree(tmp, ignore_errors=True)


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md and the plots into ``out_dir`` atomically; returns the paths written."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        data = _jsonable(report)
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False))
        (tmp / "report.md").write_text(render_markdown(data))
        written = ["report.json", "report.md"]
        if plots:
            for name, fn in PLOTS.items():
                if fn(data, tmp / name):
                    written.append(name)
        _move_into(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        rows = summary_rows(_jsonable(report))
        cols = ["probe", "key", "subset", "value", "ci_lo", "ci_hi", "n", "chance", "mi_bits", "mi_p", "control", "reads_shape", "flags"]
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        payload: dict[str, Any] = {"evaluation/summary": table}
        for probe in report["probes"]:
            sub = [[r.get(c) for c in cols] for r in rows if r["probe"] == probe]
            payload[f"evaluation/{probe}"] = wandb.Table(columns=cols, data=sub)
        for fname, path in files.items():
            if fname.endswith(".png"):
                payload[f"evaluation/{Path(fname).stem}"] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update({f"{r['probe']}/{r['key']}/{r['subset']}": r["value"] for r in rows})
        return str(run.dir)
    finally:
        run.finish()
