"""W&B runs written outside Lightning (``evaluate.py``): one run per command, from rank 0 only.

Training logs through Lightning's ``WandbLogger`` (``masktrain.training``); evaluation and
studies have no Trainer, so they call ``wandb.init`` themselves. Every function here returns
without doing anything on a rank other than 0 of an initialised process group, so a command
under ``torchrun`` writes exactly one run, into ``<dir>/wandb/offline-run-*`` when offline
(the directory W&B itself writes, which ``wandb sync`` uploads).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _launcher_rank() -> int:
    """This process's global rank as Lightning reads it before any process group exists
    (``lightning.fabric.utilities.rank_zero._get_rank``: the first of these variables that is set)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def import_wandb_early(logger_target: str | None) -> bool:
    """Import the part of wandb that ``wandb.init`` imports, now, while few modules are loaded,
    when this process will start a W&B run (``logger_target`` ends in ``WandbLogger``, rank 0).
    Returns whether it did.

    ``wandb.init`` imports ``wandb.sdk.launch``, whose pydantic models read their field docstrings
    from source through ``inspect``, which scans every loaded module per class. After torch,
    Lightning and timm (4,703 modules) that import took 1.64-1.96 s of CPU time, against
    0.35-0.43 s right after ``import wandb`` (three runs each, ``time.process_time``, 2-core AMD
    EPYC, shared). The same modules end up loaded; only the order changes. A wandb that cannot
    import it fails the same way in ``wandb.init`` later, so a failure here is left to that.
    """
    if not str(logger_target or "").endswith("WandbLogger") or _launcher_rank() != 0:
        return False
    try:
        import wandb.sdk.launch  # noqa: F401
    except Exception:  # noqa: BLE001 - see the docstring: wandb.init reports its own problem
        return False
    return True


def is_rank_zero() -> bool:
    """True outside a process group and on its rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _init(directory: Path, project: str, mode: str, **kwargs: Any):
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    import wandb

    # WANDB_MODE from the environment wins, as for training (tests and `wandb offline` set it).
    return wandb.init(project=project, dir=str(directory), mode=os.environ.get("WANDB_MODE", mode),
                      reinit="finish_previous", **kwargs)


STUDY_COLUMNS = ["regime", "probe", "key", "mean", "std", "min", "max", "n_seeds", "chance",
                 "correct_mean", "correct_std", "ci_lo", "ci_hi"]
COMPARISON_COLUMNS = ["regime", "reference", "probe", "key", "difference", "ci_lo", "ci_hi", "p_value", "q_value", "verdict",
                      "n_seeds", "n_pairs"]


def study_rows(study: dict[str, Any]) -> list[list[Any]]:
    """One row per regime × probe × method (or mask kind) of ``study["table"]``, in STUDY_COLUMNS order."""
    rows = []
    for regime, probes in study["table"].items():
        for probe, by_key in probes.items():
            for key, cell in by_key.items():
                correct = cell.get("correct") or {}
                lo, hi = cell.get("ci95") or (None, None)
                rows.append([regime, probe, key, cell.get("mean"), cell.get("std"), cell.get("min"), cell.get("max"),
                             cell.get("n_seeds"), cell.get("chance"), correct.get("mean"), correct.get("std"), lo, hi])
    return rows


def comparison_rows(study: dict[str, Any]) -> list[list[Any]]:
    """One row per between-regime comparison of ``study["comparisons"]``, in COMPARISON_COLUMNS order."""
    rows = []
    for by_ref in (study.get("comparisons") or {}).values():
        for by_probe in by_ref.values():
            for by_key in by_probe.values():
                for c in by_key.values():
                    lo, hi = c.get("ci95") or (None, None)
                    rows.append([c["regime"], c["reference"], c["probe"], c["key"], c.get("difference"), lo, hi,
                                 c.get("p_value"), c.get("q_value"), c.get("verdict"), c.get("n_seeds"), c.get("n_pairs")])
    return rows


def log_study_wandb(study: dict[str, Any], study_dir: str | os.PathLike, project: str = "masktrain",
                    mode: str = "offline") -> str | None:
    """Log a study (``masktrain.study.run_study``'s result) as one W&B run in ``<study_dir>/wandb/``:
    its settings as config, the regime × probe × method table, ``study.png``, and the baseline check.
    The run joins the W&B group of the sweep's training runs (the sweep directory's name).
    Returns the run's files directory (None on ranks other than 0)."""
    if not is_rank_zero():
        return None
    import wandb

    root = Path(study_dir)
    config = {k: study.get(k) for k in ("study_dir", "regimes", "seeds", "methods", "probes", "n_images")}
    config["runs"] = study.get("runs")
    run = _init(root, project, mode, name=f"study-{root.name}", group=root.name, job_type="study", config=config)
    try:
        payload: dict[str, Any] = {"study/table": wandb.Table(columns=STUDY_COLUMNS, data=study_rows(study))}
        if comparison_rows(study):
            payload["study/comparisons"] = wandb.Table(columns=COMPARISON_COLUMNS, data=comparison_rows(study))
        if (root / "study.png").is_file():
            payload["study/figure"] = wandb.Image(str(root / "study.png"))
        run.log(payload)
        check = study.get("baseline_check") or {}
        run.summary.update({"baseline_check/status": check.get("status"), "baseline_check/message": check.get("message")})
        run.summary.update({f"{r[0]}/{r[1]}/{r[2]}": r[3] for r in study_rows(study)})
        return str(run.dir)
    finally:
        run.finish()
