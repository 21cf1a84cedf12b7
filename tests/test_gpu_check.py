"""benchmarks/gpu_check.sh on a CPU machine: its arguments, its dry run (every command it would
run is valid: configs compose, benchmark flags parse) and its refusal without CUDA."""
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from masktrain.cli import compose

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args, env_extra=None, tmp_path=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path or REPO)}
    if tmp_path is not None:
        env["TMPDIR"] = str(tmp_path)
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_help_and_bad_arguments(tmp_path):
    help_ = _run("--help", tmp_path=tmp_path)
    assert help_.returncode == 0 and "--dry-run" in help_.stdout and "--out" in help_.stdout
    bad = _run("--bogus", tmp_path=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu_check: unknown argument '--bogus' (see --help)"
    assert _run("--out", tmp_path=tmp_path).returncode == 2
    assert not list(tmp_path.iterdir())  # nothing made


def _dry_run_steps(tmp_path) -> list[list[str]]:
    result = _run("--dry-run", "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()[1:] if line.strip()]
    assert not (tmp_path / "out").exists()  # a dry run creates nothing
    return [shlex.split(line) for line in lines]


def test_dry_run_lists_every_step_with_the_issue_settings(tmp_path):
    steps = _dry_run_steps(tmp_path)
    assert len(steps) == 6
    text = [" ".join(s) for s in steps]
    assert text[0].startswith("MASKTRAIN_TEST_DEVICE=cuda") and "tests/test_device.py" in text[0]
    assert "recipe=mask_aug" in text[1] and "recipe=layer_mask_aug" in text[2]
    assert all("trainer.accelerator=gpu" in t and "trainer.max_epochs=1" in t for t in text[1:3])
    assert "device=cuda" in text[3] and f"checkpoint={tmp_path / 'out'}/mask_aug/checkpoints/last.ckpt" in text[3]
    for t in text[4:]:
        assert "--device cuda" in t and "resnet50" in t and "--precision fp32 bf16" in t and "224" in t and "64" in t


def test_dry_run_commands_are_valid(tmp_path):
    """The training and evaluation overrides compose, and the benchmarks accept their flags (they
    stop at the missing GPU, after argparse)."""
    steps = _dry_run_steps(tmp_path)
    for argv, config in ((steps[1], "train"), (steps[2], "train"), (steps[3], "evaluate")):
        overrides = [a for a in argv[2:] if not a.startswith("hydra.")]
        cfg = compose(config, overrides)
        assert cfg is not None
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmarks would run in full")
    for argv in steps[4:]:
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "no CUDA device is available" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_it_stops_with_one_clear_line(tmp_path):
    result = _run(tmp_path=tmp_path)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device is visible to torch")
    assert not list(tmp_path.iterdir())  # no temp dir left behind
