"""A compiled (numba) kernel module that is optional: imported on first use, and switched off for the
rest of the process, with one warning, when it cannot be imported or compiled.

numba compiles a kernel at its first call, so a numba/llvmlite that cannot build it fails there;
the caller then takes its torch path, which gives the same result (erase's dense fill, noisy_linear's
torch solver).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from types import ModuleType
from typing import Iterator, Optional

import torch


class OptionalKernels:
    """``get()``: the module ``name`` once imported, or None once it failed; ``disable(exc)`` after a
    failed call. ``owner`` and ``fallback`` name the caller and its torch path in the warning."""

    def __init__(self, name: str, owner: str, fallback: str) -> None:
        self.name, self.owner, self.fallback = name, owner, fallback
        self.module: Optional[ModuleType] = None
        self.failed = False

    def get(self) -> Optional[ModuleType]:
        if self.module is None and not self.failed:
            try:
                self.module = importlib.import_module(self.name)
            except Exception as exc:  # noqa: BLE001 - any import problem means: use the torch path
                self.disable(exc)
        return self.module

    def disable(self, exc: Exception) -> None:
        self.module, self.failed = None, True
        warnings.warn(f"{self.owner}: compiled kernels unavailable ({exc}); using {self.fallback}",
                      RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def numba_threads_like_torch() -> Iterator[int]:
    """numba's thread count set to torch's (capped by numba's pool) for the block, as a torch path
    would run; yields that count and restores numba's own setting afterwards."""
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yield threads
    finally:
        numba.set_num_threads(previous)
