"""Generating a training batch of the cues data: one sample at a time vs the batched fetch.

    python benchmarks/cues_batch.py                 # batch 128 at 32², 8 rounds, torch's default threads
    python benchmarks/cues_batch.py --threads 1 --rounds 12

Both go through a DataLoader (``num_workers=0``, the default collate) over the same train
split and the same shuffled batches: ``per-sample`` hides ``__getitems__`` (the loader then
calls ``dataset[i]`` per index, as before batching), ``batched`` is the dataset itself
(``CuesDataset.__getitems__``). Rounds alternate A/B; medians are printed, and the batches
are checked to be equal.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from masktrain.data.cues import CuesDataset  # noqa: E402


class OneByOne(Dataset):
    """The dataset without ``__getitems__``: the loader fetches ``dataset[i]`` per index."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        return self.ds[index]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = CuesDataset("train", length=args.batch * args.batches, image_size=args.size, epoch=1)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loaders = {"per-sample": DataLoader(OneByOne(ds), batch_size=args.batch, sampler=order),
               "batched": DataLoader(ds, batch_size=args.batch, sampler=order)}
    first = {name: next(iter(loader)) for name, loader in loaders.items()}
    assert all(torch.equal(a, b) for a, b in zip(first["per-sample"], first["batched"])), "batches differ"
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _batch in loader:
                pass
            times[name].append((time.perf_counter() - start) / args.batches)
    a, b = (statistics.median(times[n]) for n in ("per-sample", "batched"))
    print(f"cues train batch {args.batch} at {args.size}², {torch.get_num_threads()} torch threads, "
          f"median of {args.rounds} alternating rounds of {args.batches} batches")
    print(f"  per-sample  {a * 1e3:7.1f} ms/batch")
    print(f"  batched     {b * 1e3:7.1f} ms/batch   ({a / b:.2f}x faster)")


if __name__ == "__main__":
    main()
