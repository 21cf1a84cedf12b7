"""``object_removal``: remove the object with its silhouette vs. a shape-free control hole.

Leakage = accuracy(silhouette hole) − accuracy(area-matched disk hole): the disk removes as
many pixels as the silhouette, at its centroid, with no outline
(:func:`masktrain.control_holes.area_matched_disk`), so a positive value means the hole's
outline, not the amount or place of what was removed, drives the prediction. Beside it: the
bounding box (the IN-9 ``only_bg_b`` comparison; it removes 1.3–2.4× the area and is a shape of
its own, so a model that reads the hole's size or the context near the object shows "leakage"
there) and the paper's "broken" mask made a control (the rolled silhouette that overlaps the
object least, with the object kept intact: :func:`masktrain.control_holes.intact_broken_keep`).
The verdict (``reads_shape``) combines accuracy, MI and leakage vs. the disk in
:meth:`masktrain.probes.base.Probe.verdict`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from masktrain import stats
from masktrain.probes.base import (Probe, ProbeContext, accuracy_entry, difference_entry, fmt_ci, fmt_num, predict,
                                   register_probe, verdict_text)
from masktrain.probes.inputs import CONTROL_HOLES
from masktrain.rng import derive_seed, name_key

HOLES = ("silhouette", "area_disk", "bbox", "broken")
#: The headline control (the leakage ``value``) and the ones reported beside it.
CONTROL, BESIDE = "area_disk", ("bbox", "broken")


@dataclass
class Options:
    n_permutations: int = 10000  # of the MI test of the silhouette arm
    alpha: float = 0.05


@register_probe
class ObjectRemoval(Probe):
    name = "object_removal"
    Options = Options
    headline = "leakage = acc(silhouette) − acc(area-matched disk)"
    study_headline = "acc(silhouette hole) − acc(area-matched disk hole)"
    reference = "zero"

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        objects = ctx.require_objects(self.name)
        method = ctx.method(key)
        records = {}
        for hole in HOLES:
            make_keep = CONTROL_HOLES.get(hole)

            def run(rows, make_keep=make_keep, hole=hole):
                images, obj = ctx.to_device(ctx.images[rows], objects[rows])
                return method.logits(ctx.model, images, make_keep(obj), ctx.random(self.name, f"{key}/{hole}", rows))

            records[f"pred_{hole}"] = predict(ctx, run).argmax(dim=1)
        # How much of the object the disk removes (it has the object's area, not its support).
        obj = objects[ctx.shard]
        removed = (1 - CONTROL_HOLES.get(CONTROL)(obj)) * (obj > 0.5)
        records["disk_coverage"] = removed.sum(dim=(1, 2, 3)) / (obj > 0.5).sum(dim=(1, 2, 3)).clamp_min(1)
        return records

    def summarise(self, ctx, key, records, rows, subset):
        opts = ctx.opts(self.name)
        seed = derive_seed(ctx.seed, name_key(self.name), name_key(key))
        labels = records["label"][rows]
        acc = {hole: accuracy_entry(ctx, labels, records[f"pred_{hole}"][rows], subset) for hole in HOLES}
        hit = {hole: records[f"pred_{hole}"][rows] == labels for hole in HOLES}
        entry = difference_entry(ctx, hit["silhouette"], hit[CONTROL], labels, subset, derive_seed(seed, 1))
        entry["metric"] = f"accuracy(silhouette) - accuracy({CONTROL})"
        entry["control"] = CONTROL
        entry["p_value"] = stats.mcnemar(hit["silhouette"], hit[CONTROL])
        entry["accuracy"] = acc
        for i, hole in enumerate(BESIDE):
            entry[f"leakage_{hole}"] = difference_entry(ctx, hit["silhouette"], hit[hole], labels, subset, derive_seed(seed, 2 + i))
            entry[f"leakage_{hole}"]["p_value"] = stats.mcnemar(hit["silhouette"], hit[hole])
        sil = acc["silhouette"]
        sil["p_value"] = stats.binomial_greater(sil["k"], sil["n"], sil["chance_independent"])
        entry["mi"] = stats.mi_permutation_test(labels, records["pred_silhouette"][rows], ctx.num_classes, opts.n_permutations,
                                                derive_seed(seed, 9), n_boot=min(ctx.n_boot, 500))
        entry["reads_shape"] = self.verdict(entry, {"accuracy": sil["p_value"], "mi": entry["mi"]["p_value"],
                                                    "leakage": entry["p_value"]}, opts.alpha, accuracy=sil)
        coverage = float(records["disk_coverage"][rows].mean()) if rows.any() else float("nan")
        entry["disk_coverage"] = coverage
        entry["flags"] = []
        if entry["reads_shape"]["significant"] and (entry["value"] or 0.0) < 0:
            # The disk leaves (1 - coverage) of the object visible: its accuracy can exceed the silhouette's from those
            # remnants, so a negative leakage is not by itself a shape reader; shape_only's donors have no remnants.
            entry["flags"].append(f"negative_leakage: acc(disk) > acc(silhouette) and the verdict is significant; the disk "
                                  f"leaves {1 - coverage:.0%} of the object visible on average, so check shape_only (no remnants) "
                                  f"before reading this as shape")
        return entry

    def outcomes(self, ctx, key, records, rows):
        """Per image: correct on the silhouette hole (1/0) minus correct on the area-matched disk (1/0)."""
        hit = {hole: (records[f"pred_{hole}"] == records["label"]).astype(np.float64) for hole in ("silhouette", CONTROL)}
        out = hit["silhouette"] - hit[CONTROL]
        out[~rows] = np.nan
        return out

    def report_rows(self, cols):
        kind = next(iter(cols.values()), {}).get("key_kind", self.key_kind)
        lines = [f"| {kind} | subset | leakage vs. disk | 95% CI | vs. bbox | acc silhouette | acc disk | acc bbox | acc broken (intact) | reads shape | n |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                a = e["accuracy"]
                v = e.get("reads_shape") or {}
                lines.append(f"| {key} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | {fmt_num(e['leakage_bbox']['value'])} | "
                             f"{fmt_num(a['silhouette']['value'])} | {fmt_num(a['area_disk']['value'])} | {fmt_num(a['bbox']['value'])} | "
                             f"{fmt_num(a['broken']['value'])} | {verdict_text(v)} | {e['n']} |")
        return lines

    def summary_columns(self, entry):
        return {"reads_shape": verdict_text(entry.get("reads_shape") or {})}

    def study_cell(self, entry):
        cell = super().study_cell(entry)
        if entry.get("reads_shape"):
            cell["reads_shape"] = entry["reads_shape"]
        return cell

