"""Build everything a training run needs from its config, and run it.

``train(cfg, run_dir)`` is what ``python train.py`` calls once Hydra has composed the
config; tests call it directly with a config composed through Hydra's API.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from masktrain.callbacks import AtomicCheckpointIO, MaskedSampleGrid
from masktrain.checkpoint import read_checkpoint
from masktrain.errors import UserError, check
from masktrain.lit_module import MaskTrainModule
import masktrain.conditions  # noqa: F401  (registers mask.kind=condition)
from masktrain.masks import MASK_KINDS, RandomKeepMask
from masktrain.io_utils import atomic_write
from masktrain.methods import get_method
from masktrain.wandb_resume import WandbRunId, open_resumed_run, recorded_run_id

log = logging.getLogger(__name__)
_MASK_KEYS = ("method", "kind", "p")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")  # hydra.run.dir's default leaf


def build_masks(mask_cfg: DictConfig) -> tuple[RandomKeepMask | None, RandomKeepMask]:
    """(training mask sampler or None, validation sampler applied to every image)."""
    params = {k: v for k, v in OmegaConf.to_container(mask_cfg, resolve=True).items() if k not in _MASK_KEYS}
    kind, p = mask_cfg.get("kind"), float(mask_cfg.get("p", 0.0))
    if not kind:
        return None, RandomKeepMask("rectangles", 1.0)
    sampler = MASK_KINDS.get(kind).sampler
    if sampler is None:  # a keep mask drawn per batch
        augment = RandomKeepMask(kind, p, **params)
        return (augment if p > 0 else None), RandomKeepMask(kind, 1.0, **params)
    augment = sampler(p=p, **params)
    return (augment if p > 0 else None), sampler(p=1.0, **params)


def validate_config(cfg: DictConfig) -> None:
    """Cheap checks of a composed training config (before any directory is made)."""
    import timm

    check(cfg.get("mask") is not None, "the config has no mask group; pass mask=<none|rectangles|...>")
    get_method(str(cfg.mask.method))
    build_masks(cfg.mask)
    name = cfg.model.name
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise UserError(f"model.name={name!r} is not a timm model" + (f" (similar: {', '.join(close)})" if close else ""))
    for key in ("trainer.max_epochs", "data.batch_size", "data.num_classes", "seed"):
        value = OmegaConf.select(cfg, key)
        if key == "data.num_classes" and value is None:
            continue  # taken from the data once the datamodule is built (resolve_num_classes)
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              f"{key}={value!r} must be a non-negative integer")
    check(int(cfg.trainer.max_epochs) >= 1, f"trainer.max_epochs={cfg.trainer.max_epochs} must be >= 1")
    for key in ("optim.lr", "optim.weight_decay", "optim.warmup_fraction"):
        value = OmegaConf.select(cfg, key)
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
              f"{key}={value!r} must be a non-negative number")
    if str(cfg.mask.method) == "layer":
        # Converting is cheap next to training and finds unsupported layers before any output exists.
        from masktrain.layer_masking import layer_mask

        layer_mask(timm.create_model(name, num_classes=int(cfg.data.num_classes or 2)))  # the head size does not matter here
    for key in ("init_from", "ckpt_path"):
        if cfg.get(key):
            check(Path(cfg[key]).is_file(), f"{key}={cfg[key]!r} does not exist; give a checkpoint file")


def resolve_num_classes(cfg: DictConfig, datamodule: Any) -> int:
    """Set ``cfg.data.num_classes`` from the datamodule when it is null, so the model head
    (``model.num_classes: ${data.num_classes}``) and the saved config get the data's count."""
    k = int(datamodule.num_classes)
    if OmegaConf.select(cfg, "data.num_classes") is None:
        with open_dict(cfg):
            cfg.data.num_classes = k
    return k


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint a run continues (``ckpt_path``, or ``resume=true``: its own
    ``last.ckpt``, else that of the newest earlier timestamped run of the recipe), or None.

    Resolved before anything is built, so ``resume=true`` with nothing to continue stops at
    once with one line. Every DDP rank resolves the same file (they share the run directory).
    """
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if not cfg.get("resume"):
        return None
    own = run_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    if not _TIMESTAMP.fullmatch(run_dir.name):
        # A sweep job or an explicit run dir without a checkpoint yet: nothing to continue.
        log.warning("resume=true: no checkpoint in %s yet, starting this run fresh", run_dir)
        return None
    # A fresh timestamped single-run directory: continue the newest earlier run of this recipe.
    earlier = sorted(run_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    earlier = [p for p in earlier if run_dir not in p.parents and _TIMESTAMP.fullmatch(p.parents[1].name)]
    if not earlier:
        raise UserError(f"resume=true: no earlier {cfg.name} run to continue (no {str(run_dir.parent)}/*/checkpoints/"
                        f"last.ckpt); run without resume=true, or continue a checkpoint with ckpt_path=<file>")
    log.info("resuming from %s", earlier[-1])
    return str(earlier[-1])


def resolve_init(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint a run starts from: ``init_from``, else (``finetune.from_recipe`` with
    ``finetune.from_sweep``) the same seed's *finished* run of that recipe in that sweep.

    ``train.py`` sets ``finetune.from_sweep`` to the sweep directory inside a Hydra sweep; a
    single run looks nothing up unless asked (``finetune.from_sweep=<dir>``), so an unrelated
    ``baseline/seed<N>`` near its run directory is never picked up. A missing or unfinished
    source run is an error, never a silent start from scratch (see :mod:`masktrain.sweeps`).
    """
    from masktrain.sweeps import finished_run_checkpoint

    if cfg.get("init_from"):
        return str(cfg.init_from)
    source = OmegaConf.select(cfg, "finetune.from_recipe")
    if not source:
        return None
    sweep = OmegaConf.select(cfg, "finetune.from_sweep")
    if not sweep:
        log.info("%s: not in a sweep, training from scratch (finetune.from_sweep=<sweep dir> fine-tunes from "
                 "that sweep's %s run of seed %s)", cfg.name, source, cfg.seed)
        return None
    return str(finished_run_checkpoint(Path(str(sweep)), str(source), int(cfg.seed)))


