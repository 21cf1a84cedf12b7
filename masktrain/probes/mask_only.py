"""``mask_only`` (ROAD-style): how much class information the keep masks carry at all.

A tiny CNN sees only the keep mask (no image), is trained on masks of a train split and
scored on the evaluation masks. Its accuracy is a lower bound on the class information the
masks carry (what this small classifier extracts), not a ceiling on what can leak; method
independent, so its report keys are mask kinds (``silhouette``, ``bbox``, ``broken``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masktrain.probes.base import Probe, ProbeContext, accuracy_entry, register_probe
from masktrain.probes.inputs import CONTROL_HOLES
from masktrain.rng import derive_seed, name_key

@dataclass
class Options:
    kinds: list = field(default_factory=lambda: ["silhouette", "bbox"])  # control holes (report keys)
    train_size: int = 2000
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.003
    resolution: int = 32


# Predictions by content: the probe never looks at the model, so a study that evaluates many
# checkpoints on the same data trains each mask classifier once (keyed by a hash of everything
# the fit and the scoring read: masks, labels, kind, options, seed, classes, device).
_PREDICTIONS: dict[str, Tensor] = {}
_MAX_CACHED = 32


def _fingerprint(*parts) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


class MaskNet(nn.Module):
    """``(B, 1, r, r)`` keep mask -> logits ``(B, K)``."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, keep: Tensor) -> Tensor:
        return self.head(self.body(keep * 2 - 1))


def _resize(keep: Tensor, resolution: int) -> Tensor:
    # Area-average so thin structures survive as grey values rather than vanish.
    return keep if keep.shape[-1] == resolution else F.adaptive_avg_pool2d(keep, resolution)


def train_split(ctx: ProbeContext, size: int) -> tuple[Tensor, Tensor, str]:
    """Object masks ``(n, 1, H, W)`` and labels ``(n,)`` to fit on, and where they came from."""
    if "mask_only/train" not in ctx.cache:
        ds = ctx.train_dataset
        if ds is not None:
            n = min(size, len(ds))
            items = [ds[i] for i in range(n)]
            objects = torch.stack([torch.as_tensor(it[2], dtype=torch.float32) for it in items])
            labels = torch.tensor([int(it[1]) for it in items])
            ctx.cache["mask_only/train"] = (objects, labels, "train split")
        else:
            ctx.cache["mask_only/train"] = (None, None, "cross-fit on the evaluation set (2 folds)")
    return ctx.cache["mask_only/train"]


def fit(objects: Tensor, labels: Tensor, kind: str, ctx: ProbeContext, opts: Options) -> MaskNet:
    # Seeded from (seed, probe, kind) alone: the same model on every rank, whatever the batching,
    # without touching the global RNG of the caller.
    seed = derive_seed(ctx.seed, name_key("mask_only"), name_key(kind))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MaskNet(ctx.num_classes).to(ctx.device)
    opt = torch.optim.AdamW(net.parameters(), lr=opts.lr)
    keep = _resize(CONTROL_HOLES.get(kind)(objects), opts.resolution)
    g = torch.Generator().manual_seed(seed)
    n, bs = keep.shape[0], int(opts.batch_size)
    steps = max(1, int(opts.epochs) * max(1, n // bs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        x, y = ctx.to_device(keep[idx], labels[idx])
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@register_probe
class MaskOnly(Probe):
    name = "mask_only"
    Options = Options
    key_kind = "mask"
    needs_train_split = True
    headline = "accuracy from the keep mask alone"

    def parse_options(self, raw):
        opts = super().parse_options(raw)
        opts.kinds = list(opts.kinds)
        for kind in opts.kinds:
            CONTROL_HOLES.get(kind)
        return opts

    def keys(self, ctx, methods):
        return list(ctx.opts(self.name).kinds)

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, Tensor]:
        opts = ctx.opts(self.name)
        objects = ctx.require_objects(self.name)
        train_obj, train_lab, source = train_split(ctx, int(opts.train_size))
        ctx.cache["mask_only/source"] = source
        fit_on = (train_obj, train_lab) if train_obj is not None else (objects, ctx.labels)
        cache_key = _fingerprint(*fit_on, objects[ctx.shard], ctx.shard % 2, key, dataclasses.asdict(opts), ctx.seed, ctx.num_classes, str(ctx.device))
        if cache_key not in _PREDICTIONS:
            if len(_PREDICTIONS) >= _MAX_CACHED:
                _PREDICTIONS.pop(next(iter(_PREDICTIONS)))
            _PREDICTIONS[cache_key] = self._predict(ctx, key, opts, objects, train_obj, train_lab)
        return {"pred": _PREDICTIONS[cache_key].clone()}

    def _predict(self, ctx, key, opts, objects, train_obj, train_lab) -> Tensor:
        keep = _resize(CONTROL_HOLES.get(key)(objects[ctx.shard]), opts.resolution)
        if train_obj is not None:
            net = fit(train_obj, train_lab, key, ctx, opts)
            with torch.inference_mode():
                pred = torch.cat([net(ctx.to_device(b)[0]).argmax(1).cpu() for b in torch.split(keep, ctx.batch_size)])
        else:
            # Cross-fit: rows with even global index train the model scoring odd rows, and vice versa.
            pred = torch.empty(len(ctx.shard), dtype=torch.long)
            for part in (0, 1):
                fit_rows = torch.nonzero(torch.arange(len(ctx.labels)) % 2 == part).squeeze(1)
                net = fit(objects[fit_rows], ctx.labels[fit_rows], key, ctx, opts)
                score = (ctx.shard % 2) != part
                with torch.inference_mode():
                    if score.any():
                        pred[score] = net(ctx.to_device(keep[score])[0]).argmax(1).cpu()
        return pred

    def summarise(self, ctx, key, records, rows, subset):
        labels = records["label"][rows]
        entry = accuracy_entry(ctx, labels, records["pred"][rows], subset)
        entry.update(metric="accuracy of a classifier that sees only the keep mask",
                     trained_on=ctx.cache.get("mask_only/source"), flags=[])
        return entry
