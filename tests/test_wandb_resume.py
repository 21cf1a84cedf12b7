"""A resumed training run logs to the W&B run it continues (default logger, offline).

wandb 0.31 writes each part of a resumed offline run as its own
``<run dir>/wandb/offline-run-<time>-<id>`` directory with the *same* id, and ``wandb sync``
uploads the parts of one id into one run. So these tests read every part's transaction log
and check the id, the config and that the trainer's global step (the x-axis Lightning gives
W&B) continues where the checkpoint left off.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from omegaconf import OmegaConf

from conftest import TINY
from masktrain.cli import compose
from masktrain.training import train
from masktrain.wandb_resume import recorded_run_id
from wandb_files import read_finished_offline_run

STEPS_PER_EPOCH = 64 // 16  # TINY: 64 training images, batch 16


def _args(epochs: int, *extra: str) -> list[str]:
    return ["recipe=mask_aug", *[a for a in TINY if not a.startswith("trainer.max_epochs=")],
            f"trainer.max_epochs={epochs}", *extra]


def _parts(run_dir: Path) -> list[dict]:
    """The W&B offline parts under ``run_dir/wandb``, oldest first (the directory names start with the time)."""
    return [read_finished_offline_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def _steps(part: dict) -> list[int]:
    return [h["trainer/global_step"] for h in part["history"] if "trainer/global_step" in h]


def _check_w_and_b_counters(part: dict) -> None:
    # wandb's own _step counts up by one per log call: nothing passed an explicit (backwards) step.
    own = [h["_step"] for h in part["history"]]
    assert own == list(range(len(own))), own


def test_resume_and_ckpt_path_continue_the_wandb_run_of_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(compose("train", _args(2)), run_dir)
    (first,) = _parts(run_dir)
    run_id = first["run"]["id"]
    assert recorded_run_id(run_dir / "checkpoints" / "last.ckpt") == run_id
    assert max(_steps(first)) == 2 * STEPS_PER_EPOCH

    # resume=true in the run's own directory, one more epoch: the same W&B run, a second part.
    metrics = train(compose("train", _args(3, "resume=true")), run_dir)
    assert metrics["global_step"] == 3 * STEPS_PER_EPOCH
    parts = _parts(run_dir)
    assert len(parts) == 2 and {p["run"]["id"] for p in parts} == {run_id}
    second = parts[1]
    assert second["run"]["name"] == first["run"]["name"] == "mask_aug-seed0"
    assert min(_steps(second)) > max(_steps(first)) and max(_steps(second)) == 3 * STEPS_PER_EPOCH
    for part in parts:
        _check_w_and_b_counters(part)
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    assert second["config"] == json.loads(json.dumps(saved)) and second["config"]["resume"] is True
    assert second["summary"]["test/acc_clean"] == metrics["test/acc_clean"]
    assert recorded_run_id(run_dir / "checkpoints" / "last.ckpt") == run_id

    # ckpt_path=<file> into another directory continues the same W&B run there.
    other = tmp_path / "other"
    train(compose("train", _args(4, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")), other)
    (third,) = _parts(other)
    assert third["run"]["id"] == run_id
    assert min(_steps(third)) > 3 * STEPS_PER_EPOCH and max(_steps(third)) == 4 * STEPS_PER_EPOCH


def test_a_checkpoint_without_a_recorded_id_starts_a_new_wandb_run_with_one_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(compose("train", _args(1, "logger=csv")), run_dir)
    assert recorded_run_id(run_dir / "checkpoints" / "last.ckpt") is None

    with caplog.at_level(logging.WARNING, logger="masktrain.training"):
        train(compose("train", _args(2, "resume=true")), run_dir)
    warnings = [r.getMessage() for r in caplog.records if "W&B run id" in r.getMessage()]
    assert len(warnings) == 1 and "new W&B run" in warnings[0], warnings
    (part,) = _parts(run_dir)
    assert min(_steps(part)) > STEPS_PER_EPOCH  # the new run still starts at the checkpoint's step
    new_id = part["run"]["id"]
    assert recorded_run_id(run_dir / "checkpoints" / "last.ckpt") == new_id

    # A resume with another logger carries the recorded id on, for a later resume with W&B.
    train(compose("train", _args(3, "resume=true", "logger=csv")), run_dir)
    assert recorded_run_id(run_dir / "checkpoints" / "last.ckpt") == new_id
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="masktrain.training"):
        train(compose("train", _args(4, "resume=true")), run_dir)
    assert not [r for r in caplog.records if "W&B run id" in r.getMessage()]
    parts = _parts(run_dir)
    assert len(parts) == 2 and {p["run"]["id"] for p in parts} == {new_id}


class _HeldRun:
    """A stand-in WandbLogger whose run id is held by another process for the first ``held`` calls."""

    def __init__(self, held: int) -> None:
        self.held, self.calls = held, 0

    @property
    def experiment(self):
        self.calls += 1
        if self.calls <= self.held:
            raise RuntimeError("run ID abc123 is in use")
        return object()


_HeldRun.__name__ = "WandbLogger"


def test_a_resumed_run_waits_while_its_id_is_still_in_use_then_says_what_to_do():
    from masktrain.errors import UserError
    from masktrain.wandb_resume import open_resumed_run

    logger = _HeldRun(held=2)
    open_resumed_run([logger], "abc123", timeout_s=10, poll_s=0.01)
    assert logger.calls == 3  # waited out two refusals, then started the run
    open_resumed_run([_HeldRun(held=5)], None)  # not a resume: nothing to wait for, nothing started
    with pytest.raises(UserError, match="abc123 is still in use.*logger.id"):
        open_resumed_run([_HeldRun(held=10**6)], "abc123", timeout_s=0.05, poll_s=0.01)
    with pytest.raises(RuntimeError, match="other"):  # any other W&B error is not waited out
        class Broken(_HeldRun):
            @property
            def experiment(self):
                raise RuntimeError("other failure")
        Broken.__name__ = "WandbLogger"
        open_resumed_run([Broken(0)], "abc123", timeout_s=10, poll_s=0.01)
