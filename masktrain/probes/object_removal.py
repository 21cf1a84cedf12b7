"""``object_removal``: remove the object with its silhouette vs. a shape-free control hole.

Leakage = accuracy(silhouette) − accuracy(bounding box): a positive value means the
hole's outline, not the object, drives the prediction. The paper's "broken" mask (the
silhouette rolled by half the image) is reported beside.
"""
from __future__ import annotations

import numpy as np
import torch

from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, difference_entry, predict, register_probe
from masktrain.probes.inputs import CONTROL_HOLES


@register_probe
class ObjectRemoval(Probe):
    name = "object_removal"

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        objects = ctx.require_objects(self.name)
        method = ctx.method(key)
        records = {}
        for i, (hole, make_keep) in enumerate(CONTROL_HOLES.items()):
            def run(rows, make_keep=make_keep, i=i):
                images, obj = ctx.to_device(ctx.images[rows], objects[rows])
                g = torch.Generator(device=ctx.device).manual_seed(ctx.seed * 1000 + i * 97 + int(rows[0]))
                return method.logits(ctx.model, images, make_keep(obj), g)

            records[f"pred_{hole}"] = predict(ctx, run).argmax(dim=1)
        return records

    def summarise(self, ctx, key, records, rows, subset):
        labels = records["label"][rows]
        acc = {hole: accuracy_entry(ctx, labels, records[f"pred_{hole}"][rows], subset) for hole in CONTROL_HOLES}
        hit = {hole: records[f"pred_{hole}"][rows] == labels for hole in CONTROL_HOLES}
        entry = difference_entry(ctx, hit["silhouette"], hit["bbox"], labels, subset, ctx.seed)
        entry["metric"] = "accuracy(silhouette) - accuracy(bbox)"
        entry["accuracy"] = acc
        entry["leakage_broken"] = difference_entry(ctx, hit["silhouette"], hit["broken"], labels, subset, ctx.seed + 7)
        entry["flags"] = []
        return entry
