"""``shape_only``: class-neutral donor content with a test object's silhouette removed.

Accuracy on the silhouette's class above chance means the model reads the hole's shape.
Control: the same donor with the silhouette of a random *other* class, scored against
the original label. Two-sided score: mutual information between silhouette class and
prediction, with a permutation p-value (a model that reads the shape and *avoids* the
class has low accuracy but high MI). Fills that barely contrast with the donor are
flagged ``low_contrast``: such a probe cannot see shape, whatever the model.
"""
from __future__ import annotations

import numpy as np
import torch

from masktrain import stats
from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, difference_entry, predict, register_probe
from masktrain.probes.inputs import donor, fill_contrast, other_class_partner, silhouette_keep

DEFAULTS = {"donors": ["background", "grey", "noise"], "low_contrast_threshold": 0.05, "n_permutations": 1000, "alpha": 0.05}


def options(ctx: ProbeContext) -> dict:
    return {**DEFAULTS, **ctx.opts("shape_only")}


def partners(ctx: ProbeContext) -> torch.Tensor:
    """Row of the other-class silhouette used by the control, per row ``(N,)`` (same on every rank)."""
    if "shape_only/partner" not in ctx.cache:
        ctx.cache["shape_only/partner"] = other_class_partner(ctx.labels, ctx.generator(stream=202))
    return ctx.cache["shape_only/partner"]


def shape_only_inputs(ctx: ProbeContext, donor_name: str, rows: torch.Tensor, control: bool = False):
    """Device tensors ``(donors (b,3,H,W), keep (b,1,H,W))`` for a batch of global rows."""
    objects = ctx.require_objects("shape_only")
    source = partners(ctx)[rows] if control else rows
    donors, obj = ctx.to_device(donor(ctx, donor_name)[rows], objects[source])
    return donors, silhouette_keep(obj)


def input_seed(ctx: ProbeContext, donor_index: int, control: bool, rows: torch.Tensor) -> int:
    """Seed of the fill's generator for a batch of shape-only inputs (``linear_probe`` uses the same,
    so its features are of exactly the inputs ``shape_only`` scores)."""
    return ctx.seed * 1000 + 31 * donor_index + int(control) + int(rows[0])


def features_key(method: str, donor_name: str) -> str:
    """Cache key of the pooled features of the (non-control) shape-only inputs ``linear_probe`` reads."""
    return f"shape_only/features/{method}/{donor_name}"


@register_probe
class ShapeOnly(Probe):
    name = "shape_only"

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        from masktrain.probes.linear_probe import options as linear_options

        method = ctx.method(key)
        records: dict[str, torch.Tensor] = {}
        # The linear probe reads pooled features of one donor's inputs: take them from the same
        # forward pass that gives the logits here instead of running the model again.
        later = "linear_probe" in ctx.probes and ctx.probes.index("linear_probe") > ctx.probes.index(self.name)
        keep_features = linear_options(ctx)["donor"] if later else None
        for d, name in enumerate(options(ctx)["donors"]):
            for control in (False, True):
                contrast: list[torch.Tensor] = []
                pixel: list[torch.Tensor] = []
                features: list[torch.Tensor] = []
                with_features = not control and name == keep_features

                def run(rows, control=control, with_features=with_features):
                    donors, keep = shape_only_inputs(ctx, name, rows, control)
                    g = torch.Generator(device=ctx.device).manual_seed(input_seed(ctx, d, control, rows))
                    if not control:
                        c, p = fill_contrast(method, donors, keep, torch.Generator(device=ctx.device).manual_seed(int(rows[0])))
                        contrast.append(c)
                        pixel.append(p)
                    if with_features:
                        feats, logits = method.features_and_logits(ctx.model, donors, keep, g)
                        features.append(feats.float().flatten(1).cpu())
                        return logits
                    return method.logits(ctx.model, donors, keep, g)

                suffix = "control" if control else "pred"
                records[f"{name}/{suffix}"] = predict(ctx, run).argmax(dim=1)
                if not control:
                    records[f"{name}/contrast"] = torch.cat(contrast) if contrast else torch.zeros(0)
                    records[f"{name}/pixel_diff"] = torch.cat(pixel) if pixel else torch.zeros(0)
                if with_features:
                    ctx.cache[features_key(key, name)] = torch.cat(features) if features else torch.zeros(0, 1)
        records["partner_label"] = ctx.labels[partners(ctx)[ctx.shard]]
        return records

    def summarise(self, ctx, key, records, rows, subset):
        opts = options(ctx)
        labels = records["label"][rows]
        per_donor = {}
        for i, name in enumerate(opts["donors"]):
            per_donor[name] = self._donor_entry(ctx, key, name, records, rows, labels, subset, opts, seed=ctx.seed + i)
        primary = dict(per_donor[opts["donors"][0]])
        primary["donor"] = opts["donors"][0]
        primary["donors"] = per_donor
        primary["flags"] = [f"{flag} (donor={name})" for name, e in per_donor.items() for flag in e["flags"]]
        return primary

    def _donor_entry(self, ctx, key, name, records, rows, labels, subset, opts, seed):
        k = ctx.num_classes
        pred, ctrl = records[f"{name}/pred"][rows], records[f"{name}/control"][rows]
        entry = accuracy_entry(ctx, labels, pred, subset)
        entry["metric"] = "accuracy on the silhouette's class"
        entry["control"] = accuracy_entry(ctx, labels, ctrl, subset)
        entry["control"]["metric"] = "accuracy on the original class, silhouette from another class"
        entry["leakage"] = difference_entry(ctx, pred == labels, ctrl == labels, labels, subset, seed)
        entry["mi"] = stats.mi_permutation_test(labels, pred, k, opts["n_permutations"], seed, n_boot=min(ctx.n_boot, 500))
        entry["control"]["mi"] = stats.mi_permutation_test(labels, ctrl, k, opts["n_permutations"], seed + 1, n_boot=min(ctx.n_boot, 500))
        value, (lo, hi) = entry["value"], entry["ci95"]
        significant = entry["mi"]["p_value"] < opts["alpha"]
        if not significant:
            direction = "none"
        elif lo > entry["chance"]:
            direction = "toward"  # predicts the silhouette's class
        elif hi < entry["chance"]:
            direction = "away"  # reads the shape and avoids its class
        else:
            direction = "other"  # depends on the shape, but not via its own class
        entry["reads_shape"] = {"significant": bool(significant), "direction": direction, "alpha": opts["alpha"]}
        contrast = records[f"{name}/contrast"][rows]
        pixel = records[f"{name}/pixel_diff"][rows]
        flags = []
        if contrast.size and np.isfinite(contrast).all():
            mean_contrast = float(contrast.mean())
            entry["fill_contrast"] = {"value": mean_contrast, "pixel_diff": float(pixel.mean()), "threshold": opts["low_contrast_threshold"]}
            if mean_contrast < opts["low_contrast_threshold"]:
                flags.append(f"low_contrast: the {key} fill is nearly invisible on this donor (contrast {mean_contrast:.3f}); this probe cannot see shape")
        else:
            entry["fill_contrast"] = {"value": None, "pixel_diff": None, "note": "method has no pixel fill"}
        entry["flags"] = flags
        return entry