@rank_zero_only
def _warn(message: str, *args: Any) -> None:
    log.warning(message, *args)


def _logger(cfg: DictConfig, run_dir: Path, resume_from: str | None = None, recorded_id: str | None = None):
    """The run's experiment logger, or False. Nothing here touches ``logger.experiment``: on a
    rank other than 0 Lightning hands back a dummy, and W&B starts its run lazily on rank 0.

    A resumed run (``resume_from``) logs to the W&B run its checkpoint records (``recorded_id``,
    :mod:`masktrain.wandb_resume`), so one training run stays one W&B run across restarts.
    """
    if not cfg.get("logger") or not cfg.logger.get("_target_"):
        return False
    target = str(cfg.logger._target_)
    if target.endswith("WandbLogger"):
        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.get("offline", True):
            os.environ["WANDB_MODE"] = "offline"
        run_id = cfg.logger.get("id")  # an explicit logger.id wins
        if resume_from and not run_id:
            run_id = recorded_id
            if run_id is None:
                _warn("resuming from %s, which records no W&B run id (it was written with another logger or by an "
                      "older masktrain): the resumed part is logged to a new W&B run", resume_from)
        # save_dir=<run dir>: W&B itself writes <run dir>/wandb/offline-run-*, which `wandb sync` uploads.
        return hydra.utils.instantiate(cfg.logger, save_dir=str(run_dir), name=f"{cfg.name}-seed{cfg.seed}",
                                       group=cfg.get("study"), job_type="train", id=run_id)
    return hydra.utils.instantiate(cfg.logger, save_dir=str(run_dir))


@rank_zero_only
def _finish_wandb(loggers: list, failed: bool) -> None:
    """Close this run's W&B run (rank 0), so the next run of a sequential sweep gets its own
    instead of Lightning reusing the one in progress."""
    if not any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, float]:
    """Train one run into ``run_dir``; returns the final val/ and test/ metrics and the step count."""
    run_dir = Path(run_dir)
    validate_config(cfg)
    resume_from = resume_checkpoint(cfg, run_dir)
    recorded_id = recorded_run_id(resume_from, "ckpt_path" if cfg.get("ckpt_path") else "resume=true") if resume_from else None
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    init_from = resolve_init(cfg, run_dir)
    if init_from:
        read_checkpoint(init_from)  # a clear error when it is not one of ours
        with open_dict(cfg):
            cfg.init_from = init_from
            if OmegaConf.select(cfg, "finetune.from_recipe"):
                cfg.trainer.max_epochs = int(cfg.finetune.max_epochs)
                cfg.optim.lr = float(cfg.finetune.lr)
    datamodule = hydra.utils.instantiate(cfg.data)
    for split in ("train", "val"):  # bad data fails here, in one line, before the trainer starts
        ds = datamodule.dataset(split)
        if cfg.mask.get("kind") and MASK_KINDS.get(cfg.mask.kind).needs_object_masks and not getattr(ds, "has_object_masks", True):
            what = f"mask.kind={cfg.mask.kind}" + (f" (mask.condition={cfg.mask.condition})" if cfg.mask.get("condition") else "")
            raise UserError(f"{what} needs object masks, but the {datamodule.name} {split} set has none "
                            f"({getattr(ds, 'missing_masks_reason', 'no masks found')}); use a dataset with object masks")
    resolve_num_classes(cfg, datamodule)
    model = hydra.utils.instantiate(cfg.model, checkpoint_path=init_from or cfg.model.get("checkpoint_path"))
    augment, val_mask = build_masks(cfg.mask)
    module = MaskTrainModule(
        model=model,
        augment=augment,
        val_mask=val_mask,
        method=str(cfg.mask.method),
        mean=tuple(datamodule.mean),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_fraction=cfg.optim.warmup_fraction,
        seed=int(cfg.seed),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    callbacks = [
        # Two callbacks, because in Lightning 2.6.6 (seen there; older releases not checked)
        # `save_last=True` rewrites last.ckpt only in a step where the monitored top-k file was
        # written: last.ckpt lagged behind whenever validation accuracy did not improve, and a
        # resume (or a study, a fine-tune) took an older epoch. Unmonitored, the second callback
        # writes last.ckpt every epoch.
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc_clean", mode="max",
                        save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False),
        MaskedSampleGrid(run_dir / "samples", cfg.samples.every_n_epochs),
        WandbRunId(recorded_id),
    ]
    trainer = hydra.utils.instantiate(
        cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=_logger(cfg, run_dir, resume_from, recorded_id),
        plugins=[AtomicCheckpointIO()],
    )
    open_resumed_run(trainer.loggers, recorded_id if resume_from else None)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:  # the resolved config as the run's hyperparameters (rank 0 only, by Lightning)
        logger.log_hyperparams(config)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    failed = True
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics["global_step"] = int(trainer.global_step)
        # The final model on the test split: the number the README and studies quote.
        for results in trainer.test(module, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in results.items() if k.startswith("test/")})
        failed = False
    finally:
        _finish_wandb(trainer.loggers, failed)
    if trainer.is_global_zero:
        atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
