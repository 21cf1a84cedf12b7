"""The probe interface, the context every probe reads, and the registry by name.

A probe is one file: a :class:`Probe` subclass registered with :func:`register_probe`. It
owns its options (a dataclass ``Options`` with the defaults), its requirements
(``needs_object_masks``, ``needs_train_split``; shared inputs through ``ctx.shared``), its
numbers (``collect`` / ``summarise``; ``outcomes``: the headline per test image, for a study's intervals and
between-regime tests) and how they are shown: ``headline`` wording, its rows
in report.md (``report_rows``), its plots (``plots``), its W&B media, and its cells, tables
and panels in a study (``study_cell``, ``study_markdown``, ``study_panels``). The
evaluation, report and study code only iterate over probe objects. See docs/probes.md,
"Writing a probe".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from masktrain.errors import UserError
from masktrain.methods import MaskingMethod, get_method
from masktrain.registry import Registry
from masktrain.rng import SampleRandom, sample_random


@dataclass
class ProbeContext:
    """Everything a probe needs, for one evaluation.

    Tensors hold the whole evaluation set on the CPU (``N`` images, global order);
    ``shard`` are the rows this rank runs the model on (``rank::world_size``).

    images: ``(N, 3, H, W)`` in [0, 1]; labels: ``(N,)`` int64; objects: ``(N, 1, H, W)``
    {0, 1} (1 = object) or None when the dataset has none.
    """

    model: nn.Module
    images: Tensor
    labels: Tensor
    objects: Tensor | None
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    device: torch.device
    shard: Tensor
    batch_size: int = 256
    seed: int = 0
    n_boot: int = 1000
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: Any = None            # the evaluation dataset (donors may need it, e.g. backgrounds)
    dataset_indices: Tensor | None = None  # (N,) index of each row in `dataset`
    train_dataset: Any = None      # a train split, for probes that fit something (mask_only)
    #: Scratch space of one evaluation for a probe's own memos; keys start with the probe's name.
    #: Inputs several probes read come from ``shared`` instead.
    cache: dict[str, Any] = field(default_factory=dict)
    _parsed: dict[str, Any] = field(default_factory=dict, repr=False)
    _shared: Any = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    @property
    def shared(self):
        """The memoised provider of inputs several probes read (:class:`masktrain.probes.shared.SharedInputs`)."""
        if self._shared is None:
            from masktrain.probes.shared import SharedInputs

            self._shared = SharedInputs(self)
        return self._shared

    def method(self, name: str) -> MaskingMethod:
        return get_method(name, self.mean)

    def opts(self, probe: str) -> Any:
        """Probe ``probe``'s options: its ``Options`` dataclass, defaults overridden by ``probe_options.<probe>``."""
        if probe not in self._parsed:
            self._parsed[probe] = get_probe(probe).parse_options(self.options.get(probe))
        return self._parsed[probe]

    def random(self, probe: str, key: str, rows: Tensor, device: torch.device | str | None = None) -> SampleRandom:
        """Per-sample randomness for global ``rows`` ``(b,)``, seeded from (seed, probe, key, row):
        the same numbers for a row whatever the batch size or the number of ranks."""
        return sample_random(self.seed, probe, key, rows, self.device if device is None else device)

    def batches(self) -> list[Tensor]:
        """This rank's rows in batches: a list of global row indices ``(b,)``."""
        return list(torch.split(self.shard, self.batch_size))

    def to_device(self, *tensors: Tensor) -> list[Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def require_objects(self, probe: str) -> Tensor:
        if self.objects is None:
            raise UserError(f"probe {probe!r} needs object masks, but the dataset provides none; choose a dataset with segmentations or drop the probe")
        return self.objects


@dataclass
class NoOptions:
    """A probe without options."""


#: A panel of study.png: ``draw(ax)`` on one matplotlib axis.
Panel = Callable[[Any], None]


class Probe:
    """Base class of every probe; subclasses set the class attributes and override what they need."""

    name: str = ""
    #: The probe's options with their defaults (a dataclass); ``probe_options.<name>`` overrides them.
    Options: type = NoOptions
    needs_object_masks: bool = True
    needs_train_split: bool = False
    #: Whether ``probes=null`` (every registered probe) includes it; False for an expensive probe asked for by name.
    run_by_default: bool = True
    #: What a report key names: "method" or e.g. "mask" (mask_only).
    key_kind: str = "method"

    # --- presentation ---------------------------------------------------------------
    #: What the entry's headline ``value`` is, in report.md and on the leakage plot's axis.
    headline: str = "value"
    #: The wording in study.md (default: ``headline``).
    study_headline: str = ""
    #: study.md shows the headline as a percentage (False: as a plain number, e.g. an AUC).
    percent: bool = True
    #: The reference line the headline is read against: "chance" (the entry's chance level) or "zero" (differences).
    reference: str = "chance"
    #: Whether the probe gets a panel in the summary plot leakage.png.
    summary_panel: bool = True
    #: Extra per-run numbers (keys of :meth:`study_cell`) aggregated over seeds in a study.
    study_spreads: tuple[str, ...] = ()

    # --- options and requirements -----------------------------------------------------
    def parse_options(self, raw: dict | None) -> Any:
        """The ``Options`` from a config mapping; an unknown key is a one-line UserError."""
        raw = dict(raw or {})
        valid = [f.name for f in dataclasses.fields(self.Options)]
        unknown = [k for k in raw if k not in valid]
        if unknown:
            raise UserError(f"probe_options.{self.name}.{unknown[0]}: probe {self.name!r} has no option {unknown[0]!r}; "
                            f"valid options: {valid}")
        return self.Options(**raw)

    def default_options(self) -> dict:
        """The defaults as a plain dict (the config schema evaluate.py composes)."""
        return dataclasses.asdict(self.Options())

    def keys(self, ctx: ProbeContext, methods: Sequence[str]) -> list[str]:
        return list(methods)

    def prepare(self, ctx: ProbeContext, keys: Sequence[str]) -> None:
        """Called for every probe before any ``collect``: declare the shared inputs it will read
        (e.g. ``ctx.shared.want_features(...)``), so whichever probe computes them first computes them once."""

    # --- numbers ------------------------------------------------------------------------
    def collect(self, ctx: ProbeContext, key: str) -> dict[str, Tensor]:
        """Per-sample records for ``ctx.shard``: each value ``(len(shard), ...)`` on the CPU."""
        raise NotImplementedError

    def summarise(self, ctx: ProbeContext, key: str, records: dict[str, np.ndarray], rows: np.ndarray, subset: str) -> dict:
        """A report entry from gathered records restricted to ``rows`` (a bool mask over all N samples)."""
        raise NotImplementedError

    def outcomes(self, ctx: ProbeContext, key: str, records: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray | None:
        """Per-image outcomes of the headline: ``(N,)`` float over all N evaluated images in row order,
        whose mean over the finite entries of ``rows`` is the ``value`` of the entry ``summarise`` returns
        for those rows (e.g. 1/0 per correct answer; −1/0/+1 for a paired arm difference); NaN for an
        image the number does not use. None (the default): the headline is not a mean over test images,
        or does not depend on the model. Called after ``summarise`` with the headline subset (``all``).
        A study bootstraps these over seeds and images and pairs them across regimes by (seed, image)."""
        return None

    def verdict(self, entry: dict, p_value: "float | dict[str, float]", alpha: float = 0.05,
                accuracy: dict | None = None) -> dict:
        """The decision for one entry: does the model read shape, and which way does it go.

        The one place a probe's yes/no comes from. ``p_value`` is either one p-value (a probe
        with a single test: significant = p < α) or the entry's named tests, combined here:

        - ``accuracy``: accuracy above ``chance_independent`` (one-sided exact binomial),
        - ``mi``: mutual information above its permutation null (catches toward *and* away),
        - ``leakage``: the silhouette arm differs from its shape-free control (two-sided exact McNemar),
        - any other name: one more line of evidence, treated like ``accuracy``/``mi``.

        The p-values are Holm-adjusted within the entry; the model reads shape when the
        ``leakage`` test rejects (if the entry has one: the control must not explain the effect)
        **and** at least one other test rejects. The entry's combined ``p_value`` is that rule's
        p-value (max of the leakage one and the smallest other, after Holm), the number
        Benjamini–Hochberg adjusts across a report and a study (``q_report``, ``q_study``; see
        :func:`apply_fdr`). Direction (only when significant), from ``accuracy`` (default: the entry):
        ``toward`` (its accuracy test rejects: predicts the silhouette's class), ``away`` (its
        interval lies below ``chance_independent``: reads the shape and avoids its class, or maps it
        to another class), ``other`` (depends on the shape some other way)."""
        acc = entry if accuracy is None else accuracy
        if not isinstance(p_value, dict):
            significant = bool(p_value < alpha)
            lo, hi = acc["ci95"]
            ref = acc.get("chance")
            direction = "none"
            if significant:
                direction = "toward" if lo > ref else "away" if hi < ref else "other"
            return {"significant": significant, "reads_shape": significant, "direction": direction, "alpha": alpha,
                    "p_value": float(p_value), "rule": "p < alpha"}
        names = list(p_value)
        raw = [float(p_value[n]) if p_value[n] is not None else 1.0 for n in names]
        adjusted = dict(zip(names, stats_holm(raw)))
        others = [adjusted[n] for n in names if n != "leakage"]
        if "leakage" in adjusted:
            combined = max(adjusted["leakage"], min(others)) if others else adjusted["leakage"]
            rule = "Holm within the entry: leakage vs. the control AND (accuracy vs. chance_independent OR MI vs. permutations)"
        else:
            combined = min(others)
            rule = "Holm within the entry: any of " + ", ".join(names)
        significant = bool(combined < alpha)
        direction = "none"
        if significant:
            ref = acc.get("chance_independent", acc.get("chance"))
            if "accuracy" in adjusted and adjusted["accuracy"] < alpha:
                direction = "toward"
            elif acc.get("ci95") and ref is not None and acc["ci95"][1] < ref:
                direction = "away"
            else:
                direction = "other"
        return {"significant": significant, "reads_shape": significant, "direction": direction, "alpha": alpha,
                "p_value": float(combined), "rule": rule,
                "tests": {n: {"p_value": r, "p_holm": adjusted[n]} for n, r in zip(names, raw)}}

    # --- report.md, plots, W&B -------------------------------------------------------------
    def report_rows(self, cols: dict[str, dict]) -> list[str]:
        """The probe's table in report.md (markdown lines); ``cols`` = ``{key: entry}``, each with ``correct``."""
        kind = next(iter(cols.values()), {}).get("key_kind", self.key_kind)
        lines = [f"| {kind} | subset | value | 95% CI | chance | n |", "|---|---|---|---|---|---|"]
        for key, entry in cols.items():
            for e in (entry, entry["correct"]):
                lines.append(f"| {key} | {e['subset']} | {fmt_num(e['value'])} | {fmt_ci(e['ci95'])} | {fmt_num(e.get('chance'))} | {e['n']} |")
        return lines

    def summary_columns(self, entry: dict) -> dict[str, Any]:
        """Extra columns of the probe's rows in the summary table (W&B), beyond value/CI/n/chance."""
        return {}

    def plots(self, report: dict, cols: dict[str, dict], directory: Path) -> list[str]:
        """Write the probe's own plots into ``directory``; returns the file names written."""
        return []

    def wandb_media(self, report: dict, cols: dict[str, dict], files: dict[str, Path]) -> dict[str, Any]:
        """Extra W&B payload (e.g. ``wandb.Image``s) beside the tables and the plot files."""
        return {}

    # --- study ------------------------------------------------------------------------------
    def study_cell(self, entry: dict) -> dict[str, Any]:
        """The numbers a study keeps from one run's report entry."""
        correct = entry.get("correct") or {}
        return {"value": entry.get("value"), "ci95": entry.get("ci95"), "n": entry.get("n"), "chance": entry.get("chance"),
                "correct": {"value": correct.get("value"), "ci95": correct.get("ci95"), "n": correct.get("n")},
                "flags": list(entry.get("flags") or [])}

    def study_markdown(self, study: dict, cells: dict[str, dict[str, dict]]) -> list[str]:
        """The probe's section of study.md; ``cells`` = ``{regime: {key: aggregated cell}}``."""
        keys = study_keys(study, cells)
        if not keys:
            return []
        chance = study_chance(cells)
        unit = " (%, mean ± sd over seeds" if self.percent else " (mean ± sd over seeds"
        unit += " [95% interval: two-level bootstrap over seeds and test images])"
        note = f"; chance {100 * chance:.1f}%" if chance and self.reference == "chance" else ""
        lines = [f"## {self.name}", "", f"{self.study_headline or self.headline}{unit}{note}", ""]
        lines += study_table(study, cells, keys, lambda c: fmt_spread(c, self.percent) + fmt_cell_ci(c, self.percent))
        lines += [""]
        if any("reads_shape" in s for by_key in cells.values() for c in by_key.values() for s in c.get("seeds", {}).values()):
            lines += ["Reads shape — seeds whose verdict is significant after Benjamini–Hochberg across the study "
                      "(direction: toward / away / other):", ""]
            lines += study_table(study, cells, keys, seeds_reading)
            lines += [""]
        return lines

    def study_panels(self, study: dict, cells: dict[str, dict[str, dict]]) -> list[Panel]:
        """Panels of study.png: by default grouped bars (keys × regimes), whiskers = sd over seeds."""
        keys = study_keys(study, cells)
        if not keys:
            return []

        def draw(ax) -> None:
            regimes = study["regimes"]
            width = 0.8 / max(1, len(regimes))
            for i, regime in enumerate(regimes):
                by_key = cells.get(regime, {})
                means = [by_key.get(k, {}).get("mean") or 0.0 for k in keys]
                stds = [by_key.get(k, {}).get("std") or 0.0 for k in keys]
                xs = [j + (i - (len(regimes) - 1) / 2) * width for j in range(len(keys))]
                ax.bar(xs, means, width, yerr=stds, capsize=2, label=regime)
            chance = study_chance(cells)
            if self.reference == "chance" and chance:
                ax.axhline(chance, color="k", linestyle="--", linewidth=1, label="chance")
            if self.reference == "zero":
                ax.axhline(0, color="k", linewidth=0.8)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(keys, rotation=30, ha="right")
            ax.set_title(self.name)

        return [draw]

    def study_check(self, study: dict, cells: dict[str, dict[str, dict]]) -> dict | None:
        """A check the study states before anything else (e.g. "does the baseline read shape?"):
        ``{"title", "status", "message", ...}``, or None."""
        return None


PROBES: Registry[Probe] = Registry("probe", "probes")


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    PROBES.register(cls.name, cls())
    return cls


def get_probe(name: str) -> Probe:
    return PROBES.get(name)


@torch.inference_mode()
def predict(ctx: ProbeContext, run: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``run(rows) -> logits (b, K)`` to every batch of the shard; returns logits ``(len(shard), K)`` on CPU."""
    out = [run(rows).float().cpu() for rows in ctx.batches()]
    if not out:
        return torch.zeros(0, ctx.num_classes)
    return torch.cat(out)


def accuracy_entry(ctx: ProbeContext, labels: np.ndarray, preds: np.ndarray, subset: str) -> dict:
    """Accuracy of ``preds`` against ``labels`` ``(n,)``: Wilson interval, per class, nominal chance 1/K
    and ``chance_independent`` (Σ p(y)·p(ŷ), the accuracy of a label-blind model with these marginals)."""
    from masktrain import stats

    entry = stats.proportion(preds == labels, labels, ctx.num_classes, None, ctx.class_names, subset)
    entry["chance_independent"] = stats.independence_chance(labels, preds, ctx.num_classes)
    return entry


def difference_entry(ctx: ProbeContext, a: np.ndarray, b: np.ndarray, labels: np.ndarray, subset: str, seed: int) -> dict:
    """Paired difference of two per-sample successes ``a − b`` ``(n,)``: bootstrap interval, per class, chance 0."""
    from masktrain import stats

    return stats.mean_value(a.astype(np.float64) - b.astype(np.float64), labels, ctx.num_classes, 0.0,
                            ctx.class_names, subset, ctx.n_boot, seed)


# --- formatting helpers the presentation hooks share -------------------------------------

def verdict_text(v: dict) -> str:
    """A verdict in a table cell: direction, or "no", with the report-level q-value when known."""
    if not v:
        return "–"
    word = v.get("direction", "none") if v.get("significant_report", v.get("significant")) else "no"
    q = v.get("q_report")
    return f"{word} (q={q:.2g})" if q is not None else word


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_ci(ci) -> str:
    if not ci:
        return "–"
    lo, hi = list(ci)
    return f"[{fmt_num(lo)}, {fmt_num(hi)}]"


def fmt_spread(cell: dict | None, pct: bool = True) -> str:
    """``mean ± sd`` of an aggregated study cell (in % when ``pct``), "—" when empty."""
    if not cell or cell.get("mean") is None:
        return "—"
    text = f"{100 * cell['mean']:.1f}" if pct else f"{cell['mean']:.3f}"
    if cell.get("n_seeds", 0) > 1:
        text += f" ± {100 * cell['std']:.1f}" if pct else f" ± {cell['std']:.3f}"
    return text


def fmt_cell_ci(cell: dict | None, pct: bool = True) -> str:
    """`` [lo, hi]`` of an aggregated study cell's two-level bootstrap interval (in % when ``pct``), "" when it has none."""
    ci = (cell or {}).get("ci95")
    if not ci or ci[0] is None:
        return ""
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if pct else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def reading_seeds(cell: dict | None) -> list[str]:
    """Directions of the seeds of an aggregated study cell whose verdict reads shape (study-wide BH)."""
    out = []
    for s in (cell or {}).get("seeds", {}).values():
        v = s.get("reads_shape") or {}
        if v.get("significant_study", v.get("significant_report", v.get("significant"))):
            out.append(v.get("direction", "other"))
    return out


def seeds_reading(cell: dict | None) -> str:
    """``k/n`` seeds reading shape, with their directions, for a study table cell."""
    if not cell or not cell.get("seeds"):
        return "—"
    dirs = reading_seeds(cell)
    n = len(cell["seeds"])
    if not dirs:
        return f"0/{n}"
    return f"{len(dirs)}/{n} ({', '.join(sorted(set(dirs)))})"


def study_keys(study: dict, cells: dict[str, dict[str, dict]]) -> list[str]:
    """The report keys present in any regime, masking methods in the study's order first."""
    methods = study.get("methods", [])
    return sorted({k for by_key in cells.values() for k in by_key},
                  key=lambda k: (methods.index(k) if k in methods else len(methods), k))


def study_chance(cells: dict[str, dict[str, dict]]) -> float | None:
    return next((c.get("chance") for by_key in cells.values() for c in by_key.values() if c.get("chance")), None)


def study_table(study: dict, cells: dict[str, dict[str, dict]], keys: list[str], show: Callable[[dict], str]) -> list[str]:
    """A markdown table: one row per regime, one column per key, ``show(cell)`` in each cell."""
    lines = ["| regime | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for regime in study["regimes"]:
        by_key = cells.get(regime, {})
        lines.append(f"| {regime} | " + " | ".join(show(by_key.get(k)) for k in keys) + " |")
    return lines


def stats_holm(p_values):
    from masktrain import stats

    return stats.holm(p_values)


def iter_verdicts(node: Any, path: tuple = ()):
    """Every verdict dict (a ``reads_shape`` entry with a combined ``p_value``) under ``node``, with its path."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "reads_shape" and isinstance(value, dict) and "p_value" in value:
                yield path, value
            elif name not in ("per_class",):
                yield from iter_verdicts(value, path + (name,))


def apply_fdr(verdicts: list[dict], alpha: float, level: str, family: str) -> None:
    """Benjamini–Hochberg over ``verdicts`` (in place): each gets ``q_<level>``, ``significant_<level>``
    (q < α) and ``family_<level>`` (a sentence naming the family)."""
    from masktrain import stats

    qs = stats.benjamini_hochberg([v["p_value"] for v in verdicts])
    for v, q in zip(verdicts, qs):
        v[f"q_{level}"] = q
        v[f"significant_{level}"] = bool(q < alpha)
        v[f"family_{level}"] = family
