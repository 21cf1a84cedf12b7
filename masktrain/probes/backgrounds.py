"""``backgrounds``: accuracy and AUC under the foreground/background conditions, per masking method.

The conditions are IN-9's (Xiao et al., "Noise or Signal", 2020) plus *Mask of truth*'s
``only_fg_b`` (Sourget et al., 2024), computed from the evaluation set's object masks by
:mod:`masktrain.conditions`; removal goes through the masking method, so e.g. ``only_fg/layer``
is the object kept and the background layer-masked away. Report keys are ``<condition>/<method>``
and, when both mixed sets are asked for, ``bg_gap/<method>``.

Per ``<condition>/<method>`` entry (subsets ``all`` and ``correct``, as every probe):

* ``value``: top-1 accuracy, Wilson 95% interval, per class, chance ``1/K``;
* ``auc``: one-vs-rest macro AUC from the softmax scores (ties count one half), a percentile
  bootstrap 95% interval over images, per class, chance 0.5;
* ``vs_original``: the paired difference to ``original`` under the same method: ``accuracy`` with a
  paired bootstrap interval over images (the same resampled images for both conditions) and a
  two-sided bootstrap p-value; ``auc`` with DeLong's paired test
  (:func:`masktrain.stats.delong_macro_auc_test`: the macro difference's DeLong variance with the
  covariances between conditions and between classes, normal interval and p-value);
  ``auc_bootstrap`` the paired bootstrap of the same difference, kept beside it.

``bg_gap/<method>``: ``acc(mixed_same) − acc(mixed_rand)`` (IN-9's BG-Gap) with a paired bootstrap
interval and p-value, chance 0.

Mixed partners are drawn per sample from the whole evaluation set (seeded by ``seed`` and the
row), so a sample's partner does not depend on the batch size or the number of ranks. A model
read through ``data.in9.map_imagenet=true`` has a tenth output column (a top-1 in no IN-9 class),
which is a wrong prediction for every label and is left out of the AUC's class scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from masktrain import stats
from masktrain.conditions import CONDITIONS, Pool, apply_condition, get_condition
from masktrain.errors import UserError, check
from masktrain.probes.base import (Probe, ProbeContext, fmt_ci, fmt_num, predict, register_probe, study_chance)

GAP = "bg_gap"
GAP_CONDITIONS = ("mixed_same", "mixed_rand")


def _all_conditions() -> list[str]:
    return list(CONDITIONS.names())


@dataclass
class Options:
    """``probe_options.backgrounds.<field>``."""

    #: Test conditions (any of masktrain.conditions.CONDITIONS); ``original`` is always evaluated for the paired test.
    conditions: list[str] = field(default_factory=_all_conditions)


# --- statistics ---------------------------------------------------------------------------

def _boot_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples as counts ``(n_boot, n)``: how often each image is drawn in each resample."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (idx + (np.arange(n_boot) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of ``scores (n,)`` for ``positive (n,)`` bool under sample ``weights (B, n)`` -> ``(B,)``
    (Mann-Whitney: P(s+ > s-) + ½ P(s+ = s-)); NaN where a resample has no positive or no negative."""
    if scores.size == 0:
        return np.full(weights.shape[0], np.nan)
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negatives strictly below each group
    u = (wp * (below + 0.5 * wn)).sum(axis=1)
    denom = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / np.where(denom > 0, denom, 1), np.nan)


