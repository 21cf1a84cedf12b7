"""Seeded generators: one stream per (seed, rank, step), so runs repeat and DDP ranks never share masks."""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """Mix integer keys into one 63-bit seed (SeedSequence hashing, so nearby keys decorrelate)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
    """A torch.Generator on ``device`` seeded from (seed, rank, step, stream).

    ``stream`` separates independent uses within one step (e.g. training masks vs.
    validation masks) so they never draw the same numbers.
    """
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(seed, rank, step, stream))
    return g
