"""``linear_probe``: what the representation encodes about the silhouette, even when the
logits do not show it. Logistic regression on pooled features (``method.features``) of
shape-only inputs, stratified k-fold cross-validated, predicting the silhouette's class.
The inputs come from ``ctx.shared``: exactly those ``shape_only`` scores, whether or not it runs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, register_probe


@dataclass
class Options:
    folds: int = 5
    C: float = 1.0
    max_iter: int = 500
    #: The donor of the shape-only inputs; None: the first of ``probe_options.shape_only.donors``
    #: (so both probes read the same inputs by default).
    donor: Optional[str] = None


def cross_validated_predictions(features: np.ndarray, labels: np.ndarray, folds: int, seed: int, C: float, max_iter: int) -> np.ndarray:
    """Out-of-fold predictions ``(n,)`` of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One BLAS/OpenMP thread: the problem is tiny (n ≈ 500, d ≈ 512), and sklearn's/scipy's own
    # thread pools fight torch's OpenMP threads for the cores — 10x slower on 2 cores, and the
    # contention outlives the call (later torch work in the same process slowed 4-6x).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")  # convergence chatter; the interval tells the story
        return cross_val_predict(clf, features, labels, cv=cv)


@register_probe
class LinearProbe(Probe):
    name = "linear_probe"
    Options = Options
    headline = "cross-validated linear-probe accuracy (shape-only features)"
    study_headline = "cross-validated accuracy on pooled features"

    def _donor(self, ctx: ProbeContext) -> str:
        donor = ctx.opts(self.name).donor
        if donor is None:
            # The headline donor of the shape-only inputs as configured for shape_only (its options,
            # looked up through the registry: no import of that probe, no ordering between them).
            donor = ctx.opts("shape_only").donors[0]
        return str(donor)

    def prepare(self, ctx, keys):
        for key in keys:
            ctx.shared.want_features(key, self._donor(ctx))

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        return {"features": ctx.shared.shape_only_features(key, self._donor(ctx))}

    def summarise(self, ctx, key, records, rows, subset):
        opts = ctx.opts(self.name)
        X, y = records["features"][rows], records["label"][rows]
        counts = np.bincount(y, minlength=ctx.num_classes)
        usable = counts[y] >= 2  # a class needs a member in some training fold and some test fold
        folds = int(min(opts.folds, counts[counts >= 2].min())) if usable.any() else 0
        if folds < 2 or len(np.unique(y[usable])) < 2:
            entry = accuracy_entry(ctx, y[:0], y[:0], subset)
            entry.update(note="too few samples per class to cross-validate", flags=["skipped: too few samples"])
            return entry
        pred = cross_validated_predictions(X[usable], y[usable], folds, ctx.seed, opts.C, opts.max_iter)
        entry = accuracy_entry(ctx, y[usable], pred, subset)
        entry.update(metric="cross-validated accuracy on the silhouette's class", folds=folds, donor=self._donor(ctx),
                     feature_dim=int(X.shape[1]), majority_chance=float(counts.max() / max(counts.sum(), 1)), flags=[])
        return entry
