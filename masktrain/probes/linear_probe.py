"""``linear_probe``: what the representation encodes about the silhouette, even when the
logits do not show it. A ridge (least-squares, one-vs-rest) linear classifier on standardised
pooled features (``method.features``) of shape-only inputs, k-fold cross-validated, predicting
the silhouette's class; tested against a **label-permutation null** (the whole cross-validation
refitted on permuted labels), not a binomial: out-of-fold predictions are correlated, so a
Wilson interval against 1/K is anti-conservative (one-sided false-positive rate 7.7% at nominal
2.5% in the issue-13 review). The shape-free control: the same probe on the features of the
area-matched-disk inputs (same removed area and place, no outline); ``leakage`` = accuracy on
silhouettes − on disks (paired, exact McNemar). The inputs come from ``ctx.shared``: exactly
those ``shape_only`` scores, whether or not it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from masktrain import stats
from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, fmt_num, register_probe, verdict_text
from masktrain.rng import derive_seed, name_key


@dataclass
class Options:
    folds: int = 5
    #: Ridge penalty, relative: λ = ridge · (number of training rows) on standardised features.
    ridge: float = 0.1
    #: Label permutations of the null (each refits every fold; all at once, one matrix product).
    n_permutations: int = 1000
    alpha: float = 0.05
    #: The donor of the shape-only inputs; None: the first of ``probe_options.shape_only.donors``
    #: (so both probes read the same inputs by default).
    donor: Optional[str] = None


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """A shuffled k-fold assignment ``(n,)`` that does not look at the labels (so permuting the labels
    leaves the folds unchanged, and the permutation test is exact)."""
    ids = np.arange(n) % folds
    return np.random.default_rng(seed).permutation(ids)


def ridge_cv_scores(features: np.ndarray, targets: np.ndarray, folds: np.ndarray, ridge: float) -> np.ndarray:
    """Out-of-fold ridge scores for one or many target sets.

    features: ``(n, D)``; targets: ``(P, n, K)`` one-hot label sets (P = 1 + permutations);
    folds: ``(n,)`` fold ids. Returns ``(P, n, K)`` out-of-fold scores (argmax = prediction). The fit is
    linear in the targets, so each fold's ``(n_test, n_train)`` smoother matrix is built once and applied
    to all P target sets in one product: a permutation null costs about one extra fit.
    """
    X = np.asarray(features, dtype=np.float64)
    out = np.zeros(targets.shape, dtype=np.float64)
    for f in np.unique(folds):
        test, train = folds == f, folds != f
        Xt = X[train]
        mu, sd = Xt.mean(axis=0), Xt.std(axis=0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        A, B = (Xt - mu) / sd, (X[test] - mu) / sd
        lam = ridge * A.shape[0]
        if A.shape[1] <= A.shape[0]:
            smoother = B @ np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T)
        else:
            smoother = (B @ A.T) @ np.linalg.inv(A @ A.T + lam * np.eye(A.shape[0]))
        Y = targets[:, train]
        ybar = Y.mean(axis=1, keepdims=True)
        out[:, test] = np.einsum("st,ptk->psk", smoother, Y - ybar) + ybar
    return out


def permutation_cv(features: np.ndarray, labels: np.ndarray, k: int, folds: int, ridge: float, n_permutations: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions ``(n,)`` on the real labels and the null accuracies ``(P,)`` of the same
    cross-validation on permuted labels."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    ids = fold_ids(n, folds, derive_seed(seed, 1))
    label_sets = np.concatenate([labels[None], rng.permuted(np.broadcast_to(labels, (n_permutations, n)), axis=1)])
    onehot = np.eye(k)[label_sets]  # (1 + P, n, K)
    preds = np.empty(label_sets.shape, dtype=np.int64)
    chunk = max(1, int(2e7 // max(1, n * k)))  # bound the (P, n, K) working set
    for start in range(0, len(label_sets), chunk):
        preds[start:start + chunk] = ridge_cv_scores(features, onehot[start:start + chunk], ids, ridge).argmax(axis=2)
    null = (preds[1:] == label_sets[1:]).mean(axis=1)
    return preds[0], null


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
            ctx.shared.want_features(key, self._donor(ctx), control=True)

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        return {"features": ctx.shared.shape_only_features(key, self._donor(ctx)),
                "control_features": ctx.shared.shape_only_features(key, self._donor(ctx), control=True)}

    def summarise(self, ctx, key, records, rows, subset):
        opts = ctx.opts(self.name)
        y = records["label"][rows]
        counts = np.bincount(y, minlength=ctx.num_classes)
        folds = int(min(opts.folds, len(y)))
        if folds < 2 or len(np.unique(y)) < 2:
            entry = accuracy_entry(ctx, y[:0], y[:0], subset)
            entry.update(note="too few samples to cross-validate", flags=["skipped: too few samples"])
            return entry
        seed = derive_seed(ctx.seed, name_key(self.name), name_key(key))
        pred, null = permutation_cv(records["features"][rows], y, ctx.num_classes, folds, opts.ridge, opts.n_permutations, seed)
        ctrl, ctrl_null = permutation_cv(records["control_features"][rows], y, ctx.num_classes, folds, opts.ridge,
                                         opts.n_permutations, derive_seed(seed, 2))
        entry = accuracy_entry(ctx, y, pred, subset)
        ctx.cache[f"{self.name}/{key}/{subset}/hits"] = (rows, pred == y)  # for outcomes(): no second cross-validation
        p_value = float((1 + np.sum(null >= entry["value"] - 1e-12)) / (1 + len(null)))
        entry.update(metric="cross-validated accuracy on the silhouette's class", folds=folds, donor=self._donor(ctx),
                     feature_dim=int(records["features"].shape[1]), majority_chance=float(counts.max() / max(counts.sum(), 1)),
                     null={"mean": float(null.mean()), "q95": float(np.quantile(null, 0.95)), "n_permutations": int(len(null)),
                           "test": "label permutation, cross-validation refitted"},
                     p_value=p_value, classifier=f"ridge (λ = {opts.ridge}·n_train), standardised, {folds}-fold", flags=[])
        control = accuracy_entry(ctx, y, ctrl, subset)
        control.update(hole="area_disk", p_value=float((1 + np.sum(ctrl_null >= control["value"] - 1e-12)) / (1 + len(ctrl_null))),
                       metric="cross-validated accuracy, features of the area-matched-disk inputs")
        entry["control"] = control
        entry["leakage"] = {"value": entry["value"] - control["value"], "p_value": stats.mcnemar(pred == y, ctrl == y)}
        entry["reads_shape"] = self.verdict(entry, {"accuracy": p_value, "leakage": entry["leakage"]["p_value"]}, opts.alpha)
        return entry

    def outcomes(self, ctx, key, records, rows):
        """Per image: its cross-validated prediction (from the fold that held it out) is the silhouette's class (1/0).
        Cross-validated predictions share fitted folds, so images are not independent draws; the study's image-level
        resampling treats them as if they were (a caveat docs/probes.md states)."""
        memo = ctx.cache.get(f"{self.name}/{key}/all/hits")
        if memo is None or not np.array_equal(memo[0], rows):
            return None
        out = np.full(rows.shape[0], np.nan)
        out[rows] = memo[1].astype(np.float64)
        return out

    def report_rows(self, cols):
        kind = next(iter(cols.values()), {}).get("key_kind", self.key_kind)
        lines = [f"| {kind} | subset | accuracy | permutation p | null mean | control (disk) | reads shape | n |",
                 "|---|---|---|---|---|---|---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                lines.append(f"| {key} | {e['subset']} | {fmt_num(e['value'])} | {fmt_num(e.get('p_value'))} | "
                             f"{fmt_num((e.get('null') or {}).get('mean'))} | {fmt_num((e.get('control') or {}).get('value'))} | "
                             f"{verdict_text(e.get('reads_shape') or {})} | {e['n']} |")
        return lines

    def summary_columns(self, entry):
        return {"p_value": entry.get("p_value"), "reads_shape": verdict_text(entry.get("reads_shape") or {})}

    def study_cell(self, entry):
        cell = super().study_cell(entry)
        if entry.get("reads_shape"):
            cell["reads_shape"] = entry["reads_shape"]
        return cell
