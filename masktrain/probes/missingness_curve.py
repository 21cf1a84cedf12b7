"""``missingness_curve``: accuracy, prediction entropy and the share of the most frequent
predicted class as 0–100% of the image is removed in random patches, per method.

A model biased by the fill collapses onto one class (share -> 1) long before the
content is gone; an unbiased one drifts towards uniform predictions (entropy -> log2 K).
Masks come from the ``patches`` generator with exact fractions, drawn once for all rows.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from masktrain import stats
from masktrain.masks import make_keep_masks
from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, predict, register_probe

DEFAULTS = {"fractions": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "grid": 8}


def options(ctx: ProbeContext) -> dict:
    return {**DEFAULTS, **ctx.opts("missingness_curve")}


def keep_masks(ctx: ProbeContext, fraction: float, step: int) -> torch.Tensor:
    """Keep masks ``(N, 1, H, W)`` for all rows (same on every rank), patches of side H / grid."""
    key = f"missingness/{fraction}"
    if key not in ctx.cache:
        patch = max(1, math.ceil(ctx.size[0] / int(options(ctx)["grid"])))
        ctx.cache[key] = make_keep_masks("patches", len(ctx.labels), ctx.size, ctx.generator(stream=303, step=step), "cpu",
                                         patch_size=patch, fraction=(fraction, fraction))
    return ctx.cache[key]


@register_probe
class MissingnessCurve(Probe):
    name = "missingness_curve"
    needs_object_masks = False

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        method = ctx.method(key)
        records = {}
        for step, f in enumerate(options(ctx)["fractions"]):
            keep_all = keep_masks(ctx, float(f), step)
            entropies = []
            if method.identity_when_nothing_removed and bool(keep_all[ctx.shard].all()):
                # Nothing removed (fraction 0): the model sees the unmasked image, whose logits are known.
                p = ctx.cache["clean_logits"].softmax(dim=1)
                records[f"{step}/pred"] = ctx.cache["clean_logits"].argmax(dim=1)
                records[f"{step}/entropy"] = -(p * p.clamp_min(1e-12).log2()).sum(dim=1)
                continue

            def run(rows):
                images, keep = ctx.to_device(ctx.images[rows], keep_all[rows])
                g = torch.Generator(device=ctx.device).manual_seed(ctx.seed * 1000 + 503 * step + int(rows[0]))
                logits = method.logits(ctx.model, images, keep, g).float()
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
        for step, f in enumerate(options(ctx)["fractions"]):
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
        fr = np.array([p["fraction"] for p in points])
        # Headline: area under the accuracy curve = trapezoid weights over the removed fraction,
        # applied per sample so the bootstrap interval is of the same number.
        w = np.ones(len(fr))
        if len(fr) > 1 and fr[-1] > fr[0]:
            w = np.zeros(len(fr))
            d = np.diff(fr) / 2
            w[:-1] += d
            w[1:] += d
        w = w / w.sum()
        hits = np.stack([records[f"{s}/pred"][rows] == labels for s in range(len(points))], axis=1).astype(np.float64)
        per_sample_auc = hits @ w if len(labels) else np.zeros(0)
        entry = stats.mean_value(per_sample_auc, labels, k, 1.0 / k, ctx.class_names, subset, ctx.n_boot, ctx.seed)
        entry.update(metric="area under the accuracy curve (mean accuracy over removed fraction)", curve=points, flags=[])
        return entry
