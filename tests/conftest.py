import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing in the tests may reach the network or prompt for a W&B login.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = [
    "data.dataset.image_size=16",
    "data.dataset.lengths.train=64",
    "data.dataset.lengths.val=32",
    "data.dataset.lengths.test=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def run_cli(script: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo entry point in ``cwd`` (so its outputs/ land there)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def break_kernel(monkeypatch, holder, kernels, name: str) -> None:
    """Make compiled kernel ``kernels.<name>`` fail as numba does when it cannot compile, with the
    ``OptionalKernels`` ``holder`` freshly loaded: the caller's next call must warn once and fall back."""
    def broken(*args):
        raise kernels.NumbaError("cannot lower")

    monkeypatch.setattr(kernels, name, broken)
    monkeypatch.setattr(holder, "module", kernels)
    monkeypatch.setattr(holder, "failed", False)
