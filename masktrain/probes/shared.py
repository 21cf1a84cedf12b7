"""Inputs several probes read, computed once per evaluation in whatever order probes ask.

``ctx.shared`` (one :class:`SharedInputs` per evaluation) memoises: the clean logits of
this rank's rows, donors, the other-class partners, and the model's outputs on *shape-only
inputs* — a donor with a silhouette removed and filled by a masking method — and on their
shape-free control: the same donor with an area-matched disk (same area and centroid as the
silhouette, no outline; :func:`masktrain.control_holes.area_matched_disk`) removed instead. Probes never import each other: ``shape_only`` scores those outputs'
logits, ``linear_probe`` fits on their pooled features, and whichever asks first computes
them (with features, if any probe declared ``want_features`` in its ``prepare``), so the
model runs once per (method, donor, control) and both probes see exactly the same inputs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from masktrain.probes.base import ProbeContext, predict
from masktrain.control_holes import area_matched_disk
from masktrain.probes.inputs import DONORS, fill_contrast, other_class_partner, silhouette_keep

#: The ``probe`` part of the per-sample seeds of shape-only inputs (seed, "shape_only_inputs", key, row).
STREAM = "shape_only_inputs"


class SharedInputs:
    """Memoised inputs of one evaluation (see the module docstring); every tensor is on the CPU."""

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self._memo: dict[Any, Any] = {}
        self._want_features: set[tuple[str, str]] = set()

    def _get(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def clean_logits(self) -> Tensor:
        """Logits of the unmasked images of this rank's rows, ``(len(shard), K)``."""
        ctx = self.ctx

        def compute() -> Tensor:
            with torch.inference_mode():
                out = [ctx.model(ctx.images[rows].to(ctx.device)).float().cpu() for rows in ctx.batches()]
            return torch.cat(out) if out else torch.zeros(0, ctx.num_classes)

        return self._get("clean_logits", compute)

    def donor(self, name: str) -> Tensor:
        """All N donor images ``(N, 3, H, W)`` for donor ``name``."""
        ctx = self.ctx

        return self._get(("donor", name), lambda: DONORS.get(name)(ctx))

    def partners(self) -> Tensor:
        """A random other-class row per row ``(N,)`` (same on every rank), for probes that pair rows across classes."""
        ctx = self.ctx
        rows = torch.arange(len(ctx.labels))
        return self._get("partners", lambda: other_class_partner(ctx.labels, ctx.random(STREAM, "partner", rows, "cpu")))

    def want_features(self, method: str, donor: str, control: bool = False) -> None:
        """Declare that pooled features of the shape-only inputs of ``(method, donor)`` (``control``: of
        their area-matched-disk control) will be read."""
        self._want_features.add((str(method), str(donor), bool(control)))

    def shape_only_inputs(self, donor: str, rows: Tensor, control: bool = False) -> tuple[Tensor, Tensor]:
        """Device tensors ``(donors (b, 3, H, W), keep (b, 1, H, W))`` for global ``rows``: the donor with
        the row's silhouette removed (``control``: an area-matched disk at the silhouette's centroid —
        the same removed area and place, no outline)."""
        ctx = self.ctx
        objects = ctx.require_objects("shape-only inputs")
        donors, obj = ctx.to_device(self.donor(donor)[rows], objects[rows])
        return donors, (area_matched_disk(obj) if control else silhouette_keep(obj))

    def shape_only(self, method: str, donor: str, control: bool = False) -> dict[str, Tensor]:
        """The model on shape-only inputs of this rank's rows, filled by ``method``:
        ``logits (n, K)``; for non-control inputs also ``contrast``/``pixel_diff`` ``(n,)`` (how visible
        the fill is on the donor, see :func:`~masktrain.probes.inputs.fill_contrast`) and, when wanted,
        ``features (n, D)``."""
        return self._get(("shape_only", method, donor, bool(control)), lambda: self._shape_only(method, donor, bool(control)))

    def _shape_only(self, method_name: str, donor: str, control: bool) -> dict[str, Tensor]:
        ctx = self.ctx
        method = ctx.method(method_name)
        with_features = (method_name, donor, control) in self._want_features
        key = f"{method_name}/{donor}/{'control' if control else 'silhouette'}"
        contrast: list[Tensor] = []
        pixel: list[Tensor] = []
        features: list[Tensor] = []

        def run(rows: Tensor) -> Tensor:
            donors, keep = self.shape_only_inputs(donor, rows, control)
            random = ctx.random(STREAM, key, rows)
            if not control:
                c, p = fill_contrast(method, donors, keep, random.stream("contrast"))
                contrast.append(c)
                pixel.append(p)
            if with_features:
                feats, logits = method.features_and_logits(ctx.model, donors, keep, random)
                features.append(feats.float().flatten(1).cpu())
                return logits
            return method.logits(ctx.model, donors, keep, random)

        out = {"logits": predict(ctx, run)}
        if not control:
            out["contrast"] = torch.cat(contrast) if contrast else torch.zeros(0)
            out["pixel_diff"] = torch.cat(pixel) if pixel else torch.zeros(0)
        if with_features:
            out["features"] = torch.cat(features) if features else torch.zeros(0, 1)
        return out

    def shape_only_features(self, method: str, donor: str, control: bool = False) -> Tensor:
        """Pooled features ``(n, D)`` of the shape-only inputs of ``(method, donor)`` (``control``: of the area-matched-disk control)."""
        self.want_features(method, donor, control)
        out = self.shape_only(method, donor, control)
        if "features" not in out:
            # Computed earlier without features (nobody declared them): run the features pass over the
            # same inputs (same per-sample seeds), so they are the inputs the logits came from.
            ctx = self.ctx
            m = ctx.method(method)
            key = f"{method}/{donor}/{'control' if control else 'silhouette'}"
            feats = []
            with torch.inference_mode():
                for rows in ctx.batches():
                    donors, keep = self.shape_only_inputs(donor, rows, control)
                    feats.append(m.features(ctx.model, donors, keep, ctx.random(STREAM, key, rows)).float().flatten(1).cpu())
            out["features"] = torch.cat(feats) if feats else torch.zeros(0, 1)
        return out["features"]
