"""Sweeps: fine-tunes start only from a finished baseline of their own sweep, and Hydra's
parallel launchers (joblib, submitit) give exactly the results of the basic launcher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY, run_cli
from masktrain.cli import compose
from masktrain.errors import UserError
from masktrain.sweeps import check_parallel_sweep, finished_run_checkpoint
from masktrain.training import resolve_init

SEEDS = "seed=0,1"


def _fake_run(run_dir: Path, finished: bool = True) -> Path:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not read by the lookup")
    if finished:
        (run_dir / "metrics.json").write_text("{}")
    return ckpt


def test_fine_tune_source_must_exist_and_be_finished(tmp_path):
    with pytest.raises(UserError, match=r"seed 1 .* does not exist.*recipe=baseline seed=1.*finetune.from_recipe=null"):
        finished_run_checkpoint(tmp_path, "baseline", 1)
    _fake_run(tmp_path / "baseline" / "seed1", finished=False)
    with pytest.raises(UserError, match="has not finished"):
        finished_run_checkpoint(tmp_path, "baseline", 1)
    (tmp_path / "baseline" / "seed1" / "metrics.json").write_text("{}")
    assert finished_run_checkpoint(tmp_path, "baseline", 1) == tmp_path / "baseline" / "seed1" / "checkpoints" / "last.ckpt"


def test_lookup_only_inside_a_sweep_or_when_asked(tmp_path):
    ckpt = _fake_run(tmp_path / "some" / "baseline" / "seed0")  # an unrelated run two levels above the run dir
    cfg = compose("train", ["recipe=mask_aug"])
    assert resolve_init(cfg, tmp_path / "some" / "where" / "run") is None
    asked = compose("train", ["recipe=mask_aug", f"finetune.from_sweep={tmp_path / 'some'}"])
    assert resolve_init(asked, tmp_path / "anywhere") == str(ckpt)
    with pytest.raises(UserError, match="does not exist"):
        resolve_init(compose("train", ["recipe=mask_aug", "seed=3", f"finetune.from_sweep={tmp_path / 'some'}"]), tmp_path)
    assert resolve_init(compose("train", ["recipe=baseline", f"finetune.from_sweep={tmp_path / 'some'}"]), tmp_path) is None


def test_parallel_launcher_check_needs_a_dependency_inside_the_sweep():
    jobs = [compose("train", [f"recipe={r}"]) for r in ("baseline", "mask_aug")]
    check_parallel_sweep(["-m", "recipe=baseline,mask_aug"], jobs)  # basic launcher: sequential, fine
    check_parallel_sweep(["-m", "recipe=mask_aug", "hydra/launcher=joblib"], jobs[1:])  # stage 2 alone: fine
    with pytest.raises(UserError, match="hydra/launcher=submitit_slurm .* recipe=mask_aug fine-tunes from the baseline"):
        check_parallel_sweep(["-m", "recipe=baseline,mask_aug", "hydra/launcher=submitit_slurm"], jobs)


def test_local_ddp_inside_a_sweep_is_refused_but_slurm_starts_the_ranks():
    ddp = [compose("train", ["recipe=baseline", "trainer=ddp", "trainer.devices=2", f"seed={s}"]) for s in (0, 1)]
    for launcher in ([], ["hydra/launcher=joblib"], ["hydra/launcher=submitit_local"]):
        with pytest.raises(UserError, match="re-run the whole sweep"):
            check_parallel_sweep(["-m", "seed=0,1", *launcher], ddp)
    check_parallel_sweep(["-m", "seed=0,1", "hydra/launcher=submitit_slurm"], ddp)
    check_parallel_sweep(["seed=0", "trainer=ddp"], ddp[:1])  # a single DDP run: Lightning starts its ranks
    one_device = [compose("train", ["recipe=baseline", "trainer=ddp", "trainer.devices=1"])]
    check_parallel_sweep(["-m", "seed=0"], one_device)


def test_parallel_sweep_of_baseline_and_fine_tunes_is_refused_before_anything_runs(tmp_path):
    result = run_cli("train.py", ["-m", "recipe=baseline,mask_aug", "hydra/launcher=joblib", "logger=none", *TINY], tmp_path,
                     timeout=180)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hydra/launcher=joblib"), result.stderr[-2000:]
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_fine_tune_sweep_without_its_baseline_stops_with_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", ["-m", "recipe=mask_aug", "logger=none", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "baseline run of seed 0" in errors[0] and "does not exist" in errors[0], result.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not (sweep / "mask_aug" / "seed0").exists()


@pytest.mark.slow
def test_single_run_in_an_explicit_directory_trains_from_scratch_without_a_lookup(tmp_path):
    _fake_run(tmp_path / "some" / "baseline" / "seed0")  # would fail to load if it were picked up
    result = run_cli("train.py", ["recipe=mask_aug", "logger=none", *TINY, f"hydra.run.dir={tmp_path / 'some' / 'where' / 'run'}"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline" not in result.stderr.replace("recipe=baseline", ""), result.stderr[-3000:]
    run = tmp_path / "some" / "where" / "run"
    assert OmegaConf.load(run / "config.yaml").init_from is None
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4  # trainer.max_epochs, not finetune's


# --- the README's two-stage study under every launcher --------------------------------------


def two_stage_study(cwd: Path, sweep: Path, launcher: list[str]) -> None:
    """The README's study commands (default logger: W&B offline), tiny: baselines, then the fine-tunes."""
    for recipes in ("baseline", "mask_aug"):
        result = run_cli("train.py", ["-m", f"recipe={recipes}", SEEDS, *TINY, "finetune.max_epochs=1",
                                      f"hydra.sweep.dir={sweep}", *launcher], cwd, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]


def sweep_metrics(sweep: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(sweep)): json.loads(p.read_text()) for p in sorted(sweep.glob("*/seed*/metrics.json"))}


@pytest.fixture(scope="module")
def basic_study(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("basic")
    two_stage_study(cwd, cwd / "study", [])
    return cwd / "study"


def _check_study(sweep: Path) -> None:
    assert sorted(sweep_metrics(sweep)) == ["baseline/seed0", "baseline/seed1", "mask_aug/seed0", "mask_aug/seed1"]
    for seed in (0, 1):
        tuned = OmegaConf.load(sweep / "mask_aug" / f"seed{seed}" / "config.yaml")
        assert tuned.init_from == str(sweep.absolute() / "baseline" / f"seed{seed}" / "checkpoints" / "last.ckpt")
        for recipe in ("baseline", "mask_aug"):  # one W&B run per training run, in its own directory
            assert len(list((sweep / recipe / f"seed{seed}" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_joblib_launcher_gives_the_basic_launchers_results(tmp_path, basic_study):
    sweep = tmp_path / "study"
    two_stage_study(tmp_path, sweep, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    _check_study(basic_study)
    _check_study(sweep)
    assert sweep_metrics(sweep) == sweep_metrics(basic_study)


@pytest.mark.slow
def test_submitit_local_launcher_gives_the_basic_launchers_results(tmp_path, basic_study):
    sweep = tmp_path / "study"
    result = run_cli("train.py", ["-m", "recipe=baseline", SEEDS, *TINY, f"hydra.sweep.dir={sweep}",
                                  "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((sweep / ".submitit").iterdir()), "the jobs ran through submitit"
    expected = {k: v for k, v in sweep_metrics(basic_study).items() if k.startswith("baseline/")}
    assert sweep_metrics(sweep) == expected
