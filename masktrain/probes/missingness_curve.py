"""``missingness_curve``: accuracy, prediction entropy and the share of the most frequent
predicted class as 0–100% of the image is removed in random patches, per method.

A model biased by the fill collapses onto one class (share -> 1) long before the
content is gone; an unbiased one drifts towards uniform predictions (entropy -> log2 K).
Masks come from the ``patches`` generator with exact fractions, drawn once for all rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from masktrain import stats
from masktrain.masks import make_keep_masks
from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, fmt_ci, fmt_num, predict, register_probe

@dataclass
class Options:
    fractions: list = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # removed fraction per point
    grid: int = 8  # patches per side


NAME = "missingness_curve"


def keep_masks(ctx: ProbeContext, fraction: float) -> torch.Tensor:
    """Keep masks ``(N, 1, H, W)`` for all rows, patches of side H / grid, seeded per row
    (the same on every rank and for any batch size; the same for every method)."""
    key = f"{NAME}/keep/{fraction}"
    if key not in ctx.cache:
        patch = max(1, math.ceil(ctx.size[0] / int(ctx.opts(NAME).grid)))
        rows = torch.arange(len(ctx.labels))
        ctx.cache[key] = make_keep_masks("patches", len(ctx.labels), ctx.size, ctx.random(NAME, f"keep/{fraction}", rows, "cpu"),
                                         "cpu", patch_size=patch, fraction=(fraction, fraction))
    return ctx.cache[key]


@register_probe
class MissingnessCurve(Probe):
    name = NAME
    Options = Options
    needs_object_masks = False
    headline = "area under the accuracy curve (0–100% removed)"
    study_headline = "area under accuracy vs. fraction removed"
    percent = False
    summary_panel = False  # its own plot: missingness_curves.png

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        method = ctx.method(key)
        records = {}
        for step, f in enumerate(ctx.opts(self.name).fractions):
            keep_all = keep_masks(ctx, float(f))
            entropies = []
            if method.identity_when_nothing_removed and bool(keep_all[ctx.shard].all()):
                # Nothing removed (fraction 0): the model sees the unmasked image, whose logits are known.
                clean = ctx.shared.clean_logits()
                p = clean.softmax(dim=1)
                records[f"{step}/pred"] = clean.argmax(dim=1)
                records[f"{step}/entropy"] = -(p * p.clamp_min(1e-12).log2()).sum(dim=1)
                continue

            def run(rows, f=f):
                images, keep = ctx.to_device(ctx.images[rows], keep_all[rows])
                logits = method.logits(ctx.model, images, keep, ctx.random(self.name, f"{key}/{float(f)}", rows)).float()
                p = logits.softmax(dim=1)
                entropies.append((-(p * p.clamp_min(1e-12).log2()).sum(dim=1)).cpu())
                return logits

            records[f"{step}/pred"] = predict(ctx, run).argmax(dim=1)
            records[f"{step}/entropy"] = torch.cat(entropies) if entropies else torch.zeros(0)
        return records

    def summarise(self, ctx, key, records, rows, subset):
        k = ctx.num_classes
        labels = records["label"][rows]
        points = []
        for step, f in enumerate(ctx.opts(self.name).fractions):
            pred = records[f"{step}/pred"][rows]
            point = {"fraction": float(f), "accuracy": accuracy_entry(ctx, labels, pred, subset)}
            ent = records[f"{step}/entropy"][rows]
            point["entropy"] = stats.mean_value(ent, labels, k, math.log2(k), ctx.class_names, subset, ctx.n_boot, ctx.seed + step)
            point["entropy"]["unit"] = "bits (chance = uniform prediction)"
            counts = np.bincount(pred, minlength=k)
            top = int(counts.argmax()) if counts.sum() else 0
            share = stats.proportion(pred == top, labels, k, 1.0 / k, ctx.class_names, subset)
            share.update(top_class=ctx.class_names[top] if top < len(ctx.class_names) else str(top),
                         predicted_class_entropy=float(stats.entropy_bits(counts / max(counts.sum(), 1))))
            point["top_class_share"] = share
            points.append(point)
        per_sample_auc = self._per_sample_auc(ctx, records)[rows]
        entry = stats.mean_value(per_sample_auc, labels, k, 1.0 / k, ctx.class_names, subset, ctx.n_boot, ctx.seed)
        entry.update(metric="area under the accuracy curve (mean accuracy over removed fraction)", curve=points, flags=[])
        return entry

    def _per_sample_auc(self, ctx, records) -> np.ndarray:
        """Area under each image's accuracy curve ``(N,)``: trapezoid weights over the removed fraction,
        applied per sample so the bootstrap interval (and a study's) is of the headline itself."""
        fr = np.array([float(f) for f in ctx.opts(self.name).fractions])
        w = np.ones(len(fr))
        if len(fr) > 1 and fr[-1] > fr[0]:
            w = np.zeros(len(fr))
            d = np.diff(fr) / 2
            w[:-1] += d
            w[1:] += d
        w = w / w.sum()
        labels = records["label"]
        hits = np.stack([records[f"{s}/pred"] == labels for s in range(len(fr))], axis=1).astype(np.float64)
        return hits @ w

    def outcomes(self, ctx, key, records, rows):
        """Per image: the area under its accuracy curve (mean correctness over the removed fractions)."""
        out = self._per_sample_auc(ctx, records)
        out[~rows] = np.nan
        return out

    # --- presentation -----------------------------------------------------------------
    def report_rows(self, cols):
        kind = next(iter(cols.values()), {}).get("key_kind", self.key_kind)
        curve = next(iter(cols.values()))["curve"]
        lines = [f"| {kind} | subset | AUC | 95% CI | " + " | ".join(f"acc@{int(100 * p['fraction'])}%" for p in curve)
                 + " | top share @100% | n |", "|---|---|---|---|" + "---|" * len(curve) + "---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                accs = " | ".join(fmt_num(p["accuracy"]["value"]) for p in e["curve"])
                share = e["curve"][-1]["top_class_share"]
                lines.append(f"| {key} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | {accs} | "
                             f"{fmt_num(share['value'])} ({share['top_class']}) | {e['n']} |")
        return lines

    def plots(self, report, cols, directory: Path) -> list[str]:
        """``missingness_curves.png``: accuracy, entropy and top-class share against the removed fraction."""
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
        fig.savefig(directory / "missingness_curves.png", dpi=110)
        plt.close(fig)
        return ["missingness_curves.png"]
