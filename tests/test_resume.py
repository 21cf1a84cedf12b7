"""Kill a training run with SIGKILL mid-epoch, resume it, and end exactly where an uninterrupted run ends.

With the default logger (W&B, offline), as users run it: the resumed part logs to the same
W&B run (wandb writes it as a second ``offline-run-*`` directory with the same id, which
``wandb sync`` uploads into that run), and the trainer's step continues from the checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from wandb_files import read_offline_run

ARGS = [
    "data.dataset.image_size=16", "data.dataset.lengths.train=320",
    "data.dataset.lengths.val=32", "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]
STEPS = 3 * 320 // 16
FINAL = ("val/acc_clean", "val/acc_masked", "test/acc_clean", "test/acc_masked")


def _start(run_dir, recipe, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    # In-process W&B tests earlier in the session export WANDB_SERVICE; a child that inherits it joins
    # pytest's wandb-core, which keeps the killed run's id registered as long as pytest lives.
    env.pop("WANDB_SERVICE", None)
    cmd = [sys.executable, str(REPO / "train.py"), f"recipe={recipe}", *ARGS, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _parts(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))  # oldest first: the names start with the time


def _steps(record):
    return [h["trainer/global_step"] for h in record["history"] if "trainer/global_step" in h]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mask_aug", "mixed_rand"])  # mixed_rand: partners drawn per step, resumed exactly
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, recipe):
    reference = _start(tmp_path / "reference", recipe)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert expected["global_step"] == STEPS
    (reference_run,) = _parts(tmp_path / "reference")

    run_dir = tmp_path / "killed"
    proc = _start(run_dir, recipe)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(1.0)  # into the next epoch
    assert proc.poll() is None, "the run finished before it could be killed mid-epoch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    saved_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < saved_step < STEPS

    resumed = _start(run_dir, recipe, "resume=true")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == expected

    # One W&B run: the killed part and the resumed part share its id.
    killed_part, resumed_part = _parts(run_dir)
    first, second = read_offline_run(killed_part, partial=True), read_offline_run(resumed_part)
    # The killed part's directory is named by its id at wandb.init; its records may be cut short: SIGKILL
    # gives wandb-core no chance to flush, so only the name is compared.
    assert killed_part.name.endswith("-" + second["run"]["id"]) and first.get("run", {}).get("id", second["run"]["id"]) == second["run"]["id"]
    assert second["run"]["name"] == f"{recipe}-seed0" and second["config"]["resume"] is True
    # The step continues from the checkpoint; wandb's own counter only counts up (no explicit, backwards step).
    assert min(_steps(second)) >= saved_step and max(_steps(second)) == STEPS
    assert [h["_step"] for h in second["history"]] == list(range(len(second["history"])))
    # Steps the killed part logged after its checkpoint are logged again, with the same values (exact resume).
    logged = {(h["trainer/global_step"], k): v for h in first["history"] for k, v in h.items()
              if k in ("train/loss_step", "val/acc_clean") and "trainer/global_step" in h}
    again = {(h["trainer/global_step"], k): v for h in second["history"] for k, v in h.items() if (h.get("trainer/global_step"), k) in logged}
    assert all(logged[key] == value for key, value in again.items())
    # W&B's summary of the resumed run = that of the uninterrupted one.
    uninterrupted = read_offline_run(reference_run)
    for key in FINAL:
        assert second["summary"][key] == uninterrupted["summary"][key] == pytest.approx(expected[key], abs=1e-6), key
