"""Run shape-leakage probes on one model and return the report dict.

:func:`evaluate` is the core the ``evaluate.py`` CLI wraps (and a multi-checkpoint study
can call): it loads the evaluation set once, runs each probe per masking method on this
rank's shard of rows (``rank::world_size``, so DistributedSampler padding never duplicates
a sample), gathers per-sample records with their row indices from all ranks, and computes
every statistic on the complete, deduplicated set — identical on every rank.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from masktrain import stats
from masktrain.errors import UserError, check
from masktrain.fills import IMAGENET_MEAN
from masktrain.methods import get_method
from masktrain.probes import PROBES, ProbeContext, get_probe

DEFAULT_METHODS = ("black", "grey", "noise", "blur")
SUBSETS = ("all", "correct")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_records(records: dict[str, Tensor], shard: Tensor, total: int) -> dict[str, np.ndarray]:
    """Per-sample records of every rank, placed at their global row: ``{name: (total, ...)}``.

    Each rank holds rows ``shard``; rows are disjoint across ranks, and the result is
    checked to cover each row exactly once, so counts are exact under DDP.
    """
    rank, world = _world()
    parts = [(shard, records)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (shard.cpu(), {k: v.cpu() for k, v in records.items()}))
    seen = np.zeros(total, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for rows, recs in parts:
        rows_np = rows.numpy()
        np.add.at(seen, rows_np, 1)
        for name, value in recs.items():
            v = value.numpy()
            if name not in out:
                out[name] = np.zeros((total,) + v.shape[1:], dtype=v.dtype)
            out[name][rows_np] = v
    if not (seen == 1).all():
        raise RuntimeError(f"gathered records cover rows {int((seen == 0).sum())} times zero and {int((seen > 1).sum())} times twice or more")
    return out


def _resolve_data(data: Any, split: str, need_train: bool, mean, num_classes) -> tuple[Dataset, Dataset | None, tuple, int, str]:
    """(eval dataset, train dataset or None, mean colour, number of classes, name) from a datamodule or a dataset."""
    if hasattr(data, "dataset") and callable(data.dataset):
        ds = data.dataset(split)
        train = None
        if need_train and split != "train":
            try:
                train = data.dataset("train")
            except Exception:  # noqa: BLE001 - a datamodule without a train split falls back to cross-fitting
                train = None
        return ds, train, tuple(mean or data.mean), int(num_classes or data.num_classes), str(getattr(data, "name", type(ds).__name__))
    check(isinstance(data, Dataset) or hasattr(data, "__getitem__"), f"evaluate() needs a datamodule or a dataset, got {type(data).__name__}")
    k = num_classes or getattr(data, "num_classes", None)
    check(k is not None, "evaluate() on a plain dataset needs num_classes=")
    return data, None, tuple(mean or IMAGENET_MEAN), int(k), type(data).__name__


def load_split(ds: Dataset, indices: Sequence[int], batch_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Images ``(N, 3, H, W)``, labels ``(N,)`` and object masks ``(N, 1, H, W)`` (None if the dataset has none)."""
    loader = DataLoader(Subset(ds, list(indices)), batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=lambda items: items)
    images, labels, objects = [], [], []
    has_objects = True
    for items in loader:
        for item in items:
            check(isinstance(item, (tuple, list)) and len(item) >= 2, "dataset samples must be (image, label[, object_mask]) tuples")
            images.append(torch.as_tensor(item[0], dtype=torch.float32))
            labels.append(int(item[1]))
            obj = item[2] if len(item) >= 3 else None
            has_objects = has_objects and obj is not None
            if has_objects:
                objects.append((torch.as_tensor(obj, dtype=torch.float32).reshape(1, *images[-1].shape[-2:]) > 0.5).float())
    img = torch.stack(images)
    check(img.dim() == 4 and img.shape[1] == 3, f"dataset images must be (3, H, W), got {tuple(img.shape[1:])}")
    return img, torch.tensor(labels, dtype=torch.long), torch.stack(objects) if has_objects and objects else None


def check_options(options: dict[str, Any]) -> None:
    """Every ``probe_options.<probe>`` names a registered probe and only its options (one-line UserErrors)."""
    for name, raw in options.items():
        check(raw is None or isinstance(raw, dict), f"probe_options.{name} must be a mapping of options, got {raw!r}")
        get_probe(str(name)).parse_options(raw)


