"""The probe interface, the context every probe reads, and the registry by name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from masktrain.errors import UserError
from masktrain.methods import MaskingMethod, get_method
from masktrain.rng import step_generator


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
    cache: dict[str, Any] = field(default_factory=dict)
    probes: tuple[str, ...] = ()   # the probes of this evaluation (a probe may keep inputs another reuses)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def method(self, name: str) -> MaskingMethod:
        return get_method(name, self.mean)

    def opts(self, probe: str) -> dict[str, Any]:
        return dict(self.options.get(probe, {}) or {})

    def generator(self, stream: int, step: int = 0) -> torch.Generator:
        """A CPU generator for global draws: identical on every rank, so shards agree."""
        return step_generator(self.seed, 0, step, "cpu", stream)

    def batches(self) -> list[Tensor]:
        """This rank's rows in batches: a list of global row indices ``(b,)``."""
        return list(torch.split(self.shard, self.batch_size))

    def to_device(self, *tensors: Tensor) -> list[Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def require_objects(self, probe: str) -> Tensor:
        if self.objects is None:
            raise UserError(f"probe {probe!r} needs object masks, but the dataset provides none; choose a dataset with segmentations or drop the probe")
        return self.objects


class Probe:
    """Base class. ``keys`` are the columns of the probe's report (masking methods by default)."""

    name: str = ""
    needs_object_masks: bool = True
    #: What a report key names: "method" or e.g. "mask" (mask_only).
    key_kind: str = "method"

    def keys(self, ctx: ProbeContext, methods: Sequence[str]) -> list[str]:
        return list(methods)

    def collect(self, ctx: ProbeContext, key: str) -> dict[str, Tensor]:
        """Per-sample records for ``ctx.shard``: each value ``(len(shard), ...)`` on the CPU."""
        raise NotImplementedError

    def summarise(self, ctx: ProbeContext, key: str, records: dict[str, np.ndarray], rows: np.ndarray, subset: str) -> dict:
        """A report entry from gathered records restricted to ``rows`` (a bool mask over all N samples)."""
        raise NotImplementedError


PROBES: dict[str, Probe] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    PROBES[cls.name] = cls()
    return cls


def get_probe(name: str) -> Probe:
    if name not in PROBES:
        raise UserError(f"probe {name!r} is unknown; choose from {list(PROBES)}")
    return PROBES[name]


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
