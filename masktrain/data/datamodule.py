"""One Lightning datamodule for every dataset: a factory ``dataset(split=...)`` per config.

Every dataset yields ``(image (3, H, W) float [0, 1], label int, object_mask (1, H, W) {0, 1})``;
the object mask is 1 on the object (converted to keep masks with ``keep = 1 - object``
where a mask is needed).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from masktrain.errors import check
from masktrain.rng import derive_seed

SPLIT_NAMES = ("train", "val", "test")


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch) afresh on every ``iter()``.

    A DataLoader ``generator`` is consumed by each iterator it makes, and Lightning
    makes a different number of them after a resume; this order depends on nothing
    but (seed, epoch), so a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, length: int, seed: int, epoch: int) -> None:
        self.length, self.seed, self.epoch = int(length), int(seed), int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5EED))
        return iter(torch.randperm(self.length, generator=g).tolist())


class MaskDataModule(L.LightningDataModule):
    """Builds train/val/test sets from ``dataset(split=name)``.

    Train sets that define ``set_epoch`` get the trainer's epoch before each train
    loader is built (the trainer reloads loaders every epoch), so synthetic data is
    fresh every epoch and identical on resume.

    Args:
        dataset: factory (a Hydra ``_partial_``) returning a Dataset for a split name, or the
            name of a registered factory (:data:`masktrain.data.DATASETS`).
        num_classes: number of model outputs the labels index; ``None`` = take it from the
            data (:attr:`num_classes` builds the first split to find it). An explicit value
            must equal the dataset's count, or, for a dataset whose labels index a larger
            model (``class_index_file``), be at least its highest label + 1.
        mean: dataset mean colour in [0, 1] (the ``grey`` fill).
    """

    def __init__(
        self,
        dataset: Callable[..., Dataset] | str,
        num_classes: int | None = None,
        name: str = "dataset",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 1,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        pin_memory: bool = False,
        seed: int = 0,
        **_: object,
    ) -> None:
        super().__init__()
        check(int(batch_size) >= 1, f"data.batch_size={batch_size} must be a positive integer")
        check(int(num_workers) >= 0, f"data.num_workers={num_workers} must be >= 0")
        check(len(mean) == 3, f"data.mean={list(mean)!r} must be three numbers (R, G, B)")
        if isinstance(dataset, str):
            from masktrain.data import DATASETS

            dataset = DATASETS.get(dataset)
        self.dataset_factory = dataset
        check(num_classes is None or (isinstance(num_classes, int) and num_classes >= 1),
              f"data.num_classes={num_classes!r} must be a positive integer, or null to take it from the data")
        self.name = name
        self._explicit_classes = None if num_classes is None else int(num_classes)
        self._found_classes: int | None = None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.mean = tuple(float(m) for m in mean)
        self.seed = int(seed)
        self._sets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        """The dataset of one split, built once."""
        check(split in SPLIT_NAMES, f"split {split!r} is unknown; choose one of {list(SPLIT_NAMES)}")
        if split not in self._sets:
            ds = self.dataset_factory(split=split)
            self._check_classes(ds, split)
            self._sets[split] = ds
        return self._sets[split]

    @property
    def num_classes(self) -> int:
        """Number of model outputs: ``data.num_classes`` when given, else the data's own count
        (building the train split if no split is built yet)."""
        if self._explicit_classes is not None:
            return self._explicit_classes
        if self._found_classes is None:
            self.dataset("train")
        check(self._found_classes is not None,
              f"the {self.name} dataset does not say how many classes it has; pass data.num_classes=<K>")
        return int(self._found_classes)

    def _check_classes(self, ds: Dataset, split: str) -> None:
        found = getattr(ds, "num_classes", None)
        if found is None:
            return
        found = int(found)
        # Labels that index a larger model's outputs (a class index file) need only fit in it.
        at_least = bool(getattr(ds, "labels_index_larger_model", False))
        explicit = self._explicit_classes
        if explicit is not None:
            ok = found <= explicit if at_least else found == explicit
            check(ok, f"data.num_classes={explicit} but the {self.name} dataset has "
                      f"{'labels up to ' + str(found - 1) if at_least else str(found) + ' classes'}; "
                      f"pass data.num_classes={found}, or data.num_classes=null to take it from the data")
        elif self._found_classes is None:
            self._found_classes = found
        else:
            check(found == self._found_classes,
                  f"the {self.name} dataset's {split} split has {found} classes but another split has "
                  f"{self._found_classes}; the splits must share one label set (or pass data.num_classes=<K>)")

    def _loader(self, split: str, shuffle: bool, epoch: int = 0) -> DataLoader:
        ds = self.dataset(split)
        return DataLoader(
            ds,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochShuffle(len(ds), self.seed, epoch) if shuffle else None,
            drop_last=shuffle and len(ds) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train")
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        return self._loader("train", shuffle=True, epoch=epoch)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