def default_probes() -> list[str]:
    """The probes ``probes=None`` runs: every registered one except those with ``run_by_default = False``."""
    return [name for name, probe in PROBES.items() if probe.run_by_default]


def _device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(
    model: nn.Module,
    data: Any,
    probes: Sequence[str] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    split: str = "test",
    n_images: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    options: dict[str, dict] | None = None,
    n_boot: int = 1000,
    mean: Sequence[float] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run ``probes`` (default: every registered probe) × ``methods`` on ``model`` and return the
    report dict (schema: docs/probes.md). ``options``: ``{probe: {option: value}}`` over each probe's defaults.

    model: pixel-space classifier, ``images (B, 3, H, W) in [0, 1] -> logits (B, K)``, with
    ``.features(images) -> (B, D)`` for probes that read features. data: a MaskDataModule (split
    ``split``; its train split feeds probes with ``needs_train_split``) or a dataset of
    ``(image, label, object_mask)``.
    """
    log = log or (lambda msg: None)
    started = time.perf_counter()
    probes = default_probes() if probes is None else list(probes)
    methods = list(methods)
    check(len(probes) > 0, "probes=[] is empty; choose from " + str(PROBES.names()))
    probe_objs = [get_probe(p) for p in probes]
    check(len(methods) > 0 or all(p.key_kind != "method" for p in probe_objs), "methods=[] is empty")
    for m in methods:
        get_method(m)  # unknown names fail here, before any work
    options = dict(options or {})
    check_options(options)
    need_objects = [p.name for p in probe_objs if p.needs_object_masks]
    need_train = any(p.needs_train_split for p in probe_objs)
    ds, train_ds, mean, k, ds_name = _resolve_data(data, split, need_train, mean, num_classes)
    total = len(ds)
    check(total > 0, f"the {split} split is empty")
    n = total if not n_images else min(int(n_images), total)
    indices = torch.arange(n)

    images, labels, objects = load_split(ds, indices.tolist(), batch_size)
    if objects is None and need_objects:
        raise UserError(f"dataset {ds_name!r} has no object masks, which probes {need_objects} need; "
                        f"use a dataset with segmentations or probes={[p for p in PROBES if not get_probe(p).needs_object_masks]}")
    check(int(labels.max()) < k and int(labels.min()) >= 0, f"dataset labels reach {int(labels.max())} but num_classes={k}")
    names = list(class_names or getattr(ds, "classes", None) or [str(c) for c in range(k)])
    dev = _device(device)
    model = model.to(dev).eval()
    if dev.type == "cpu":
        # Channels-last convolutions: the same sums, ~20-35% more images/s for resnet18 at 32-64² on 2 cores.
        model = model.to(memory_format=torch.channels_last)
    rank, world = _world()
    ctx = ProbeContext(model=model, images=images, labels=labels, objects=objects, num_classes=k, class_names=names,
                       mean=tuple(float(x) for x in mean), device=dev, shard=indices[rank::world], batch_size=int(batch_size),
                       seed=int(seed), n_boot=int(n_boot), options=options, dataset=ds, dataset_indices=indices,
                       train_dataset=train_ds)
    log(f"evaluating {n} {split} images of {ds_name} ({k} classes) on {dev}, rank {rank}/{world}")

    clean_logits = ctx.shared.clean_logits()  # (len(shard), K); probes reuse it where their input is the unmasked image
    # +1: a model read through data.in9.map_imagenet=true has a no-IN-9-class column (always wrong).
    if clean_logits.shape[1] != k + int(getattr(model, "no_class_column", False)):
        raise UserError(f"the model outputs {clean_logits.shape[1]} classes but the dataset has {k}; "
                        f"evaluate on the data the model was trained for")
    base = gather_records({"clean_pred": clean_logits.argmax(1)}, ctx.shard, n)
    base["label"] = labels.numpy()
    subsets = {"all": np.ones(n, dtype=bool), "correct": base["clean_pred"] == base["label"]}
    clean = {s: stats.proportion(base["clean_pred"][r] == base["label"][r], base["label"][r], k, None, names, s)
             for s, r in subsets.items()}

    keys = {probe.name: probe.keys(ctx, methods) for probe in probe_objs}
    for probe in probe_objs:
        probe.prepare(ctx, keys[probe.name])  # declare shared inputs before any probe computes them
    report_probes: dict[str, dict] = {}
    outcomes: dict[str, dict[str, np.ndarray]] = {}
    timings: dict[str, float] = {}
    for probe in probe_objs:
        report_probes[probe.name] = {}
        for key in keys[probe.name]:
            t0 = time.perf_counter()
            records = gather_records(probe.collect(ctx, key), ctx.shard, n)
            records.update(base)
            entry = probe.summarise(ctx, key, records, subsets["all"], "all")
            entry["correct"] = probe.summarise(ctx, key, records, subsets["correct"], "correct")
            entry["key_kind"] = probe.key_kind
            report_probes[probe.name][key] = entry
            per_image = probe.outcomes(ctx, key, records, subsets["all"])
            if per_image is not None:
                outcomes.setdefault(probe.name, {})[key] = np.asarray(per_image, dtype=np.float64).reshape(n)
            timings[f"{probe.name}/{key}"] = round(time.perf_counter() - t0, 3)
            log(f"  {probe.name:18s} {key:14s} value={_fmt(entry.get('value'))} ci95={_fmt_ci(entry.get('ci95'))} ({timings[f'{probe.name}/{key}']:.1f}s)")

    fdr = report_fdr(report_probes)
    flags = [f"{p}/{key}: {flag}" for p, cols in report_probes.items() for key, e in cols.items() for flag in e.get("flags", [])]
    if clean["all"]["ci95"][0] <= 1.0 / k:
        flags.append("model: unmasked accuracy is not above chance; no probe result means the model reads or ignores shape")
    return {
        "schema_version": 1,
        "probes": report_probes,
        "model": {"name": getattr(model, "name", type(model).__name__) or type(model).__name__, "num_classes": k,
                  "parameters": int(sum(p.numel() for p in model.parameters()))},
        "dataset": {"name": ds_name, "split": split, "n": n, "size": n, "total": total, "num_classes": k, "classes": names,
                    "image_size": list(images.shape[-2:]), "mean": list(ctx.mean), "object_masks": objects is not None,
                    "fingerprint": fingerprint(images, labels),
                    "clean_accuracy": clean["all"], "correct_subset_n": int(subsets["correct"].sum())},
        "clean_accuracy": clean,
        "flags": flags,
        "multiplicity": fdr,
        # Per-image outcomes of each headline over all n images (Probe.outcomes), for a study's intervals and
        # between-regime tests; write_report stores them in outcomes.npz beside report.json, not in it.
        "outcomes": outcomes,
        "config": {"probes": probes, "methods": methods, "split": split, "n_images": n, "batch_size": batch_size,
                   "seed": seed, "n_boot": n_boot, "options": options, "world_size": world},
        "timing": {"total_s": round(time.perf_counter() - started, 3), "per_probe_s": timings, "device": str(dev)},
    }


def fingerprint(images: Tensor, labels: Tensor) -> str:
    """SHA-1 of the evaluated images ``(N, 3, H, W)`` and labels ``(N,)``: two reports with the same
    fingerprint scored the same test images in the same order (a study pairs them image by image)."""
    import hashlib

    h = hashlib.sha1()
    h.update(np.ascontiguousarray(images.numpy(), dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels.numpy(), dtype=np.int64).tobytes())
    return h.hexdigest()


def report_fdr(report_probes: dict, alpha: float = 0.05) -> dict:
    """Benjamini–Hochberg over every ``reads_shape`` verdict of a report, one family per subset
    (``all``: the headline; ``correct``), in place: each verdict gains ``q_report``,
    ``significant_report`` and ``family_report``. Returns the families' sizes."""
    from masktrain.probes.base import apply_fdr, iter_verdicts

    families: dict[str, list[dict]] = {"all": [], "correct": []}
    seen: set[int] = set()
    for path, verdict in iter_verdicts(report_probes):
        if id(verdict) in seen:
            continue  # a headline entry can share a verdict with one of its sub-entries (the first donor)
        seen.add(id(verdict))
        families["correct" if "correct" in path else "all"].append(verdict)
    out = {}
    for subset, verdicts in families.items():
        family = (f"every reads_shape verdict of this report on subset {subset!r} "
                  f"(probe × key × donor; {len(verdicts)} tests)")
        apply_fdr(verdicts, alpha, "report", family)
        out[subset] = {"tests": len(verdicts), "method": "Benjamini–Hochberg", "alpha": alpha, "family": family}
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fmt_ci(ci) -> str:
    return "n/a" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"