def macro_auc(scores: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest AUC per class ``(B, K)`` and its macro mean over classes ``(B,)`` (NaN classes skipped)."""
    per = np.stack([weighted_auc(scores[:, c], labels == c, weights) for c in range(k)], axis=1)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(per)
        macro = np.where(valid.any(axis=1), np.nansum(per, axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan)
    return per, macro


def _interval(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(v, [0.025, 0.975])
    return [float(lo), float(hi)]


def _p_two_sided(diffs: np.ndarray) -> float:
    """Bootstrap p-value of "no difference": twice the smaller tail mass at 0 (at most 1)."""
    d = diffs[np.isfinite(diffs)]
    if d.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def _diff(point: float, boot: np.ndarray) -> dict:
    return {"value": point, "ci95": _interval(boot), "p_value": _p_two_sided(boot), "interval": "paired bootstrap"}


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# --- the probe ------------------------------------------------------------------------------

@register_probe
class Backgrounds(Probe):
    name = "backgrounds"
    Options = Options
    needs_object_masks = True
    key_kind = "condition/method"
    headline = "accuracy under a foreground/background condition"
    study_headline = "accuracy: train condition (rows) × test condition (columns)"
    study_spreads = ("auc",)
    #: It reads the extra no-IN-9-class column of data.in9.map_imagenet=true correctly (evaluate.py checks this).
    reads_no_class_column = True
    #: Not part of ``probes=null`` (every probe): nine conditions × every method is a protocol of its own; ask for it by name.
    run_by_default = False

    def parse_options(self, raw):
        opts = super().parse_options(raw)
        names = list(opts.conditions) if opts.conditions is not None else []
        check(len(names) > 0, "probe_options.backgrounds.conditions=[] is empty; choose from " + str(_all_conditions()))
        for c in names:
            try:
                get_condition(str(c))
            except UserError:
                raise UserError(f"probe_options.backgrounds.conditions: condition {c!r} is unknown; "
                                f"choose from {_all_conditions()}") from None
        opts.conditions = [str(c) for c in dict.fromkeys(names)]
        return opts

    def keys(self, ctx: ProbeContext, methods) -> list[str]:
        conditions = ctx.opts(self.name).conditions
        keys = [f"{c}/{m}" for c in conditions for m in methods]
        if all(c in conditions for c in GAP_CONDITIONS):
            keys += [f"{GAP}/{m}" for m in methods]
        return keys

    def prepare(self, ctx: ProbeContext, keys) -> None:
        ds = getattr(ctx.dataset, "dataset", ctx.dataset) if not hasattr(ctx.dataset, "has_object_masks") else ctx.dataset
        if ctx.objects is None or getattr(ds, "has_object_masks", True) is False:
            reason = getattr(ds, "missing_masks_reason", "no object masks found")
            raise UserError(f"probe 'backgrounds' needs object masks, but the evaluation set has none ({reason}); "
                            f"use a dataset with object masks (IN-9: unpack fg_mask/ beside the variants) or drop the probe")

    # numbers ------------------------------------------------------------------------------
    def _scores(self, ctx: ProbeContext, condition: str, method_name: str) -> torch.Tensor:
        """Softmax scores ``(len(shard), C)`` of this rank's rows under ``condition`` and method (memoised)."""
        spec = get_condition(condition)
        # original and only_bg_t leave nothing removed: the same input under every method.
        memo = ("backgrounds", condition) if condition in ("original", "only_bg_t") else ("backgrounds", condition, method_name)
        if memo in ctx.cache:
            return ctx.cache[memo]
        if condition == "original":
            scores = ctx.shared.clean_logits().softmax(dim=1)
            ctx.cache[memo] = scores
            return scores
        method = ctx.method(method_name)
        n = len(ctx.labels)
        pool = Pool(ctx.images, ctx.labels, ctx.objects, torch.arange(n)) if spec.partner else None
        fallback = []

        def run(rows):
            images, labels, objects = ctx.to_device(ctx.images[rows], ctx.labels[rows], ctx.objects[rows])
            g = ctx.random(self.name, f"{condition}/{method_name}", rows)
            c = apply_condition(condition, images, labels, objects, method, seed=ctx.seed, rows=rows, pool=pool,
                                num_classes=ctx.num_classes, generator=g, mean=ctx.mean)
            fallback.append(c.fallback.cpu())
            return method.logits(ctx.model, c.images, c.keep, g)

        scores = predict(ctx, run).softmax(dim=1)
        ctx.cache[memo] = scores
        ctx.cache[memo + ("fallback",)] = torch.cat(fallback) if fallback else torch.zeros(0, dtype=torch.bool)
        return scores

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, torch.Tensor]:
        condition, method = key.split("/", 1)
        if condition == GAP:
            return {"scores_same": self._scores(ctx, "mixed_same", method), "scores_rand": self._scores(ctx, "mixed_rand", method)}
        scores = self._scores(ctx, condition, method)
        records = {"scores": scores, "scores_original": self._scores(ctx, "original", method)}
        fb = ctx.cache.get(("backgrounds", condition, method, "fallback"))
        if fb is not None and len(fb) == len(scores):
            records["fallback"] = fb
        return records

    def summarise(self, ctx, key, records, rows, subset):
        labels = records["label"][rows].astype(np.int64)
        k, n = ctx.num_classes, int(rows.sum())
        seed = ctx.seed + 15
        counts = _boot_counts(n, ctx.n_boot, seed) if n else np.zeros((ctx.n_boot, 0))
        condition, method = key.split("/", 1)
        if condition == GAP:
            hit_s = records["scores_same"][rows].argmax(1) == labels
            hit_r = records["scores_rand"][rows].argmax(1) == labels
            d = hit_s.astype(np.float64) - hit_r
            boot = counts @ d / max(n, 1)
            entry = stats.mean_value(d, labels, k, 0.0, ctx.class_names, subset, ctx.n_boot, seed)
            entry.update({"ci95": _interval(boot) if n else entry["ci95"], "p_value": _p_two_sided(boot) if n else float("nan"),
                          "metric": "acc(mixed_same) - acc(mixed_rand)", "interval": "paired bootstrap",
                          "acc_mixed_same": float(hit_s.mean()) if n else None, "acc_mixed_rand": float(hit_r.mean()) if n else None,
                          "condition": GAP, "method": method, "flags": []})
            return entry
        scores, original = records["scores"][rows], records["scores_original"][rows]
        hit, hit_o = scores.argmax(1) == labels, original.argmax(1) == labels
        entry = stats.proportion(hit, labels, k, None, ctx.class_names, subset)
        ones = np.ones((1, n))
        per, macro = macro_auc(scores[:, :k], labels, k, ones)
        _, macro_b = macro_auc(scores[:, :k], labels, k, counts)
        _, macro_o = macro_auc(original[:, :k], labels, k, ones)
        _, macro_ob = macro_auc(original[:, :k], labels, k, counts)
        entry["auc"] = {"value": _f(macro[0]), "ci95": _interval(macro_b), "chance": 0.5, "interval": "bootstrap",
                        "per_class": {ctx.class_names[c] if c < len(ctx.class_names) else str(c): _f(per[0, c]) for c in range(k)},
                        "metric": "one-vs-rest macro AUC of the softmax scores"}
        acc_b = counts @ hit.astype(np.float64) / max(n, 1)
        acc_ob = counts @ hit_o.astype(np.float64) / max(n, 1)
        delong = stats.delong_macro_auc_test(scores[:, :k], original[:, :k], labels, k)
        entry["vs_original"] = {
            "accuracy": _diff(float(hit.mean() - hit_o.mean()) if n else float("nan"), acc_b - acc_ob),
            "auc": {"value": _f(delong["value"]), "ci95": [_f(v) for v in delong["ci95"]], "p_value": _f(delong["p_value"]),
                    "se": _f(delong["se"]), "z": _f(delong["z"]), "interval": "DeLong", "test": delong["test"]},
            "auc_bootstrap": _diff(float(macro[0] - macro_o[0]), macro_b - macro_ob),
            "test": "accuracy: paired bootstrap over images (the same resampled images under both conditions); "
                    "AUC: DeLong's paired test (auc), the paired bootstrap beside it (auc_bootstrap)",
        }
        entry.update({"condition": condition, "method": method, "flags": []})
        if "fallback" in records:
            fb = int(records["fallback"][rows].sum())
            entry["fallback"] = fb
            if fb:
                entry["flags"].append(f"{fb} of {n} images had no eligible {condition} partner and took a random one")
        return entry

    def outcomes(self, ctx, key, records, rows):
        """Per image: correct under the condition (1/0); for ``bg_gap``, correct on mixed_same minus on mixed_rand."""
        labels = records["label"].astype(np.int64)
        if key.split("/", 1)[0] == GAP:
            out = (records["scores_same"].argmax(1) == labels).astype(np.float64) - (records["scores_rand"].argmax(1) == labels)
        else:
            out = (records["scores"].argmax(1) == labels).astype(np.float64)
        out[~rows] = np.nan
        return out

    # report.md ----------------------------------------------------------------------------
    def report_rows(self, cols: dict[str, dict]) -> list[str]:
        lines = ["| condition | method | subset | accuracy | 95% CI | AUC | 95% CI | Δacc vs original [95% CI], p (bootstrap) | ΔAUC vs original [95% CI], p (DeLong) | n |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        gaps = []
        for key, entry in cols.items():
            condition, method = key.split("/", 1)
            for e in (entry, entry["correct"]):
                if condition == GAP:
                    gaps.append(f"| {method} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | {fmt_num(e.get('p_value'))} | "
                                f"{fmt_num(e.get('acc_mixed_same'))} | {fmt_num(e.get('acc_mixed_rand'))} | {e['n']} |")
                    continue
                a, v = e["auc"], e["vs_original"]
                da, du = v["accuracy"], v["auc"]
                lines.append(f"| {condition} | {method} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | "
                             f"{fmt_num(a['value'])} | {fmt_ci(a['ci95'])} | {fmt_num(da['value'])} {fmt_ci(da['ci95'])}, {fmt_num(da['p_value'])} | "
                             f"{fmt_num(du['value'])} {fmt_ci(du['ci95'])}, {fmt_num(du['p_value'])} | {e['n']} |")
        if gaps:
            lines += ["", "BG-Gap = acc(mixed_same) − acc(mixed_rand) (paired bootstrap over images):", "",
                      "| method | subset | BG-Gap | 95% CI | p | acc mixed_same | acc mixed_rand | n |",
                      "|---|---|---|---|---|---|---|---|"] + gaps
        lines += ["", "Paired tests against `original`: accuracy by a paired bootstrap over images; AUC (one-vs-rest macro) by "
                  "DeLong's paired test, covariances across classes included (report.json keeps the paired bootstrap "
                  "beside it as `vs_original.auc_bootstrap`)."]
        return lines

    def summary_columns(self, entry: dict) -> dict[str, Any]:
        return {"auc": (entry.get("auc") or {}).get("value")}

    # study --------------------------------------------------------------------------------
    def study_cell(self, entry: dict) -> dict[str, Any]:
        cell = super().study_cell(entry)
        cell["auc"] = (entry.get("auc") or {}).get("value")
        vs = entry.get("vs_original") or {}
        if vs:  # this seed's paired tests against original (accuracy: bootstrap, AUC: DeLong)
            cell["vs_original"] = {m: {f: (vs.get(m) or {}).get(f) for f in ("value", "ci95", "p_value", "interval")}
                                   for m in ("accuracy", "auc", "auc_bootstrap") if m in vs}
        return cell

    @staticmethod
    def _grid(study: dict, cells: dict[str, dict[str, dict]]) -> tuple[list[str], list[str], list[str]]:
        """(methods, test conditions, regimes) present in the cells, in the study's and registry's orders."""
        keys = {k for by_key in cells.values() for k in by_key}
        methods = [m for m in study.get("methods", []) if any(k.endswith("/" + m) for k in keys)]
        methods += sorted({k.split("/", 1)[1] for k in keys} - set(methods))
        order = _all_conditions() + [GAP]
        conditions = sorted({k.split("/", 1)[0] for k in keys}, key=lambda c: order.index(c) if c in order else len(order))
        return methods, conditions, list(study["regimes"])

    def study_markdown(self, study: dict, cells: dict[str, dict[str, dict]]) -> list[str]:
        methods, conditions, regimes = self._grid(study, cells)
        if not methods:
            return []
        chance = study_chance(cells)

        def show(cell: dict | None, metric: str) -> str:
            c = (cell or {}).get(metric) if metric != "value" else cell
            if not c or c.get("mean") is None:
                return "—"
            if metric == "auc":
                return f"{c['mean']:.3f}" + (f" ± {c['std']:.3f}" if c.get("n_seeds", 0) > 1 else "")
            return f"{100 * c['mean']:.1f}" + (f" ± {100 * c['std']:.1f}" if c.get("n_seeds", 0) > 1 else "")

        lines = [f"## {self.name}", "",
                 "Train condition (rows: the training regime) × test condition (columns), mean ± sd over seeds. "
                 f"Accuracy in % (chance {100 * (chance or 0):.1f}%), `bg_gap` = acc(mixed_same) − acc(mixed_rand) in points; "
                 "AUC one-vs-rest macro (chance 0.5). Paired tests against `original` (accuracy: paired bootstrap over "
                 "images; AUC: DeLong) are in each run's report.md, and per seed in study.json.", ""]
        for method in methods:
            for metric, title in (("value", "accuracy (%)"), ("auc", "AUC")):
                cols = [c for c in conditions if metric == "value" or c != GAP]
                lines += [f"### {method}: {title}", "", "| train \\ test | " + " | ".join(cols) + " |",
                          "| --- |" + " ---: |" * len(cols)]
                for regime in regimes:
                    by_key = cells.get(regime, {})
                    lines.append(f"| {regime} | " + " | ".join(show(by_key.get(f"{c}/{method}"), metric) for c in cols) + " |")
                lines.append("")
        return lines

    def study_panels(self, study: dict, cells: dict[str, dict[str, dict]]) -> list:
        methods, conditions, regimes = self._grid(study, cells)
        conditions = [c for c in conditions if c != GAP]
        panels = []
        for method in methods:
            for metric in ("value", "auc"):
                def draw(ax, method=method, metric=metric) -> None:
                    grid = np.full((len(regimes), len(conditions)), np.nan)
                    for i, regime in enumerate(regimes):
                        for j, c in enumerate(conditions):
                            cell = cells.get(regime, {}).get(f"{c}/{method}") or {}
                            cell = cell if metric == "value" else (cell.get("auc") or {})
                            if cell.get("mean") is not None:
                                grid[i, j] = cell["mean"]
                    ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
                    for i in range(len(regimes)):
                        for j in range(len(conditions)):
                            if np.isfinite(grid[i, j]):
                                ax.text(j, i, f"{100 * grid[i, j]:.0f}" if metric == "value" else f"{grid[i, j]:.2f}",
                                        ha="center", va="center", fontsize=6, color="w" if grid[i, j] < 0.75 else "k")
                    ax.set_xticks(range(len(conditions)))
                    ax.set_xticklabels(conditions, rotation=45, ha="right", fontsize=7)
                    ax.set_yticks(range(len(regimes)))
                    ax.set_yticklabels(regimes, fontsize=7)
                    ax.set_xlabel("test condition", fontsize=7)
                    ax.set_ylabel("train regime", fontsize=7)
                    ax.set_title(f"backgrounds {'accuracy' if metric == 'value' else 'AUC'} ({method})", fontsize=8)

                panels.append(draw)
        return panels
