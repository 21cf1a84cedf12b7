"""``object_removal``: remove the object with its silhouette vs. a shape-free control hole.

Leakage = accuracy(silhouette) − accuracy(bounding box): a positive value means the
hole's outline, not the object, drives the prediction. The paper's "broken" mask (the
silhouette rolled by half the image) is reported beside.
"""
from __future__ import annotations

import torch

from masktrain.probes.base import (Probe, ProbeContext, accuracy_entry, difference_entry, fmt_ci, fmt_num, predict,
                                   register_probe)
from masktrain.probes.inputs import CONTROL_HOLES

HOLES = ("silhouette", "bbox", "broken")


@register_probe
class ObjectRemoval(Probe):
    name = "object_removal"
    headline = "leakage = acc(silhouette) − acc(bbox)"
    study_headline = "acc(silhouette) − acc(bounding box)"
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
        return records

    def summarise(self, ctx, key, records, rows, subset):
        labels = records["label"][rows]
        acc = {hole: accuracy_entry(ctx, labels, records[f"pred_{hole}"][rows], subset) for hole in HOLES}
        hit = {hole: records[f"pred_{hole}"][rows] == labels for hole in HOLES}
        entry = difference_entry(ctx, hit["silhouette"], hit["bbox"], labels, subset, ctx.seed)
        entry["metric"] = "accuracy(silhouette) - accuracy(bbox)"
        entry["accuracy"] = acc
        entry["leakage_broken"] = difference_entry(ctx, hit["silhouette"], hit["broken"], labels, subset, ctx.seed + 7)
        entry["flags"] = []
        return entry

    def report_rows(self, cols):
        kind = next(iter(cols.values()), {}).get("key_kind", self.key_kind)
        lines = [f"| {kind} | subset | leakage | 95% CI | acc silhouette | acc bbox | acc broken | n |",
                 "|---|---|---|---|---|---|---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                a = e["accuracy"]
                lines.append(f"| {key} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | {fmt_num(a['silhouette']['value'])} | "
                             f"{fmt_num(a['bbox']['value'])} | {fmt_num(a['broken']['value'])} | {e['n']} |")
        return lines
