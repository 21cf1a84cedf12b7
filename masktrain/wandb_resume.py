"""One W&B run per training run, across interruptions: the run id travels in the checkpoint.

Lightning's ``WandbLogger`` continues a W&B run when it is given that run's id (it always
passes ``resume="allow"`` to ``wandb.init``). :class:`WandbRunId` saves the id as callback
state in every checkpoint; a resume (``resume=true`` or ``ckpt_path=...``) reads it back with
:func:`recorded_run_id` from the checkpoint it continues, before the logger exists. Under DDP
every rank reads the same file, so all ranks agree, although only rank 0 talks to W&B.

Offline (the default), wandb 0.31 writes the resumed part as a second
``<run dir>/wandb/offline-run-<time>-<same id>`` directory whose ``run`` record carries the
resume intent (``resume=True``; its own ``_step`` starts again at 0, Lightning's x-axis
``trainer/global_step`` goes on). ``wandb sync`` groups the directories of one id and uploads
them in start-time order into that one run (``wandb sync --help`` of 0.31; no upload was tried
here, there is no network).
"""
from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from masktrain.errors import UserError

STATE_KEY = "WandbRunId"  # the checkpoint's callbacks[STATE_KEY] = {"run_id": ...}


class WandbRunId(L.Callback):
    """Keep the id of the run's W&B run in its checkpoints.

    ``run_id``: the id recorded in the checkpoint the run resumes from (or None). With a W&B
    logger, rank 0 replaces it at the start of fit by the id of the run it actually logs to
    (the same one when resumed); without one (``logger=csv``), a recorded id is carried on,
    so a later resume with W&B still finds it. Only rank 0's state is saved (Lightning writes
    checkpoints on rank 0), and rank 0 is the rank that knows the id.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not trainer.is_global_zero:  # other ranks hold a dummy experiment, never the real id
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self.run_id = str(logger.experiment.id)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = self.run_id or state_dict.get("run_id")


def recorded_run_id(checkpoint: str | os.PathLike, key: str = "ckpt_path") -> str | None:
    """The W&B run id a checkpoint records, or None (written with another logger, or before
    masktrain recorded it). ``key`` names the setting the checkpoint came from, for the error.

    The checkpoint is memory-mapped, so its tensors are not read: this costs next to nothing
    before Lightning loads the same file for the resume itself.
    """
    try:
        try:
            ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"{key}: checkpoint {str(checkpoint)!r} is corrupt or not a PyTorch checkpoint "
                        f"({type(exc).__name__}); give a run's checkpoints/last.ckpt") from exc
    state = (ckpt.get("callbacks") or {}).get(STATE_KEY) if isinstance(ckpt, dict) else None
    run_id = (state or {}).get("run_id")
    return str(run_id) if run_id else None


def open_resumed_run(loggers: list, run_id: str | None, timeout_s: float = 120.0, poll_s: float = 1.0) -> None:
    """Start the W&B run of a resumed training run now (rank 0; other ranks return at once), waiting
    while its id is still held: a run killed a moment ago (SIGKILL, pre-emption, a crashed node
    restarted in place) leaves its wandb-core service holding the id until the service notices its
    parent died, and ``wandb.init`` then fails with "run ID ... is in use". Waiting up to
    ``timeout_s`` is what a user would do by hand; after that, one UserError naming the way out."""
    import time

    if run_id is None or L.pytorch.utilities.rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                logger.experiment  # noqa: B018 - the property starts the run (wandb.init)
                break
            except Exception as exc:  # noqa: BLE001 - wandb raises its own error types; only "in use" is waited out
                if "is in use" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise UserError(f"resume: W&B run {run_id} is still in use by another process after {timeout_s:.0f} s "
                                    "(an earlier part of this run still running?); stop it, or resume into a new W&B run "
                                    "with logger.id=<new id>") from None
                time.sleep(poll_s)
