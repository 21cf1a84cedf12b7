"""Sweeps whose jobs depend on each other: fine-tunes that start from a baseline of the same seed.

A sweep directory holds ``<sweep>/<recipe>/seed<N>/`` runs (``hydra.sweep.subdir``). An
augmented recipe with ``finetune.from_recipe=baseline`` starts from the *finished* baseline run
of its seed in that directory: ``metrics.json`` is written last, after training and testing, so
its presence says the run is complete (``checkpoints/last.ckpt`` alone also exists mid-run).

Hydra's basic launcher runs a sweep's jobs one after another, in the order given, so
``-m recipe=baseline,mask_aug`` works in one command. Every other launcher (joblib, submitit,
ray, ...) may start them together, so a fine-tune could run before its baseline exists; such a
sweep is refused before any job starts (:func:`check_parallel_sweep`), and a fine-tune never
falls back to training from scratch (:func:`finished_run_checkpoint`). Run it in two stages
into one directory instead: the baselines, then the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from masktrain.errors import UserError

SEQUENTIAL_LAUNCHERS = {"basic"}
# Launchers that start every rank of a DDP job themselves (srun: one task per GPU). Elsewhere
# Lightning starts ranks 1.. by re-running the command line, which inside `-m` re-runs the sweep.
RANK_STARTING_LAUNCHERS = {"submitit_slurm"}


def finished_run_checkpoint(sweep_dir: Path, recipe: str, seed: int) -> Path:
    """``<sweep_dir>/<recipe>/seed<seed>/checkpoints/last.ckpt`` of a finished run, else a UserError."""
    run = Path(sweep_dir) / recipe / f"seed{seed}"
    ckpt = run / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and (run / "metrics.json").is_file():
        return ckpt
    state = "has not finished (no metrics.json yet)" if ckpt.is_file() else "does not exist"
    raise UserError(
        f"finetune.from_recipe={recipe}: the {recipe} run of seed {seed} in {str(run)!r} {state}; "
        f"train it first (python train.py -m recipe={recipe} seed={seed} hydra.sweep.dir={sweep_dir}), "
        f"or pass finetune.from_recipe=null to train from scratch"
    )


def _launcher(argv: Iterable[str]) -> str:
    """The ``hydra/launcher=<name>`` chosen on the command line (``basic`` when none is)."""
    name = "basic"
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "hydra/launcher":
            name = value
    return name


def _ranks(job: DictConfig) -> int:
    """Processes a job's trainer starts (``-1``/``auto`` devices count as several)."""
    if "ddp" not in str(OmegaConf.select(job, "trainer.strategy", default="")):
        return 1
    devices = OmegaConf.select(job, "trainer.devices", default=1)
    count = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else devices
    count = 2 if count in (-1, "-1", "auto") else int(count)
    return count * int(OmegaConf.select(job, "trainer.num_nodes", default=1) or 1)


def check_parallel_sweep(argv: list[str], jobs: list[DictConfig]) -> None:
    """Refuse a multirun (``jobs``: the composed config of every job) that cannot run as asked:
    fine-tunes needing a baseline trained *in the same sweep* under a launcher that may run jobs
    concurrently, and multi-process DDP jobs under a launcher that does not start the ranks."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return
    launcher = _launcher(argv)
    if launcher not in RANK_STARTING_LAUNCHERS and any(_ranks(job) > 1 for job in jobs):
        raise UserError(
            f"trainer=ddp with several devices inside a `-m` sweep under hydra/launcher={launcher}: Lightning starts the "
            f"other ranks by re-running the command line, which would re-run the whole sweep; run each DDP run on its "
            f"own, or sweep with hydra/launcher=submitit_slurm (one task per GPU; README, 'Sweeps in parallel and on a cluster')"
        )
    if launcher in SEQUENTIAL_LAUNCHERS:
        return
    names = {str(job.name) for job in jobs}
    for job in jobs:
        source = OmegaConf.select(job, "finetune.from_recipe")
        if source and str(source) in names and not OmegaConf.select(job, "init_from"):
            raise UserError(
                f"hydra/launcher={launcher} may run the jobs of a sweep at the same time, but recipe={job.name} "
                f"fine-tunes from the {source} run of the same seed in this sweep, which might not have finished; "
                f"run two sweeps into one directory, first recipe={source}, then the others, both with "
                f"hydra.sweep.dir=<dir> (README, 'Sweeps in parallel and on a cluster')"
            )
