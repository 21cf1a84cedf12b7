"""``python evaluate.py``: a report from a run checkpoint, clear one-line errors, no partial
output on failure, and exact counts under DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
K, SIZE = 4, 32

DATA = {
    "_target_": "masktrain.data.datamodule.MaskDataModule",
    "name": "shapes",
    "num_classes": K,
    "batch_size": 32,
    "eval_batch_size": 64,
    "num_workers": 0,
    "mean": [0.5, 0.5, 0.5],
    "dataset": {"_target_": "masktrain.data.shapes.shapes", "_partial_": True, "image_size": SIZE, "num_classes": K,
                "seed": 0, "lengths": {"train": 120, "val": 20, "test": 48}},
}

FAST = ["n_images=32", "n_boot=50", "batch_size=32", "threads=1", "probe_options.shape_only.n_permutations=50",
        "probe_options.shape_only.donors=[background,grey]", "probe_options.mask_only.train_size=64",
        "probe_options.mask_only.epochs=1", "probe_options.linear_probe.folds=2",
        "probe_options.missingness_curve.fractions=[0.0,0.5,1.0]"]


def make_checkpoint(path: Path, model_name: str = "test_resnet", data: dict | None = None, state_from: str | None = None) -> Path:
    """A run checkpoint in the format train.py writes (Lightning: state_dict under ``model.``, config in hyper_parameters)."""
    from masktrain.models import create_model

    torch.manual_seed(0)
    clf = create_model(state_from or model_name, K)
    torch.save({"state_dict": {"model." + k: v for k, v in clf.state_dict().items()},
                "hyper_parameters": {"config": {"name": "fake", "seed": 0, "model": {"name": model_name},
                                                "data": data or DATA, "mask": {"kind": "none"}}}}, path)
    return path


def evaluate_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{cwd}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert err.startswith("error:"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow
def test_report_from_run_checkpoint_with_wandb(tmp_path):
    ckpt = make_checkpoint(tmp_path / "last.ckpt")
    out = tmp_path / "report"
    proc = evaluate_cli(f"checkpoint={ckpt}", f"hydra.run.dir={out}", "logger=wandb", "methods=[black,grey]", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["probes"]) == {"object_removal", "shape_only", "linear_probe", "mask_only", "missingness_curve"}
    assert set(report["probes"]["shape_only"]) == {"black", "grey"}
    assert set(report["probes"]["mask_only"]) == {"silhouette", "bbox"}
    e = report["probes"]["shape_only"]["black"]
    for field in ("value", "n", "chance", "ci95", "per_class", "subset", "correct", "mi", "control", "flags"):
        assert field in e
    assert e["n"] == 32 and report["dataset"]["n"] == 32 and report["dataset"]["image_size"] == [SIZE, SIZE]
    assert report["dataset"]["num_classes"] == K  # the data config came from the checkpoint
    assert any("low_contrast" in f for f in report["flags"])  # grey fill on the grey donor
    md = (out / "report.md").read_text()
    assert "## shape_only" in md and "⚠️" in md
    assert (out / "missingness_curves.png").stat().st_size > 0 and (out / "leakage.png").stat().st_size > 0
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run under the output directory"
    assert not list(tmp_path.glob(".report.tmp-*"))


@pytest.mark.slow
def test_timm_model_with_local_weights_and_data_override(tmp_path):
    from masktrain.models import create_model

    torch.save(create_model("test_resnet", K).state_dict(), tmp_path / "w.pth")
    out = tmp_path / "o"
    proc = evaluate_cli("model.name=test_resnet", f"model.checkpoint_path={tmp_path / 'w.pth'}", f"data.num_classes={K}",
                        "data.dataset.image_size=32", "data.num_workers=0", "probes=[missingness_curve,object_removal]",
                        "methods=[blur]", f"hydra.run.dir={out}", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["probes"]) == ["missingness_curve", "object_removal"] and report["model"]["name"] == "test_resnet"


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), list(out.rglob("*"))
    assert not list(tmp_path.rglob("report.json"))


@pytest.mark.parametrize(
    "args,needles",
    [
        (["checkpoint=does/not/exist.ckpt"], ["does not exist"]),
        (["probes=[shape_only,telepathy]"], ["probe 'telepathy' is unknown"]),
        (["methods=[black,purple]"], ["method 'purple' is unknown"]),
    ],
    ids=["missing-checkpoint", "unknown-probe", "unknown-method"],
)
def test_bad_arguments_fail_in_one_line_before_any_output(tmp_path, args, needles):
    make_checkpoint(tmp_path / "last.ckpt")
    out = tmp_path / "out"
    base = [] if any(a.startswith("checkpoint=") for a in args) else [f"checkpoint={tmp_path / 'last.ckpt'}"]
    proc = evaluate_cli(*base, *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    _no_output(tmp_path, out)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "out"
    proc = evaluate_cli(f"checkpoint={bad}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert_one_line_error(proc, "corrupt")
    _no_output(tmp_path, out)


def test_incompatible_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "mismatch.ckpt", model_name="resnet18", state_from="test_resnet")
    out = tmp_path / "out"
    proc = evaluate_cli(f"checkpoint={ckpt}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert_one_line_error(proc, "does not fit")
    _no_output(tmp_path, out)


def test_dataset_without_object_masks(tmp_path):
    (tmp_path / "nomask_ds.py").write_text(
        "import torch\n"
        "class NoMasks(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 16\n"
        "    def __getitem__(self, i): return torch.rand(3, 32, 32), i % 4\n"
        "def make(split, **kw): return NoMasks()\n"
    )
    data = {**DATA, "dataset": {"_target_": "nomask_ds.make", "_partial_": True}}
    ckpt = make_checkpoint(tmp_path / "last.ckpt", data=data)
    out = tmp_path / "out"
    proc = evaluate_cli(f"checkpoint={ckpt}", f"hydra.run.dir={out}", "probes=[shape_only]", cwd=tmp_path)
    assert_one_line_error(proc, "no object masks", "shape_only")
    _no_output(tmp_path, out)


# --- DDP: exact counts, results identical to one process -----------------------------


def _ddp_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from masktrain.data.shapes import ShapesDataset
    from masktrain.evaluation import evaluate
    from masktrain.models import create_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = create_model("test_resnet", K)
        ds = ShapesDataset("test", length=37, image_size=SIZE, num_classes=K)  # 37: not divisible by the world size
        report = evaluate(model, ds, ["object_removal", "shape_only", "missingness_curve"], ["black", "grey"], num_classes=K,
                          mean=(0.5, 0.5, 0.5), batch_size=8, n_boot=50,
                          options={"shape_only": {"donors": ["grey"], "n_permutations": 50},
                                   "missingness_curve": {"fractions": [0.0, 0.5]}})
        if rank == 0:
            torch.save(report, result_file)
    finally:
        dist.destroy_process_group()


def _counts(report: dict) -> dict:
    """(images, correctly classified images) per probe × method: integers, compared exactly."""
    return {(p, k): (e["n"], e["correct"]["n"]) for p, cols in report["probes"].items() for k, e in cols.items()}


def _values(report: dict) -> dict:
    """The headline value per probe × method (a flat mapping: pytest.approx takes no nested containers)."""
    return {(p, k): e["value"] for p, cols in report["probes"].items() for k, e in cols.items()}


@pytest.mark.slow
def test_ddp_counts_are_exact_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)

    from masktrain.data.shapes import ShapesDataset
    from masktrain.evaluation import evaluate
    from masktrain.models import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", K)
    ds = ShapesDataset("test", length=37, image_size=SIZE, num_classes=K)
    single = evaluate(model, ds, ["object_removal", "shape_only", "missingness_curve"], ["black", "grey"], num_classes=K,
                      mean=(0.5, 0.5, 0.5), batch_size=8, n_boot=50,
                      options={"shape_only": {"donors": ["grey"], "n_permutations": 50}, "missingness_curve": {"fractions": [0.0, 0.5]}})
    assert ddp["config"]["world_size"] == 2
    assert all(n == 37 for n, _ in _counts(ddp).values())
    assert _counts(ddp) == _counts(single)
    assert _values(ddp) == pytest.approx(_values(single))


# --- study mode: python evaluate.py study=<sweep root> --------------------------------


@pytest.mark.slow
def test_study_mode_writes_into_the_study_dir_and_leaves_no_outputs(tmp_path):
    from conftest import TINY
    from masktrain.cli import compose
    from masktrain.training import train

    root = tmp_path / "sweep"
    for recipe in ("baseline", "mask_aug"):
        cfg = compose("train", [f"recipe={recipe}", "logger=none", "seed=0", *TINY, "finetune.max_epochs=1"])
        train(cfg, root / recipe / "seed0")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = evaluate_cli(f"study={root}", "n_images=16", "probes=[shape_only]", "n_boot=50", "threads=1",
                        "probe_options.shape_only.n_permutations=50", "probe_options.shape_only.donors=[grey]", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("study.json", "study.md", "study.png"):
        assert (root / name).is_file(), name
    study = json.loads((root / "study.json").read_text())
    assert study["methods"] == ["black", "grey", "layer"]  # study_methods: training fill, non-matching fill, layer
    assert {r["regime"] for r in study["runs"]} == {"baseline", "mask_aug"}
    assert not (work / "outputs").exists() and list(work.iterdir()) == []


def test_study_mode_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = evaluate_cli(f"study={empty}", "probes=[shape_only]", cwd=tmp_path)
    assert_one_line_error(proc, "holds no runs")
    assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and list(empty.iterdir()) == []

    proc = evaluate_cli(f"study={tmp_path / 'missing'}", cwd=tmp_path)
    assert_one_line_error(proc, "is not a directory")
    ckpt = make_checkpoint(tmp_path / "last.ckpt")
    proc = evaluate_cli(f"study={empty}", f"checkpoint={ckpt}", cwd=tmp_path)
    assert_one_line_error(proc, "exclusive")
    assert not (tmp_path / "outputs").exists()
