"""Bad-input catalogue: every case exits non-zero with one line naming the problem,
no traceback on stderr, and no output directory or report left behind."""
import pytest
import torch

from conftest import TINY, run_cli
from masktrain.cli import compose
from masktrain.training import train


def _assert_one_clear_line(result, fragment, cwd):
    assert result.returncode != 0, result.stdout[-1000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert fragment in lines[0], lines[0]
    leftovers = [p for p in cwd.rglob("*") if p.name in {"report.json", "report.md", "study.json"} or p.suffix == ".ckpt"]
    assert not (cwd / "outputs").exists() and not leftovers, leftovers


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A real (tiny) resnet18 run checkpoint."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose("train", ["recipe=baseline", "logger=none", *TINY]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


TRAIN_CASES = {
    "unknown recipe": (["recipe=mask_augg"], "mask_augg"),
    "unknown model": (["model.name=resnet_nope"], "resnet_nope"),
    "bad override value": (["trainer.max_epochs=abc"], "trainer.max_epochs"),
    "probability out of range": (["recipe=mask_aug", "mask.p=1.5"], "mask.p=1.5"),
    "unknown masking method": (["recipe=mask_aug", "mask.method=sparkle"], "sparkle"),
    "unsupported layer for layer masking": (["recipe=layer_mask_aug", "model.name=vit_tiny_patch16_224"], "layer masking does not support"),
    "missing fine-tune checkpoint": (["recipe=mask_aug", "init_from=/nonexistent/last.ckpt"], "init_from"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_input(case, tmp_path):
    args, fragment = TRAIN_CASES[case]
    _assert_one_clear_line(run_cli("train.py", [*args, "logger=none"], tmp_path, timeout=180), fragment, tmp_path)


def test_evaluate_missing_checkpoint(tmp_path):
    result = run_cli("evaluate.py", ["checkpoint=/nonexistent/last.ckpt"], tmp_path, timeout=180)
    _assert_one_clear_line(result, "does not exist", tmp_path)


def test_evaluate_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    result = run_cli("evaluate.py", [f"checkpoint={bad}"], tmp_path, timeout=180)
    bad.unlink()
    _assert_one_clear_line(result, "bad.ckpt", tmp_path)


def test_evaluate_wrong_checkpoint_architecture(tmp_path, run_checkpoint):
    args = ["model.name=resnet34", f"model.checkpoint_path={run_checkpoint}", "n_images=16"]
    _assert_one_clear_line(run_cli("evaluate.py", args, tmp_path, timeout=180), "do not fit", tmp_path)


def test_evaluate_unknown_probe_and_method(tmp_path, run_checkpoint):
    result = run_cli("evaluate.py", [f"checkpoint={run_checkpoint}", "probes=[shape_onlyy]"], tmp_path, timeout=180)
    _assert_one_clear_line(result, "shape_onlyy", tmp_path)
    result = run_cli("evaluate.py", [f"checkpoint={run_checkpoint}", "methods=[pink]"], tmp_path, timeout=180)
    _assert_one_clear_line(result, "pink", tmp_path)


def test_evaluate_study_directory_with_no_runs(tmp_path):
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    result = run_cli("evaluate.py", [f"study={empty}"], tmp_path, timeout=180)
    _assert_one_clear_line(result, "holds no runs", tmp_path)
    assert list(empty.iterdir()) == []


def test_resume_with_no_earlier_run_is_one_line(tmp_path):
    # The default (W&B) logger, as users run it: nothing is built, no W&B run started, before the message.
    result = run_cli("train.py", ["recipe=mask_aug", "resume=true", *TINY], tmp_path, timeout=180)
    _assert_one_clear_line(result, "resume=true: no earlier mask_aug run to continue", tmp_path)
    assert "ckpt_path=" in result.stderr and not list(tmp_path.rglob("wandb"))
