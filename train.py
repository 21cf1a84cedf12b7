"""Fine-tune a timm CNN with random-mask augmentation.

    python train.py recipe=mask_aug
    python train.py recipe=layer_mask_aug trainer.max_epochs=4
    python train.py -m recipe=baseline,mask_aug seed=0,1,2
    python train.py recipe=mask_aug trainer=ddp trainer.accelerator=cpu trainer.devices=2

Recipes live in recipes/recipe/; any value can be overridden on the command line.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports: no cyclic collections while they run (masktrain.gc_tuning)
    from masktrain.gc_tuning import collect_once_at_exit, defer_collections

    defer_collections()
    collect_once_at_exit()

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from masktrain.cli import preflight, removed_on_user_error
from masktrain.errors import exit_on_user_error


def _has_checkpoints(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("*.ckpt"))


@hydra.main(config_path="recipes", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from masktrain.gc_tuning import freeze_startup_objects
    from masktrain.malloc_tuning import keep_freed_memory
    from masktrain.training import train

    freeze_startup_objects()  # the imports are done: the collector stops walking their objects
    keep_freed_memory()  # before the first training step allocates its activations

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir).absolute()
        with open_dict(cfg):
            if cfg.get("study") is None:  # runs of one sweep share a W&B group
                cfg.study = sweep_dir.name
            if not cfg.finetune.get("from_sweep"):  # fine-tunes start from this sweep's runs (masktrain.sweeps)
                cfg.finetune.from_sweep = str(sweep_dir)
    with removed_on_user_error(run_dir, keep_if=_has_checkpoints):
        metrics = train(cfg, run_dir)
    table = Table(title=f"{cfg.name}, seed {cfg.seed}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"run directory: {run_dir}")


def _validate(cfg: DictConfig) -> None:
    """Preflight check of one job; first imports wandb's run machinery when the job logs to W&B,
    before ``masktrain.training`` loads torch and Lightning (cheaper then: masktrain.tracking)."""
    from masktrain.tracking import import_wandb_early

    import_wandb_early(OmegaConf.select(cfg, "logger._target_"))
    from masktrain.training import validate_config

    validate_config(cfg)


if __name__ == "__main__":
    from masktrain.sweeps import check_parallel_sweep

    preflight("train", sys.argv[1:], _validate, check_jobs=lambda jobs: check_parallel_sweep(sys.argv[1:], jobs))
    main()
