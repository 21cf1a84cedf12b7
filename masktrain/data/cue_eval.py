"""Which cues a classifier learned on ``data=cues``: accuracy on the clean, content-only and
outline-only test splits, and its shape-vs-content preference on the cue-conflict split.

    python -m masktrain.data.cue_eval checkpoint=outputs/baseline/<time>/checkpoints/last.ckpt
    python -m masktrain.data.cue_eval checkpoint=<ckpt> n_images=500 out=cues.json

The splits re-render the same test samples (:mod:`masktrain.data.cues`), so the numbers are
paired. Per split the result holds:

- ``accuracy``: prediction == label (Wilson interval). On ``content_only`` / ``outline_only`` a
  perfect one-cue reader is capped at 0.5 (each cue is shared by two classes), chance is 1/K;
- ``cue_consistent``: the prediction is one of the two classes the remaining cue belongs to
  (ceiling 1, chance 2/K) — "the model read this cue";
- on ``cue_conflict`` (content of class A in an outline of class B, the two cues' class pairs
  disjoint): ``shape_share`` (prediction among the outline's classes), ``content_share``
  (among the texture's classes), ``shape_label``/``content_label`` (== B / == A), and
  ``shape_preference`` = shape_share / (shape_share + content_share) with a Wilson interval
  over the predictions that follow one of the cues (0: content only, 1: shape only).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from masktrain.data.cues import CUE_SPLITS, CuesDataset
from masktrain.errors import UserError, check, exit_on_user_error
from masktrain.stats import wilson

SPLITS = ("clean",) + CUE_SPLITS


def _share(hits: np.ndarray) -> dict:
    n, k = int(hits.size), int(hits.sum())
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "n": n, "k": k, "ci95": [lo, hi]}


def cue_arrays(dataset: CuesDataset, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples' cue tables: ``label``, ``outline``/``texture`` (−1 = neutral),
    ``outline_class``/``content_class`` (−1 = none), each ``(n,)`` int64."""
    rows = [dataset.cues(i) for i in range(n)]
    none = lambda v: -1 if v is None else int(v)  # noqa: E731
    return {key: np.array([none(r[key]) for r in rows], dtype=np.int64)
            for key in ("label", "outline", "texture", "outline_class", "content_class")}


@torch.inference_mode()
def predictions(model: nn.Module, dataset: CuesDataset, n: int, batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """Argmax predictions ``(n,)`` of ``model`` (pixel-space ``(B,3,H,W)`` in [0,1] -> logits) on the first ``n`` samples."""
    preds = []
    for start in range(0, n, batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))]).to(device)
        preds.append(model(images).argmax(dim=1).cpu())
    return torch.cat(preds).numpy()


def split_entry(split: str, dataset: CuesDataset, preds: np.ndarray, cues: dict[str, np.ndarray]) -> dict:
    """The summary of one split from predictions and the cue tables (module docstring)."""
    k = dataset.num_classes
    entry: dict = {"accuracy": _share(preds == cues["label"]), "chance": 1.0 / k, "n": int(preds.size)}
    outline_ok = np.array([o >= 0 and dataset.outline_classes(o)[p] for o, p in zip(cues["outline"], preds)], dtype=bool)
    texture_ok = np.array([t >= 0 and dataset.texture_classes(t)[p] for t, p in zip(cues["texture"], preds)], dtype=bool)
    if split == "content_only":
        entry["cue_consistent"] = _share(texture_ok)
    elif split == "outline_only":
        entry["cue_consistent"] = _share(outline_ok)
    elif split == "cue_conflict":
        entry["shape_share"] = _share(outline_ok)
        entry["content_share"] = _share(texture_ok)
        entry["shape_label"] = _share(preds == cues["outline_class"])
        entry["content_label"] = _share(preds == cues["content_class"])
        followed = outline_ok | texture_ok
        entry["shape_preference"] = _share(outline_ok[followed])
    if split != "clean":
        entry["cue_chance"] = 2.0 / k
    return entry


def cue_report(model: nn.Module, factory: Callable[[str], CuesDataset], n_images: int | None = 2000,
               batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Evaluate ``model`` on the clean and cue splits made by ``factory(split)``
    (``split`` in ``test, content_only, outline_only, cue_conflict``; e.g. a datamodule's
    ``dataset_factory``). Returns ``{split: entry}`` for :data:`SPLITS` (``clean`` = test)."""
    report = {}
    for split in SPLITS:
        ds = factory("test" if split == "clean" else split)
        check(isinstance(ds, CuesDataset), f"cue evaluation needs the cues dataset (data=cues), got {type(ds).__name__}")
        n = len(ds) if n_images is None else min(int(n_images), len(ds))
        check(n >= 1, f"n_images={n_images} must be positive")
        report[split] = split_entry(split, ds, predictions(model, ds, n, batch_size, device), cue_arrays(ds, n))
    return report


def format_report(report: dict) -> str:
    """One line per split: accuracy, cue consistency / shape preference, with 95% intervals."""
    def pct(e: dict) -> str:
        return f"{100 * e['value']:.1f}% [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}]"

    lines = []
    for split, e in report.items():
        line = f"{split:>13}: accuracy {pct(e['accuracy'])} (chance {100 * e['chance']:.0f}%)"
        if "cue_consistent" in e:
            line += f", cue-consistent {pct(e['cue_consistent'])} (chance {100 * e['cue_chance']:.0f}%)"
        if "shape_preference" in e:
            line += (f", shape {pct(e['shape_share'])}, content {pct(e['content_share'])}, "
                     f"shape preference {pct(e['shape_preference'])}")
        lines.append(line)
    return "\n".join(lines)


def _parse(argv: list[str]) -> dict[str, str]:
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        check(sep == "=" and key in {"checkpoint", "n_images", "batch_size", "device", "out"},
              f"argument {arg!r} is not understood; use checkpoint=<ckpt> [n_images=2000] [batch_size=256] [device=cpu] [out=<file.json>]")
        args[key] = value
    check("checkpoint" in args, "checkpoint=<run dir>/checkpoints/last.ckpt is required")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from hydra.utils import instantiate

    from masktrain.checkpoint import load_classifier

    args = _parse(sys.argv[1:] if argv is None else argv)
    device = args.get("device", "cpu")
    model, config = load_classifier(args["checkpoint"], map_location=device)
    data = config.get("data", {})
    target = data.get("dataset", {}).get("_target_", "")
    check(target == "masktrain.data.cues.cues",
          f"checkpoint {args['checkpoint']!r} was trained on {data.get('name', target)!r}, not data=cues; cue evaluation needs the cues dataset")
    try:
        n_images = int(args.get("n_images", 2000))
        batch_size = int(args.get("batch_size", 256))
    except ValueError as exc:
        raise UserError(f"n_images and batch_size must be integers ({exc})") from exc
    datamodule = instantiate(data)
    report = cue_report(model, datamodule.dataset_factory, n_images, batch_size, device)
    print(format_report(report))
    if "out" in args:
        out = Path(args["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"checkpoint": args["checkpoint"], "splits": report}, indent=2))
        os.replace(tmp, out)
    return report


if __name__ == "__main__":
    main()
