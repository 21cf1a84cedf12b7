"""Kill a training run with SIGKILL mid-epoch, resume it, and end exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

ARGS = [
    "logger=csv", "data.dataset.image_size=16", "data.dataset.lengths.train=320",
    "data.dataset.lengths.val=32", "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]
STEPS = 3 * 320 // 16


def _start(run_dir, recipe, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "train.py"), f"recipe={recipe}", *ARGS, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mask_aug", "mixed_rand"])  # mixed_rand: partners drawn per step, resumed exactly
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, recipe):
    reference = _start(tmp_path / "reference", recipe)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert expected["global_step"] == STEPS

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
