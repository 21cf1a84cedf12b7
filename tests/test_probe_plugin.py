"""A probe is one file: a toy probe defined here, registered, appears in every output with no other change."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from masktrain.data.shapes import ShapesDataset
from masktrain.errors import UserError
from masktrain.evaluation import evaluate
from masktrain.models import create_model
from masktrain.probes import PROBES, Probe, register_probe
from masktrain.probes.base import accuracy_entry, predict
from masktrain.reports import write_report

K, SIZE = 4, 32
DATA = {"_target_": "masktrain.data.datamodule.MaskDataModule", "name": "shapes", "num_classes": K, "batch_size": 16,
        "eval_batch_size": 16, "num_workers": 0, "mean": [0.5, 0.5, 0.5],
        "dataset": {"_target_": "masktrain.data.shapes.shapes", "_partial_": True, "image_size": SIZE, "num_classes": K,
                    "seed": 0, "lengths": {"train": 16, "val": 16, "test": 24}}}


# ---- the whole probe: one class ---------------------------------------------------------

@dataclass
class CornerOptions:
    side: float = 0.25  # fraction of the image side removed in the top-left corner


class CornerProbe(Probe):
    """Accuracy with the top-left corner removed by each masking method (a toy)."""

    name = "toy_corner"
    Options = CornerOptions
    needs_object_masks = False
    headline = "accuracy with the top-left corner removed (toy)"

    def collect(self, ctx, key):
        method, side = ctx.method(key), ctx.opts(self.name).side
        h, w = (max(1, int(side * s)) for s in ctx.size)

        def run(rows):
            images = ctx.to_device(ctx.images[rows])[0]
            keep = torch.ones(len(rows), 1, *ctx.size, device=ctx.device)
            keep[:, :, :h, :w] = 0
            return method.logits(ctx.model, images, keep, ctx.random(self.name, key, rows))

        return {"pred": predict(ctx, run).argmax(dim=1)}

    def summarise(self, ctx, key, records, rows, subset):
        labels = records["label"][rows]
        entry = accuracy_entry(ctx, labels, records["pred"][rows], subset)
        entry["flags"] = []
        return entry

# -------------------------------------------------------------------------------------------


@pytest.fixture
def corner_probe():
    register_probe(CornerProbe)
    yield PROBES.get("toy_corner")
    PROBES.remove("toy_corner")


def test_toy_probe_appears_in_report_and_study(corner_probe, tmp_path, monkeypatch):
    import masktrain.study as study_mod

    torch.manual_seed(0)
    model = create_model("test_resnet", K)
    ds = ShapesDataset("test", length=24, image_size=SIZE, num_classes=K)
    report = evaluate(model, ds, ["toy_corner"], ["black", "noise"], num_classes=K, mean=(0.5, 0.5, 0.5), n_boot=50,
                      options={"toy_corner": {"side": 0.5}})
    files = write_report(report, tmp_path / "report")
    saved = json.loads(files["report.json"].read_text())
    assert set(saved["probes"]["toy_corner"]) == {"black", "noise"} and saved["probes"]["toy_corner"]["black"]["n"] == 24
    md = files["report.md"].read_text()
    assert "## toy_corner" in md and "top-left corner removed (toy)" in md and "| black | all |" in md
    assert "leakage.png" in files

    with pytest.raises(UserError, match=r"probe 'toy_corner' has no option 'sid'.*'side'"):
        evaluate(model, ds, ["toy_corner"], ["black"], num_classes=K, options={"toy_corner": {"sid": 1}})

    # A study of two fake runs (no training): the checkpoint loader is replaced by this model.
    root = tmp_path / "sweep"
    for regime in ("baseline", "mask_aug"):
        ckpt = root / regime / "seed0" / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    monkeypatch.setattr(study_mod, "load_classifier", lambda path: (model, {"data": DATA}))
    study = study_mod.run_study(root, probes=["toy_corner"], methods=["black", "noise"], n_images=24, log=lambda m: None)
    saved = json.loads((root / "study.json").read_text())
    assert saved["table"]["mask_aug"]["toy_corner"]["noise"]["n_seeds"] == 1
    md = (root / "study.md").read_text()
    assert "## toy_corner" in md and "top-left corner removed (toy)" in md and "| mask_aug |" in md
    assert (root / "study.png").stat().st_size > 1000
    assert study["probes"] == ["toy_corner"]


def test_study_png_has_a_panel_per_probe_panel(corner_probe, tmp_path):
    """study.png lays out whatever panels the probes return (a heat-map probe returns its own)."""
    from masktrain.study import plot_study

    drawn = []

    class Heat(CornerProbe):
        name = "toy_heat"

        def study_panels(self, study, cells):
            def draw(ax):
                drawn.append(ax)
                ax.imshow([[0, 1], [1, 0]])
            return [draw, draw]

    register_probe(Heat)
    try:
        cell = {"mean": 0.5, "std": 0.0, "n_seeds": 1, "chance": 0.25, "seeds": {}}
        study = {"study_dir": str(tmp_path), "regimes": ["baseline"], "methods": ["black"], "probes": ["toy_corner", "toy_heat"],
                 "table": {"baseline": {"toy_corner": {"black": cell}, "toy_heat": {"black": cell}}}}
        plot_study(study, tmp_path / "study.png")
        assert len(drawn) == 2 and (tmp_path / "study.png").stat().st_size > 1000
    finally:
        PROBES.remove("toy_heat")


def test_no_probe_name_in_evaluation_reports_study():
    """The evaluation, report and study code only iterate over probe objects."""
    root = Path(__file__).resolve().parents[1] / "masktrain"
    for module in ("evaluation.py", "reports.py", "study.py"):
        text = (root / module).read_text()
        named = [p for p in PROBES if p in text]
        assert not named, f"{module} names probes {named}"


def test_unknown_probe_option_on_the_command_line_is_one_line(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "evaluate.py"), "probe_options.shape_only.donor=[grey]",
                           f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "probe 'shape_only' has no option 'donor'" in lines[0] and "'donors'" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
