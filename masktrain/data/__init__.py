"""Datasets that yield ``(image (3, H, W) in [0, 1], label, object_mask (1, H, W) in {0, 1})``.

Dataset factories ``factory(split, root=None, **kwargs) -> Dataset`` are registered by name in
:data:`DATASETS`; a data config's ``dataset`` is either a Hydra ``_partial_`` factory (as in
recipes/data/*.yaml) or a registered name. Registering a new one, in its own module::

    from masktrain.data import register_dataset

    @register_dataset("mine")
    def mine(split: str, root: str | None = None, **kwargs) -> Dataset: ...

The built-in factories are registered here and imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Callable

from masktrain.registry import Registry

DATASETS: Registry[Callable] = Registry("dataset", "data.dataset")


def register_dataset(name: str, factory: Callable | None = None):
    """Register ``factory(split, root=None, **kwargs) -> Dataset`` as dataset ``name`` (a decorator without ``factory``)."""
    return DATASETS.register(name) if factory is None else DATASETS.register(name, factory)


def _lazy(module: str, attr: str) -> Callable:
    def factory(*args, **kwargs):
        return getattr(importlib.import_module(f"masktrain.data.{module}"), attr)(*args, **kwargs)

    factory.__name__ = factory.__qualname__ = attr
    return factory


for _name in ("shapes", "cues", "coco", "voc", "oxford_pet", "folder", "imagenet_s", "in9"):
    DATASETS.register(_name, _lazy(_name, _name))
# data=silhouettes is the synthetic set formerly called shapes (the class IS the outline): same factory.
DATASETS.register("silhouettes", _lazy("shapes", "shapes"))
