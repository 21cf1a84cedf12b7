"""``shape_only``: class-neutral donor content with a test object's silhouette removed.

Accuracy on the silhouette's class above ``chance_independent`` means the model reads the
hole. Control: the same donor with an **area-matched disk** removed instead (same area and
centroid as the silhouette, no outline), so "reads the hole's size or place" is not counted
as "reads its outline". Two-sided score: mutual information between silhouette class and
prediction, with a permutation p-value (a model that reads the shape and *avoids* the class,
or maps it to another class, has low accuracy but high MI). The verdict (``reads_shape``)
combines the three tests in :meth:`masktrain.probes.base.Probe.verdict`. Fills that barely
contrast with the donor are flagged ``low_contrast``: such a probe cannot see shape, whatever the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from masktrain import stats
from masktrain.rng import derive_seed, name_key
from masktrain.probes.base import (Probe, ProbeContext, accuracy_entry, difference_entry, fmt_ci, fmt_num, fmt_spread,
                                   register_probe, study_keys, study_table, verdict_text)


@dataclass
class Options:
    donors: list = field(default_factory=lambda: ["background", "grey", "noise"])  # the first is the headline
    low_contrast_threshold: float = 0.05  # flag fills whose mean/std differ from the donor by less than this
    n_permutations: int = 10000  # of the MI test (p-values down to 1e-4, so Holm/BH can reject)
    alpha: float = 0.05


@register_probe
class ShapeOnly(Probe):
    name = "shape_only"
    Options = Options
    headline = "accuracy on the silhouette's class (shape-only input)"
    study_headline = "accuracy on the silhouette's class (donor: first shape_only donor)"
    study_spreads = ("mi_excess",)

    def parse_options(self, raw):
        opts = super().parse_options(raw)
        from masktrain.probes.inputs import DONORS

        opts.donors = list(opts.donors)
        for name in opts.donors:
            DONORS.get(name)
        return opts

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        records: dict[str, torch.Tensor] = {}
        for name in ctx.opts(self.name).donors:
            out = ctx.shared.shape_only(key, name, control=False)
            records[f"{name}/pred"] = out["logits"].argmax(dim=1)
            records[f"{name}/contrast"] = out["contrast"]
            records[f"{name}/pixel_diff"] = out["pixel_diff"]
            records[f"{name}/control"] = ctx.shared.shape_only(key, name, control=True)["logits"].argmax(dim=1)
        return records

    def summarise(self, ctx, key, records, rows, subset):
        opts = ctx.opts(self.name)
        labels = records["label"][rows]
        per_donor = {}
        for name in opts.donors:
            # Own seeds per (probe, key, donor, arm): no two tests share a permutation stream.
            seed = derive_seed(ctx.seed, name_key(self.name), name_key(key), name_key(name))
            per_donor[name] = self._donor_entry(ctx, key, name, records, rows, labels, subset, opts, seed=seed)
        primary = dict(per_donor[opts.donors[0]])
        primary["donor"] = opts.donors[0]
        primary["donors"] = per_donor
        primary["flags"] = [f"{flag} (donor={name})" for name, e in per_donor.items() for flag in e["flags"]]
        return primary

    def _donor_entry(self, ctx, key, name, records, rows, labels, subset, opts, seed):
        k = ctx.num_classes
        pred, ctrl = records[f"{name}/pred"][rows], records[f"{name}/control"][rows]
        entry = accuracy_entry(ctx, labels, pred, subset)
        entry["metric"] = "accuracy on the silhouette's class"
        entry["control"] = accuracy_entry(ctx, labels, ctrl, subset)
        entry["control"]["metric"] = "accuracy on the silhouette's class, area-matched disk removed instead (no outline)"
        entry["control"]["hole"] = "area_disk"
        entry["leakage"] = difference_entry(ctx, pred == labels, ctrl == labels, labels, subset, derive_seed(seed, 1))
        entry["leakage"]["p_value"] = stats.mcnemar(pred == labels, ctrl == labels)
        entry["mi"] = stats.mi_permutation_test(labels, pred, k, opts.n_permutations, derive_seed(seed, 2), n_boot=min(ctx.n_boot, 500))
        entry["control"]["mi"] = stats.mi_permutation_test(labels, ctrl, k, opts.n_permutations, derive_seed(seed, 3), n_boot=min(ctx.n_boot, 500))
        entry["accuracy_p_value"] = stats.binomial_greater(entry["k"], entry["n"], entry["chance_independent"])
        entry["reads_shape"] = self.verdict(entry, {"accuracy": entry["accuracy_p_value"], "mi": entry["mi"]["p_value"],
                                                    "leakage": entry["leakage"]["p_value"]}, opts.alpha)
        contrast = records[f"{name}/contrast"][rows]
        pixel = records[f"{name}/pixel_diff"][rows]
        flags = []
        if contrast.size and np.isfinite(contrast).all():
            mean_contrast = float(contrast.mean())
            entry["fill_contrast"] = {"value": mean_contrast, "pixel_diff": float(pixel.mean()), "threshold": opts.low_contrast_threshold}
            if mean_contrast < opts.low_contrast_threshold:
                flags.append(f"low_contrast: the {key} fill is nearly invisible on this donor (contrast {mean_contrast:.3f}); this probe cannot see shape")
        else:
            entry["fill_contrast"] = {"value": None, "pixel_diff": None, "note": "method has no pixel fill"}
        entry["flags"] = flags
        return entry

    def outcomes(self, ctx, key, records, rows):
        """Per image: the first donor's shape-only input answered with the silhouette's class (1/0)."""
        donor = ctx.opts(self.name).donors[0]
        out = (records[f"{donor}/pred"] == records["label"]).astype(np.float64)
        out[~rows] = np.nan
        return out

    # --- presentation -----------------------------------------------------------------
    def report_rows(self, cols):
        kind = next(iter(cols.values()), {}).get("key_kind", self.key_kind)
        lines = [f"| {kind} | donor | subset | accuracy | 95% CI | control | MI (bits) | MI p | reads shape | contrast | n |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                for donor, d in e["donors"].items():
                    lines.append(f"| {key} | {donor} | {d['subset']} | {fmt_num(d['value'])} | {fmt_ci(d['ci95'])} | "
                                 f"{fmt_num(d['control']['value'])} | {fmt_num(d['mi']['value'])} | {fmt_num(d['mi']['p_value'])} | "
                                 f"{verdict_text(d['reads_shape'])} | {fmt_num(d['fill_contrast']['value'])} | {d['n']} |")
        return lines

    def summary_columns(self, entry):
        mi = entry.get("mi", {})
        return {"mi_bits": mi.get("value"), "mi_p": mi.get("p_value"), "control": entry.get("control", {}).get("value"),
                "reads_shape": verdict_text(entry.get("reads_shape") or {})}

    def study_cell(self, entry):
        cell = super().study_cell(entry)
        mi = entry.get("mi") or {}
        if mi:
            cell["mi_excess"] = mi.get("excess")
            cell["mi_p_value"] = mi.get("p_value")
        if entry.get("reads_shape"):
            cell["reads_shape"] = entry["reads_shape"]
        return cell

    def study_markdown(self, study, cells):
        lines = super().study_markdown(study, cells)
        if not lines:
            return lines
        keys = study_keys(study, cells)
        lines += ["Mutual information between silhouette class and prediction, excess over the shuffled "
                  "null (bits, mean ± sd) — two-sided: it also catches a model that avoids the shape's class:", ""]
        lines += study_table(study, cells, keys, lambda c: fmt_spread((c or {}).get("mi_excess"), pct=False))
        return lines + [""]

    def study_check(self, study, cells):
        """Does the baseline read shape? The same decision as every entry: the headline verdict
        (``reads_shape``: accuracy vs. ``chance_independent``, MI, leakage vs. the area-matched disk;
        Holm within the entry, Benjamini–Hochberg across the study) must be significant in every
        seed, for some fill — toward *or* away (a model that avoids the shape's class reads it)."""
        from masktrain.probes.base import reading_seeds

        title = "Does the baseline read shape?"
        base = cells.get("baseline", {})
        if not base:
            return {"title": title, "status": "unknown",
                    "message": "no baseline runs with the shape_only probe in this study: nothing shows the models "
                               "can read shape, so 'no leakage' would mean nothing"}
        per_method = {}
        for method, cell in base.items():
            dirs = reading_seeds(cell)
            per_method[method] = {"mean": cell["mean"], "chance": cell.get("chance"), "seeds_reading_shape": len(dirs),
                                  "directions": sorted(set(dirs)), "n_seeds": len(cell["seeds"])}
        reading = [m for m, v in per_method.items() if v["n_seeds"] and v["seeds_reading_shape"] == v["n_seeds"]]
        if reading:
            best = max(reading, key=lambda m: per_method[m]["mean"] or 0.0)
            v = per_method[best]
            message = (f"yes: the baseline reads shape — with the {best} fill the shape-only verdict is significant "
                       f"(study-wide Benjamini–Hochberg) in {v['seeds_reading_shape']}/{v['n_seeds']} seeds "
                       f"(direction: {', '.join(v['directions'])}; accuracy {v['mean']:.1%}, chance {v['chance']:.1%})")
            status = "reads_shape"
        else:
            message = ("NO: the baseline's shape-only verdict is not significant in every seed for any fill; the models may "
                       "not have learned shape, so low leakage in the augmented regimes means nothing")
            status = "does_not_read_shape"
        return {"title": title, "status": status, "message": message, "per_method": per_method}
