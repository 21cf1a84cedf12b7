"""Before/after of the compiled neighbour padding, in one process (a benchmark, not a test).

    python benchmarks/layer_masking_padding.py --threads 1 --archs efficientnet_b0 convnext_tiny --repeats 5

For each arch (eval, ``no_grad``, batch 8, 224², random 16×16 patches, about half removed) it
times three calls per round — the plain model, the layer-masked model with the torch padding
(the compiled kernel switched off, as when numba cannot compile) and with the compiled padding —
in alternating order, and prints the median over rounds of each masked/plain ratio. One thread:
CPU time of this process (``time.process_time``); more threads: wall clock.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import timm
import torch

from masktrain.layer_masking import layer_mask
from masktrain.layer_masking import neighbour_padding as npad


def _use_kernel(on: bool) -> None:
    kernels = npad.KERNELS
    kernels.module, kernels.failed = None, not on
    if on:
        kernels.get()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=["efficientnet_b0"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    for arch in args.archs:
        model = timm.create_model(arch).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, 224, 224, generator=g)
        keep = (torch.rand(8, 1, 14, 14, generator=g) > 0.5).float().repeat_interleave(16, 2).repeat_interleave(16, 3)
        masked = layer_mask(model)
        calls: Dict[str, Callable[[], object]] = {
            "plain": lambda: model(x),
            "torch": lambda: (_use_kernel(False), masked(x, keep)),
            "compiled": lambda: (_use_kernel(True), masked(x, keep)),
        }
        times: Dict[str, List[float]] = {k: [] for k in calls}
        with torch.no_grad():
            for call in calls.values():  # warm-up (and the kernel's compilation)
                call()
            order = list(calls)
            for i in range(args.repeats):
                for name in order if i % 2 == 0 else order[::-1]:
                    start = clock()
                    calls[name]()
                    times[name].append(clock() - start)
        _use_kernel(True)
        ratio = {k: statistics.median(m / p for m, p in zip(times[k], times["plain"])) for k in ("torch", "compiled")}
        print(f"{arch} threads {args.threads}: plain {statistics.median(times['plain']) * 1e3:.0f} ms, "
              f"masked torch padding {ratio['torch']:.3f}x, compiled padding {ratio['compiled']:.3f}x", flush=True)


if __name__ == "__main__":
    main()
