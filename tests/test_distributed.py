"""DDP and torchrun as users run them: the default W&B logger (offline), 2 CPU processes (gloo).

Each command must leave exactly one W&B offline run, written by W&B itself under the run
directory (so ``wandb sync`` takes it), holding the resolved config, the metrics and the
masked-sample images; no rank may touch a dummy experiment.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY, run_cli
from wandb_files import read_offline_run

METRICS = ("val/acc_clean", "val/acc_masked", "test/acc_clean", "test/acc_masked")


def _one_offline_run(directory: Path) -> Path:
    runs = list((directory / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected exactly one W&B offline run in {directory / 'wandb'}, found {runs}"
    return runs[0]


def _logged(record: dict, key: str, kind: str) -> bool:
    """Whether the run's history holds a W&B media object (``table``, ``image-file``) under ``key``."""
    return any(h.get(f"{key}/_type") == kind for h in record["history"])


def _wandb_sync_accepts(run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0 and "Would sync 1 run" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _clean_accuracy(ckpt: Path, split: str) -> float:
    """The checkpoint's clean accuracy on the whole split, in this one process."""
    import hydra

    from masktrain.checkpoint import load_classifier

    model, config = load_classifier(ckpt)
    dataset = hydra.utils.instantiate(config["data"]).dataset(split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def _without(args: list[str], key: str) -> list[str]:
    return [a for a in args if not a.startswith(f"{key}=")]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grey", "layer"])
def test_ddp_with_the_default_wandb_logger(tmp_path, method):
    common = ["recipe=mask_aug", f"mask.method={method}", *_without(TINY, "data.batch_size")]
    # 2 ranks × 16 = the global batch of the one-process run (32)
    ddp = run_cli("train.py", [*common, "data.batch_size=16", "trainer=ddp", "trainer.devices=2", "hydra.run.dir=ddp"],
                  tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Traceback" not in ddp.stderr and "AttributeError" not in ddp.stderr
    single = run_cli("train.py", [*common, "data.batch_size=32", "hydra.run.dir=single"], tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    run_dir = tmp_path / "ddp"
    wandb_run = _one_offline_run(run_dir)
    assert len(list(tmp_path.rglob("offline-run-*"))) == 2  # one for the DDP run, one for the single run
    record = read_offline_run(wandb_run)
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    assert record["config"] == json.loads(json.dumps(saved)), "W&B config = the resolved run config"
    assert record["config"]["trainer"]["strategy"] == "ddp" and record["config"]["mask"]["method"] == method
    assert record["run"]["name"] == "mask_aug-seed0" and record["run"]["job_type"] == "train"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in METRICS:  # W&B holds the run's final numbers
        assert record["summary"][key] == pytest.approx(metrics[key], abs=1e-6), key
    images = [h for h in record["history"] if h.get("train/masked_samples/_type") == "images/separated"]
    assert images and all((wandb_run / "files" / f).is_file() for h in images for f in h["train/masked_samples/filenames"])
    _wandb_sync_accepts(wandb_run)

    # Same global batch: the same optimizer steps as one process, and every reported accuracy
    # covers the whole split (both ranks' shards), as one process computes it from the same weights.
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert set(metrics) == set(one) and metrics["global_step"] == one["global_step"] == 2
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert metrics["val/acc_clean"] == pytest.approx(_clean_accuracy(ckpt, "val"), abs=1e-6)
    assert metrics["test/acc_clean"] == pytest.approx(_clean_accuracy(ckpt, "test"), abs=1e-6)


@pytest.mark.slow
def test_ddp_trains_on_a_mixed_condition_under_layer_masking(tmp_path):
    """mask=condition mask.condition=mixed_rand under layer masking on two ranks: each rank pastes partners
    from its own batch shard, drawn from its (seed, rank, step) generator; the run finishes and reports."""
    args = ["recipe=mixed_rand", "mask.method=layer", "logger=csv", *_without(TINY, "data.batch_size"),
            "data.batch_size=16", "trainer=ddp", "trainer.devices=2", "hydra.run.dir=ddp"]
    ddp = run_cli("train.py", args, tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and 0 <= metrics["val/acc_masked"] <= 1 and 0 <= metrics["test/acc_masked"] <= 1
    logged = (next((tmp_path / "ddp").rglob("metrics.csv"))).read_text().splitlines()[0].split(",")
    assert "train/partner_fallback" in logged


def _history_steps(record: dict) -> list[int]:
    return [h["trainer/global_step"] for h in record["history"] if "trainer/global_step" in h]


@pytest.mark.slow
def test_ddp_resume_continues_the_wandb_run(tmp_path):
    # Rank 0 alone knows the W&B run id; every rank reads it back from the same checkpoint on resume.
    common = ["recipe=mask_aug", *_without(_without(TINY, "data.batch_size"), "trainer.max_epochs"), "data.batch_size=16",
              "trainer=ddp", "trainer.devices=2", "hydra.run.dir=ddp"]
    first = run_cli("train.py", [*common, "trainer.max_epochs=1"], tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    steps = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["global_step"]
    second = run_cli("train.py", [*common, "trainer.max_epochs=2", "resume=true"], tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and "no W&B run id" not in second.stderr

    parts = sorted((tmp_path / "ddp" / "wandb").glob("offline-run-*"))  # oldest first
    assert len(parts) == 2 and len(list(tmp_path.rglob("offline-run-*"))) == 2  # one part per command, rank 0 only
    before, after = (read_offline_run(p) for p in parts)
    assert before["run"]["id"] == after["run"]["id"] and after["config"]["trainer"]["strategy"] == "ddp"
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["global_step"] == 2 * steps
    assert max(_history_steps(before)) == steps and min(_history_steps(after)) >= steps
    assert max(_history_steps(after)) == 2 * steps
    assert after["summary"]["test/acc_clean"] == pytest.approx(
        json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test/acc_clean"], abs=1e-6)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "evaluate.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


EVAL_FAST = ["n_images=16", "n_boot=50", "batch_size=8", "threads=1", "probes=[shape_only]", "methods=[black,grey]",
             "probe_options.shape_only.n_permutations=50", "probe_options.shape_only.donors=[grey]", "logger=wandb"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny finished two-run sweep (baseline and mask_aug, seed 0)."""
    from masktrain.cli import compose
    from masktrain.training import train

    root = tmp_path_factory.mktemp("sweep")
    for recipe in ("baseline", "mask_aug"):
        train(compose("train", [f"recipe={recipe}", "logger=none", *TINY]), root / recipe / "seed0")
    return root


@pytest.mark.slow
def test_evaluate_under_torchrun_with_wandb_writes_one_run(tmp_path, sweep):
    out = tmp_path / "report"
    proc = _torchrun([f"checkpoint={sweep / 'baseline' / 'seed0' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={out}",
                      *EVAL_FAST], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["world_size"] == 2 and report["probes"]["shape_only"]["black"]["n"] == 16
    record = read_offline_run(_one_offline_run(out))
    assert record["run"]["job_type"] == "evaluate" and record["config"]["world_size"] == 2
    assert _logged(record, "evaluation/summary", "table-file") and _logged(record, "evaluation/shape_only", "table-file")
    assert record["summary"]["shape_only/black/all"] == pytest.approx(report["probes"]["shape_only"]["black"]["value"])


@pytest.mark.slow
def test_study_under_torchrun_with_wandb_writes_one_run_into_the_study(tmp_path, sweep):
    work = tmp_path / "cwd"
    work.mkdir()
    proc = _torchrun([f"study={sweep}", *EVAL_FAST], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((sweep / "study.json").read_text())
    assert {r["regime"] for r in study["runs"]} == {"baseline", "mask_aug"}
    record = read_offline_run(_one_offline_run(sweep))
    assert record["run"]["job_type"] == "study" and record["run"]["group"] == sweep.name
    assert record["config"]["methods"] == ["black", "grey"]
    assert _logged(record, "study/table", "table-file") and _logged(record, "study/figure", "image-file")
    cell = study["table"]["mask_aug"]["shape_only"]["grey"]
    assert record["summary"]["mask_aug/shape_only/grey"] == pytest.approx(cell["mean"])
    assert list(work.iterdir()) == []  # nothing in the working directory: the study dir holds everything
