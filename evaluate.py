"""Run shape-leakage probes on a trained model and write a report.

    python evaluate.py checkpoint=outputs/baseline/<date>/checkpoints/last.ckpt
    python evaluate.py checkpoint=<ckpt> probes=[shape_only] methods=[black,grey,layer]
    python evaluate.py model.name=resnet50 model.checkpoint_path=weights.pth data=shapes
    python evaluate.py checkpoint=<ckpt> logger=wandb          # + W&B tables/images, offline
    python evaluate.py study=<sweep root> probes=[shape_only]  # every <recipe>/seed<N>/ run -> study.json/md/png

Writes report.json, report.md and PNG plots into the output directory (hydra.run.dir),
atomically. What each number means: docs/probes.md.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before the imports: no cyclic collections while they run (masktrain.gc_tuning)
    from masktrain.gc_tuning import collect_once_at_exit, defer_collections

    defer_collections()
    collect_once_at_exit()

# Before torch loads OpenMP: threads that wait for work sleep instead of spinning. On a small
# machine shared with other jobs, spinning threads steal the cores their siblings need — the
# probes' small kernels (mask_only's CNN) ran ~10x slower on 2 busy cores, resnet18 ~2x.
# Set OMP_WAIT_POLICY yourself to override (see docs/probes.md, "Speed").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from masktrain.cli import preflight, remove_run_dir, removed_on_user_error, store_probe_defaults
from masktrain.errors import UserError, check, exit_on_user_error
from masktrain.tracking import is_rank_zero, log_study_wandb


def _probe_names(cfg: DictConfig) -> list[str]:
    """``probes=...``, or every registered probe run by default when it is null."""
    from masktrain.evaluation import default_probes

    return default_probes() if cfg.probes is None else [str(p) for p in cfg.probes]


def validate_config(cfg: DictConfig) -> None:
    """Cheap checks before any output directory exists: names, paths, ranges."""
    from masktrain.evaluation import check_options
    from masktrain.methods import get_method
    from masktrain.probes import get_probe

    check(len(_probe_names(cfg)) > 0, "probes=[] is empty")
    for name in _probe_names(cfg):
        get_probe(str(name))
    check_options(OmegaConf.to_container(cfg.probe_options, resolve=True) or {})
    for name in cfg.methods:
        get_method(str(name))
    if cfg.study:
        check(not cfg.checkpoint, "checkpoint=... and study=... are exclusive; pass one of them")
        check(Path(str(cfg.study)).is_dir(),
              f"study={str(cfg.study)!r} is not a directory; pass study=<sweep root holding <recipe>/seed<N>/ runs>")
        for name in cfg.study_methods:
            get_method(str(name))
    elif cfg.checkpoint:
        check(Path(str(cfg.checkpoint)).is_file(),
              f"checkpoint={str(cfg.checkpoint)!r} does not exist; pass checkpoint=<run dir>/checkpoints/last.ckpt")
    else:
        has_weights = bool(cfg.model.get("checkpoint_path")) or bool(cfg.model.get("pretrained"))
        check(has_weights or cfg.allow_random_weights,
              "nothing to evaluate: pass checkpoint=<run>/checkpoints/last.ckpt, or model.name=<timm name> "
              "model.checkpoint_path=<weights file>")
    check(cfg.n_images is None or int(cfg.n_images) >= 1, f"n_images={cfg.n_images} must be a positive integer or null")
    check(int(cfg.batch_size) >= 1, f"batch_size={cfg.batch_size} must be a positive integer")
    check(str(cfg.split) in ("train", "val", "test"), f"split={cfg.split!r} is unknown; choose train, val or test")


def _methods_given() -> bool:
    """Whether ``methods=...`` was passed on the command line (study mode then uses it over ``study_methods``)."""
    return any(arg.split("=", 1)[0].lstrip("+~") == "methods" for arg in HydraConfig.get().overrides.task)


def _data_overrides() -> tuple[bool, list[str]]:
    """(``data=<name>`` was chosen on the command line, the ``data.<key>=<value>`` overrides)."""
    group, dotted = False, []
    for arg in HydraConfig.get().overrides.task:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key == "data":
            group = True
        elif key.startswith("data."):
            dotted.append(arg.lstrip("+~"))
    return group, dotted


def build_model_and_data(cfg: DictConfig) -> tuple[Any, Any, dict]:
    """(classifier, datamodule, description) from a run checkpoint or a timm model config."""
    from hydra.utils import instantiate

    from masktrain.checkpoint import load_classifier

    group, dotted = _data_overrides()
    if cfg.checkpoint:
        try:
            model, run_cfg = load_classifier(str(cfg.checkpoint))
        except RuntimeError as exc:  # load_state_dict raises on shape mismatches even with strict=False
            raise UserError(f"checkpoint {str(cfg.checkpoint)!r} does not fit its model config: "
                            f"{str(exc).splitlines()[-1].strip()[:200]}") from exc
        source = {"checkpoint": str(cfg.checkpoint), "run_config": run_cfg}
        if group:
            data_cfg = cfg.data
        else:
            saved = run_cfg.get("data")
            check(isinstance(saved, dict) and "_target_" in saved,
                  f"checkpoint {str(cfg.checkpoint)!r} saves no data config; pass data=<dataset>")
            data_cfg = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist([d[len("data."):] for d in dotted]))
    else:
        data_cfg = cfg.data
    try:
        datamodule = instantiate(data_cfg)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot build the dataset from the data config: {str(exc).splitlines()[0][:300]}") from exc
    if not cfg.checkpoint:
        from masktrain.training import resolve_num_classes

        resolve_num_classes(cfg, datamodule)  # data.num_classes=null: the head gets the data's count
        model = instantiate(cfg.model)
        source = {"timm": OmegaConf.to_container(cfg.model, resolve=True)}
    # Resolve in place: cfg.data may interpolate root keys (${seed}) that a detached copy cannot see.
    source["data"] = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else data_cfg
    model = read_as_in9(model, datamodule, source["data"], _probe_names(cfg))
    return model, datamodule, source


def read_as_in9(model: Any, datamodule: Any, data_cfg: dict, probes: list[str]) -> Any:
    """On ``data=in9``: the model as IN-9 reads it (``data.in9.map_imagenet=true``: ImageNet logits mapped
    as the Backgrounds Challenge's in9_eval.py does); a one-line error when the outputs and the flag disagree."""
    if getattr(datamodule, "name", None) != "in9":
        return model
    from masktrain.data.in9 import IN9Mapped, check_model_outputs, count_outputs
    from masktrain.probes import get_probe

    mapped = bool((data_cfg.get("in9") or {}).get("map_imagenet", False))
    size = int((data_cfg.get("dataset") or {}).get("image_size", 224))
    check_model_outputs(count_outputs(model, size), mapped)
    if not mapped:
        return model
    other = [p for p in probes if not getattr(get_probe(p), "reads_no_class_column", False)]
    check(not other, f"data.in9.map_imagenet=true gives a tenth 'no IN-9 class' output, which probes {other} cannot read; "
                     f"use probes=[backgrounds]")
    return IN9Mapped(model)


def _init_distributed() -> None:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _only_hydra_files(path: Path) -> bool:
    """True when a run directory holds nothing but Hydra's own bookkeeping (.hydra/, *.log)."""
    return all(p.name == ".hydra" or p.suffix == ".log" for p in path.iterdir())


def run_study_mode(cfg: DictConfig, out_dir: Path) -> None:
    """``study=<dir>``: evaluate every run of a sweep; the outputs go into the study directory itself,
    so Hydra's (empty) run directory is removed afterwards, on success and on failure alike."""
    from masktrain.study import run_study

    methods = list(cfg.methods) if _methods_given() else list(cfg.study_methods)
    _, dotted = _data_overrides()
    data_dotlist = [d[len("data."):] for d in dotted]

    def data_overrides(saved: dict) -> dict:
        # data.* overrides apply to each run's saved data config, as in checkpoint mode.
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(data_dotlist)))

    try:
        _init_distributed()
        study = run_study(str(cfg.study), probes=_probe_names(cfg), methods=methods, n_images=cfg.n_images,
                          device=cfg.device, options=OmegaConf.to_container(cfg.probe_options, resolve=True),
                          data_overrides=data_overrides if data_dotlist else None, log=print)
    finally:
        remove_run_dir(out_dir, keep_if=lambda p: not _only_hydra_files(p))
    if not is_rank_zero():
        return
    if _wandb_logger(cfg):
        log_study_wandb(study, str(cfg.study), **_wandb_settings(cfg))
    print(f"study: {Path(str(cfg.study)) / 'study.md'}")


