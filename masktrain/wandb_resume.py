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
