"""``linear_probe``: what the representation encodes about the silhouette, even when the
logits do not show it. Logistic regression on pooled features (``method.features``) of
shape-only inputs, stratified k-fold cross-validated, predicting the silhouette's class.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, register_probe
from masktrain.probes.shape_only import options as shape_options
from masktrain.probes.shape_only import features_key, input_seed, shape_only_inputs

DEFAULTS = {"folds": 5, "C": 1.0, "max_iter": 500, "donor": None}


def options(ctx: ProbeContext) -> dict:
    opts = {**DEFAULTS, **ctx.opts("linear_probe")}
    if opts["donor"] is None:
        opts["donor"] = shape_options(ctx)["donors"][0]
    return opts


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

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        donor_name = options(ctx)["donor"]
        cached = ctx.cache.pop(features_key(key, donor_name), None)  # kept by shape_only's forward pass
        if cached is not None:
            return {"features": cached}
        method = ctx.method(key)
        donors_listed = list(shape_options(ctx)["donors"])
        # The same inputs (fill seed included) shape_only scores, whether or not it ran.
        d = donors_listed.index(donor_name) if donor_name in donors_listed else 977
        feats = []
        with torch.inference_mode():
            for rows in ctx.batches():
                donors, keep = shape_only_inputs(ctx, donor_name, rows)
                g = torch.Generator(device=ctx.device).manual_seed(input_seed(ctx, d, False, rows))
                feats.append(method.features(ctx.model, donors, keep, g).float().flatten(1).cpu())
        return {"features": torch.cat(feats) if feats else torch.zeros(0, 1)}

    def summarise(self, ctx, key, records, rows, subset):
        opts = options(ctx)
        X, y = records["features"][rows], records["label"][rows]
        counts = np.bincount(y, minlength=ctx.num_classes)
        usable = counts[y] >= 2  # a class needs a member in some training fold and some test fold
        folds = int(min(opts["folds"], counts[counts >= 2].min())) if usable.any() else 0
        if folds < 2 or len(np.unique(y[usable])) < 2:
            entry = accuracy_entry(ctx, y[:0], y[:0], subset)
            entry.update(note="too few samples per class to cross-validate", flags=["skipped: too few samples"])
            return entry
        pred = cross_validated_predictions(X[usable], y[usable], folds, ctx.seed, opts["C"], opts["max_iter"])
        entry = accuracy_entry(ctx, y[usable], pred, subset)
        entry.update(metric="cross-validated accuracy on the silhouette's class", folds=folds, donor=opts["donor"],
                     feature_dim=int(X.shape[1]), majority_chance=float(counts.max() / max(counts.sum(), 1)), flags=[])
        return entry