def _wandb_logger(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "logger._target_", default="") or "").endswith("WandbLogger")


def _wandb_settings(cfg: DictConfig) -> dict[str, str]:
    offline = bool(OmegaConf.select(cfg, "logger.offline", default=True))
    return {"project": str(OmegaConf.select(cfg, "logger.project", default="masktrain")),
            "mode": "offline" if offline else "online"}


@hydra.main(config_path="recipes", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    import torch

    from masktrain.evaluation import evaluate
    from masktrain.gc_tuning import freeze_startup_objects
    from masktrain.reports import log_wandb, write_report

    freeze_startup_objects()  # the imports are done: the collector stops walking their objects
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.study:
        run_study_mode(cfg, out_dir)
        return
    with removed_on_user_error(out_dir, keep_if=lambda p: (p / "report.json").exists()):
        _init_distributed()
        model, datamodule, source = build_model_and_data(cfg)
        options = OmegaConf.to_container(cfg.probe_options, resolve=True)
        report = evaluate(model, datamodule, _probe_names(cfg), list(cfg.methods), split=str(cfg.split),
                          n_images=cfg.n_images, batch_size=int(cfg.batch_size), seed=int(cfg.seed), device=cfg.device,
                          options=options, n_boot=int(cfg.n_boot), log=print)
        report["model"]["source"] = {k: v for k, v in source.items() if k != "run_config"}
        if "run_config" in source:
            report["model"]["run"] = {k: source["run_config"].get(k) for k in ("name", "seed", "mask", "model", "study")}
        report["config"]["command"] = OmegaConf.to_container(cfg, resolve=True)
        if not is_rank_zero():  # every rank evaluated its shard; rank 0 holds the gathered report
            return
        files = write_report(report, out_dir)
    if _wandb_logger(cfg):  # rank 0 only (above): one W&B run per command
        log_wandb(report, files, out_dir, **_wandb_settings(cfg))
    print(f"report: {files['report.md']}")
    for flag in report["flags"]:
        print(f"warning: {flag}")


@exit_on_user_error
def check_probe_option_overrides(argv: list[str]) -> None:
    """``probe_options.<probe>.<option>=...`` names a probe and one of its options: a one-line error
    listing the valid ones (before Hydra, whose message would not)."""
    from masktrain.probes import get_probe

    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if parts[0] == "probe_options" and len(parts) >= 2:
            probe = get_probe(parts[1])
            if len(parts) >= 3:
                probe.parse_options({parts[2]: probe.default_options().get(parts[2])})


store_probe_defaults()  # before Hydra composes recipes/evaluate.yaml (here and in preflight)

if __name__ == "__main__":
    check_probe_option_overrides(sys.argv[1:])
    preflight("evaluate", sys.argv[1:], validate_config)
    main()
