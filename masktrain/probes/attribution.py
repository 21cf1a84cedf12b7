"""``attribution``: how faithful perturbation attributions are when "removed" means a masking method.

For each attribution method (``methods``: occlusion, LIME, KernelSHAP, ablation; Captum, see
:mod:`masktrain.attribution`) × removal method (the evaluation's ``methods``, ``layer``
included), every image gets an attribution map for its true class. The map is judged two ways:

- **MoRF / LeRF** (ROAD, Rong et al. 2022): remove a growing fraction of pixels, most relevant
  first (MoRF) or least relevant first (LeRF), with the evaluation method ``eval_method``
  (ROAD's ``noisy_linear`` by default, the same for every key so that keys compare), and
  record accuracy and the true-class probability. Areas are normalised trapezoids (the mean
  height over ``fractions``). The headline is the **gap** = LeRF area − MoRF area of the
  true-class probability: large when the top pixels carry the evidence and the bottom ones
  do not; 0 for a map that is no better than any other order.
- **Agreement with the object** (the synthetic data's ground truth for where class evidence
  is): ``mass_inside`` = share of ``|attribution|`` on the object mask, ``topk_iou`` = IoU of
  the object with the map's top-k pixels by |attribution|, k = the object's area.

Every number is a per-image mean with a percentile-bootstrap interval. Attributions are
expensive (``n_samples`` forward passes per image for LIME), so only the first ``n_images``
rows of the evaluation set are explained; ``n`` says how many. The probe is not among the
default probes: ask for it with ``probes=[attribution]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from masktrain import stats
from masktrain.attribution import (ATTRIBUTIONS, AttributionConfig, DEFAULT_FRACTIONS, attribute, curve_area, mass_inside,
                                   removal_curves, topk_iou)
from masktrain.attribution.features import FEATURES
from masktrain.errors import UserError
from masktrain.methods import get_method
from masktrain.probes.base import Probe, ProbeContext, fmt_ci, fmt_num, register_probe

NAME = "attribution"


@dataclass
class Options:
    methods: list = field(default_factory=lambda: ["occlusion", "lime"])  # attribution methods (masktrain.attribution.ATTRIBUTIONS)
    n_images: int = 50            # explain the first n rows only (cost: n_samples forwards per image and method)
    n_samples: int = 500          # LIME / KernelSHAP perturbations per image
    features: str = "grid"        # grid (patch cells) or slic (superpixels) for LIME / KernelSHAP / ablation
    patch: Any = None             # grid cell side in px (null: image side / 8); occlusion window unless `window`
    superpixels: int = 50         # SLIC segments (features=slic)
    window: Any = None            # occlusion window side (null: patch)
    stride: Any = None            # occlusion stride (null: window / 2)
    output: str = "logits"        # what the attribution explains: logits or probs of the true class
    perturbations_per_eval: int = 100  # perturbations per forward pass
    fractions: list = field(default_factory=lambda: list(DEFAULT_FRACTIONS))  # removed fractions of the MoRF/LeRF curves
    eval_method: str = "noisy_linear"  # the removal of the MoRF/LeRF evaluation (ROAD's imputation)
    eval_options: dict = field(default_factory=dict)  # options of eval_method's fill, e.g. {noise_std: 0.0}
    removal_options: dict = field(default_factory=dict)  # fill options of the removal methods (e.g. noisy_linear's noise_std)
    n_examples: int = 4           # images shown in attribution_maps.png
    example_side: int = 48        # maps and images are stored in report.json at most this many px per side


@register_probe
class Attribution(Probe):
    name = NAME
    Options = Options
    needs_object_masks = True
    run_by_default = False  # minutes per key: only with probes=[attribution]
    key_kind = "attribution/method"
    headline = "MoRF/LeRF gap: LeRF − MoRF area of the true-class probability (removal: eval_method)"
    study_headline = "MoRF/LeRF gap (true-class probability)"
    percent = False
    reference = "zero"
    summary_panel = False  # its own figures: attribution_maps.png, attribution_curves.png
    study_spreads = ("mass_inside", "topk_iou")

    # --- options -----------------------------------------------------------------------------
    def parse_options(self, raw):
        o = super().parse_options(raw)
        o.methods = [str(m) for m in (o.methods or [])]
        if not o.methods:
            raise UserError(f"probe_options.{NAME}.methods is empty; choose from {sorted(ATTRIBUTIONS)}")
        for m in o.methods:
            if m not in ATTRIBUTIONS:
                raise UserError(f"probe_options.{NAME}.methods: attribution method {m!r} is unknown; choose from {sorted(ATTRIBUTIONS)}")
        if o.features not in FEATURES:
            raise UserError(f"probe_options.{NAME}.features={o.features!r} is unknown; choose one of {sorted(FEATURES)}")
        if o.output not in ("logits", "probs"):
            raise UserError(f"probe_options.{NAME}.output={o.output!r}; choose logits or probs")
        for key in ("n_images", "n_samples", "superpixels", "perturbations_per_eval", "example_side"):
            if not (isinstance(getattr(o, key), int) and getattr(o, key) >= 1):
                raise UserError(f"probe_options.{NAME}.{key} must be an integer >= 1 (got {getattr(o, key)!r})")
        for key in ("patch", "window", "stride"):
            v = getattr(o, key)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise UserError(f"probe_options.{NAME}.{key} must be null or an integer >= 1 (got {v!r})")
        o.fractions = [float(f) for f in o.fractions]
        if len(o.fractions) < 2 or any(not 0 <= f <= 1 for f in o.fractions) or sorted(o.fractions) != o.fractions:
            raise UserError(f"probe_options.{NAME}.fractions must be >= 2 increasing values in [0, 1] (got {o.fractions})")
        o.eval_options = dict(o.eval_options or {})
        o.removal_options = dict(o.removal_options or {})
        get_method(o.eval_method, **o.eval_options)  # unknown method or option: a UserError here, before any work
        return o

    def keys(self, ctx, methods):
        return [f"{a}/{m}" for a in ctx.opts(NAME).methods for m in methods]

    def _config(self, ctx) -> AttributionConfig:
        o = ctx.opts(NAME)
        patch = o.patch or max(1, min(ctx.size) // 8)
        window = o.window or patch
        return AttributionConfig(features=o.features, patch=patch, n_segments=o.superpixels, window=window,
                                 stride=o.stride or max(1, window // 2), n_samples=o.n_samples,
                                 perturbations_per_eval=o.perturbations_per_eval, output=o.output)

    # --- numbers ------------------------------------------------------------------------------
    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        o = ctx.opts(NAME)
        attribution, removal = key.split("/", 1)
        objects = ctx.require_objects(NAME)
        cfg = self._config(ctx)
        if o.removal_options:
            try:
                get_method(removal, **o.removal_options)
            except UserError as exc:
                raise UserError(f"probe_options.{NAME}.removal_options={o.removal_options} with methods={removal!r}: {exc}") from exc
        shard = ctx.shard
        todo = shard[shard < o.n_images]  # the first n_images rows of the evaluation set, wherever they are sharded
        nf, side = len(o.fractions), self._side(ctx)
        out = {f"{order}/{what}": torch.full((len(shard), nf), float("nan")) for order in ("morf", "lerf") for what in ("correct", "prob")}
        out.update(mass_inside=torch.full((len(shard),), float("nan")), topk_iou=torch.full((len(shard),), float("nan")),
                   map=torch.full((len(shard), *side), float("nan")))
        position = {int(r): i for i, r in enumerate(shard.tolist())}
        for rows in torch.split(todo, max(1, ctx.batch_size)):
            images, labels, obj = ctx.to_device(ctx.images[rows], ctx.labels[rows], objects[rows])
            seeds = [k >> 1 for k in ctx.random(NAME, key, rows).keys]  # per image: the same map whatever the batch or rank
            maps = attribute(ctx.model, images, labels, attribution, removal, seeds=seeds, config=cfg, mean=ctx.mean,
                             removal_options=o.removal_options)
            at = torch.tensor([position[int(r)] for r in rows])
            for order in ("morf", "lerf"):
                curves = removal_curves(ctx.model, images, labels, maps, order, o.eval_method, o.fractions,
                                        generator=ctx.random(NAME, f"{key}/{order}", rows), mean=ctx.mean,
                                        method_options=o.eval_options)
                out[f"{order}/correct"][at] = curves["correct"].float().cpu()
                out[f"{order}/prob"][at] = curves["prob"].float().cpu()
            out["mass_inside"][at] = mass_inside(maps, obj).cpu()
            out["topk_iou"][at] = topk_iou(maps, obj, generator=ctx.random(NAME, f"{key}/topk", rows)).cpu()
            out["map"][at] = F.adaptive_avg_pool2d(maps[:, None].float(), side)[:, 0].cpu()
        return out

    @staticmethod
    def _side(ctx) -> tuple[int, int]:
        s = ctx.opts(NAME).example_side
        return min(s, ctx.size[0]), min(s, ctx.size[1])

    def summarise(self, ctx, key, records, rows, subset):
        o = ctx.opts(NAME)
        rows = rows & np.isfinite(records["morf/prob"]).all(1)  # the explained rows (the first n_images)
        labels = records["label"][rows]
        k, names, nb = ctx.num_classes, ctx.class_names, ctx.n_boot
        fr = torch.tensor(o.fractions)

        def mean(values, chance, salt):
            v = np.asarray(values, dtype=np.float64)
            ok = np.isfinite(v)
            return stats.mean_value(v[ok], labels[ok], k, chance, names, subset, nb, ctx.seed + salt)

        def area(name):
            return curve_area(torch.from_numpy(records[name][rows]), fr).numpy() if rows.any() else np.zeros(0)

        areas = {f"{order}/{what}": area(f"{order}/{what}") for order in ("morf", "lerf") for what in ("correct", "prob")}
        entry = mean(areas["lerf/prob"] - areas["morf/prob"], 0.0, 0)
        entry["metric"] = f"LeRF - MoRF area of the true-class probability, removal {o.eval_method}"
        entry["gap_accuracy"] = mean(areas["lerf/correct"] - areas["morf/correct"], 0.0, 1)
        for order in ("morf", "lerf"):
            entry[order] = {
                "accuracy_area": mean(areas[f"{order}/correct"], 1.0 / k, 2),
                "prob_area": mean(areas[f"{order}/prob"], 1.0 / k, 3),
                "curve": [{"fraction": float(f), "accuracy": _nanmean(records[f"{order}/correct"][rows][:, j]),
                           "prob": _nanmean(records[f"{order}/prob"][rows][:, j])} for j, f in enumerate(o.fractions)],
            }
        obj_share = ctx.objects.flatten(1).float().mean(1).numpy()[rows]
        entry["mass_inside"] = mean(records["mass_inside"][rows], float(obj_share.mean()) if rows.any() else None, 4)
        entry["mass_inside"]["chance_note"] = "chance = mean object area share (a map uniform over the image)"
        entry["topk_iou"] = mean(records["topk_iou"][rows], None, 5)
        entry.update(attribution=key.split("/", 1)[0], removal=key.split("/", 1)[1], eval_method=o.eval_method,
                     eval_options=dict(o.eval_options), fractions=list(o.fractions), flags=[])
        if subset == "all":
            entry["examples"] = self._examples(ctx, records, rows)
        return entry

    def outcomes(self, ctx, key, records, rows):
        """Per explained image: LeRF − MoRF area of its true-class probability; NaN for the images not explained."""
        o = ctx.opts(NAME)
        rows = rows & np.isfinite(records["morf/prob"]).all(1)
        out = np.full(rows.shape[0], np.nan)
        if rows.any():
            fr = torch.tensor(o.fractions)
            lerf = curve_area(torch.from_numpy(records["lerf/prob"][rows]), fr).numpy()
            morf = curve_area(torch.from_numpy(records["morf/prob"][rows]), fr).numpy()
            out[rows] = lerf - morf
        return out

    def _examples(self, ctx, records, rows) -> dict:
        """A few images and their maps, downsampled to ``example_side``, for the figure."""
        o = ctx.opts(NAME)
        pick = np.flatnonzero(rows)[: o.n_examples]
        side = self._side(ctx)
        imgs = F.adaptive_avg_pool2d(ctx.images[torch.as_tensor(pick, dtype=torch.long)].float(), side) if len(pick) else torch.zeros(0, 3, *side)
        objs = F.adaptive_avg_pool2d(ctx.objects[torch.as_tensor(pick, dtype=torch.long)].float(), side) if len(pick) else torch.zeros(0, 1, *side)
        return {"rows": pick.tolist(), "labels": [ctx.class_names[int(records["label"][r])] for r in pick],
                "images": np.round(imgs.permute(0, 2, 3, 1).numpy(), 3).tolist(),
                "objects": np.round(objs[:, 0].numpy(), 2).tolist(),
                "maps": np.round(records["map"][pick].astype(np.float64), 5).tolist()}

    # --- presentation ----------------------------------------------------------------------------
    def report_rows(self, cols):
        lines = ["| attribution/method | subset | gap (prob) | 95% CI | MoRF area | LeRF area | gap (acc) | mass inside | 95% CI "
                 "| (object share) | top-k IoU | 95% CI | n |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                m = e["mass_inside"]
                lines.append(f"| {key} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | "
                             f"{fmt_num(e['morf']['prob_area']['value'])} | {fmt_num(e['lerf']['prob_area']['value'])} | "
                             f"{fmt_num(e['gap_accuracy']['value'])} | {fmt_num(m['value'])} | {fmt_ci(m['ci95'])} | "
                             f"{fmt_num(m['chance'])} | {fmt_num(e['topk_iou']['value'])} | {fmt_ci(e['topk_iou']['ci95'])} | {e['n']} |")
        first = next(iter(cols.values()))
        lines += ["", f"MoRF/LeRF removal: `{first['eval_method']}`{' ' + str(first['eval_options']) if first.get('eval_options') else ''} at fractions "
                  f"{first['fractions']}; areas are the mean true-class probability over them. Maps: attribution_maps.png."]
        return lines

    def summary_columns(self, entry):
        return {"morf_area": entry["morf"]["prob_area"]["value"], "lerf_area": entry["lerf"]["prob_area"]["value"],
                "mass_inside": entry["mass_inside"]["value"], "topk_iou": entry["topk_iou"]["value"]}

    def plots(self, report, cols, directory: Path) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        keys = [k for k in cols if cols[k].get("examples", {}).get("rows")]
        if keys:
            ex0 = cols[keys[0]]["examples"]
            n = len(ex0["rows"])
            fig, axes = plt.subplots(n, 1 + len(keys), figsize=(1.9 * (1 + len(keys)), 2.0 * n), squeeze=False)
            for i in range(n):
                ax = axes[i][0]
                ax.imshow(np.clip(np.array(ex0["images"][i]), 0, 1))
                ax.contour(np.array(ex0["objects"][i]), levels=[0.5], colors="lime", linewidths=0.8)
                ax.set_title(f"row {ex0['rows'][i]}: {ex0['labels'][i]}", fontsize=7)
                for j, key in enumerate(keys):
                    m = np.array(cols[key]["examples"]["maps"][i], dtype=float)
                    lim = np.nanmax(np.abs(m)) or 1.0
                    ax = axes[i][1 + j]
                    ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
                    ax.contour(np.array(ex0["objects"][i]), levels=[0.5], colors="k", linewidths=0.6)
                    if i == 0:
                        ax.set_title(key, fontsize=8)
            for ax in axes.flat:
                ax.set_xticks([]), ax.set_yticks([])
            fig.suptitle("attribution maps (red: for the true class, blue: against; contour: object)", fontsize=9)
            fig.tight_layout()
            fig.savefig(directory / "attribution_maps.png", dpi=110)
            plt.close(fig)
            written.append("attribution_maps.png")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, entry in cols.items():
            for ax, what in zip(axes, ("prob", "accuracy")):
                fr = [100 * p["fraction"] for p in entry["morf"]["curve"]]
                line = ax.plot(fr, [p[what] for p in entry["morf"]["curve"]], marker="o", label=f"{key} MoRF")[0]
                ax.plot(fr, [p[what] for p in entry["lerf"]["curve"]], marker="s", ls="--", color=line.get_color(), label=f"{key} LeRF")
        first = next(iter(cols.values()))
        for ax, what in zip(axes, ("true-class probability", "accuracy")):
            ax.set_xlabel(f"% of pixels removed ({first['eval_method']})")
            ax.set_title(what)
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(directory / "attribution_curves.png", dpi=110)
        plt.close(fig)
        written.append("attribution_curves.png")
        return written

    def wandb_media(self, report, cols, files):
        import wandb

        media = {}
        for key, entry in cols.items():
            ex = entry.get("examples") or {}
            for i, row in enumerate(ex.get("rows", [])):
                m = np.array(ex["maps"][i], dtype=float)
                lim = np.nanmax(np.abs(m)) or 1.0
                rgb = np.stack([np.clip(m / lim, 0, 1), np.zeros_like(m), np.clip(-m / lim, 0, 1)], -1)  # red +, blue -
                pair = np.concatenate([np.clip(np.array(ex["images"][i]), 0, 1), rgb], 1)
                media[f"evaluation/attribution/{key}/row{row}"] = wandb.Image((255 * pair).astype(np.uint8),
                                                                              caption=f"{ex['labels'][i]}: image | {key} map")
        return media

    def study_cell(self, entry):
        cell = super().study_cell(entry)
        cell.update(mass_inside=entry["mass_inside"]["value"], topk_iou=entry["topk_iou"]["value"])
        return cell


def _nanmean(v: np.ndarray) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None
