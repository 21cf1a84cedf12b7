"""Probe ``backgrounds``: planted models whose answers are known, the statistics, the report, a study, bad input.

The planted data: K classes; each image has a background whose green level codes the class and
a square object (anywhere inside a 2-pixel border) whose red level codes the class, each
independently. Three planted models read fixed pixels only, so what they should score under
each condition is known exactly:

* ``BackgroundReader`` reads the green of the top-left pixel (always background);
* ``ObjectReader`` reads the red of the object's pixels (found by their green, 0.1);
* ``ConstantModel`` outputs the same logits for every image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from masktrain.errors import UserError
from masktrain.evaluation import evaluate
from masktrain.probes.backgrounds import macro_auc, weighted_auc
from masktrain.reports import write_report

K, SIZE, N = 4, 20, 96
LEVELS = torch.tensor([(c + 1) / (K + 1) for c in range(K)])  # 0.2 .. 0.8: never 0 (black) and never 0.5 (grey)


class PlantedSet(torch.utils.data.Dataset):
    """``(image (3, S, S), label, object (1, S, S))``; balanced labels, object position and size vary."""

    def __init__(self, n: int = N, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % K
        self.images = torch.zeros(n, 3, SIZE, SIZE)
        self.objects = torch.zeros(n, 1, SIZE, SIZE)
        for i in range(n):
            side = int(torch.randint(4, 8, (1,), generator=g))
            y, x = (int(v) for v in torch.randint(2, SIZE - 2 - side, (2,), generator=g))
            self.images[i, 1] = LEVELS[self.labels[i]]  # background green = class
            self.images[i, 2] = 0.3                      # constant blue, uninformative
            self.images[i, :, y:y + side, x:x + side] = torch.tensor([float(LEVELS[self.labels[i]]), 0.1, 0.3])[:, None, None]
            self.objects[i, :, y:y + side, x:x + side] = 1
        self.num_classes = K
        self.classes = [f"c{c}" for c in range(K)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), self.objects[i]


class _LevelReader(nn.Module):
    """Logits = −(level − class level)², from a scalar ``level (B,)`` the subclass reads."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0), requires_grad=False)

    def level(self, x):
        raise NotImplementedError

    def forward(self, x):
        return -self.scale * (self.level(x)[:, None] - LEVELS.to(x.device)[None]) ** 2


class BackgroundReader(_LevelReader):
    def level(self, x):
        return x[:, 1, 0, 0]


class ObjectReader(_LevelReader):
    def level(self, x):
        # the red of pixels whose green is the object's 0.1 (no background level, fill or black is 0.1)
        return (x[:, 0] * ((x[:, 1] - 0.1).abs() < 0.01)).amax(dim=(1, 2))


class ConstantModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.3, 0.1, -0.2, 0.0]), requires_grad=False)

    def forward(self, x):
        return self.bias.expand(x.shape[0], K)


def _run(model, methods=("black", "grey"), conditions=None, **kw):
    options = {"backgrounds": {"conditions": conditions}} if conditions else None
    return evaluate(model, PlantedSet(), probes=["backgrounds"], methods=list(methods), num_classes=K, mean=(0.5, 0.5, 0.5),
                    batch_size=32, n_boot=200, device="cpu", options=options, **kw)


@pytest.fixture(scope="module")
def reports():
    return {name: _run(m()) for name, m in (("background", BackgroundReader), ("object", ObjectReader), ("constant", ConstantModel))}


def test_background_reader_is_at_chance_without_background_and_high_without_object(reports):
    cols = reports["background"]["probes"]["backgrounds"]
    for method in ("black", "grey"):
        assert cols[f"original/{method}"]["value"] == 1.0
        for cond in ("no_fg", "only_bg_b", "only_bg_t", "mixed_same"):
            assert cols[f"{cond}/{method}"]["value"] == 1.0, cond
            assert cols[f"{cond}/{method}"]["auc"]["value"] == pytest.approx(1.0), cond
        for cond in ("only_fg", "only_fg_b"):
            e = cols[f"{cond}/{method}"]
            lo, hi = e["ci95"]
            assert lo <= 1 / K <= hi, (cond, method, e["value"])
            assert e["auc"]["value"] < 0.7, (cond, method)
            # the paired test against original: significant loss
            d = e["vs_original"]["accuracy"]
            assert d["ci95"][1] < 0 and d["p_value"] < 0.05
            # AUC: DeLong's paired test, the paired bootstrap kept beside it; both see the loss
            da, db = e["vs_original"]["auc"], e["vs_original"]["auc_bootstrap"]
            assert da["interval"] == "DeLong" and da["ci95"][1] < 0 and da["p_value"] < 0.05
            assert db["interval"] == "paired bootstrap" and db["value"] == pytest.approx(da["value"]) and db["ci95"][1] < 0
        # BG-Gap: the background decides, so mixed_rand is near chance and the gap is large and significant
        gap = cols[f"bg_gap/{method}"]
        assert gap["value"] > 0.5 and gap["ci95"][0] > 0 and gap["p_value"] < 0.05
        assert gap["value"] == pytest.approx(gap["acc_mixed_same"] - gap["acc_mixed_rand"])


def test_object_reader_is_the_reverse(reports):
    cols = reports["object"]["probes"]["backgrounds"]
    for method in ("black", "grey"):
        for cond in ("original", "only_fg", "only_fg_b", "mixed_same", "mixed_rand", "mixed_next"):
            assert cols[f"{cond}/{method}"]["value"] == 1.0, (cond, method)
        for cond in ("no_fg", "only_bg_b", "only_bg_t"):
            e = cols[f"{cond}/{method}"]
            lo, hi = e["ci95"]
            assert lo <= 1 / K <= hi, (cond, method, e["value"])
            assert e["vs_original"]["accuracy"]["p_value"] < 0.05
        gap = cols[f"bg_gap/{method}"]
        assert gap["value"] == 0.0 and gap["p_value"] >= 0.05


def test_constant_model_is_at_chance_everywhere_with_no_significant_gap(reports):
    cols = reports["constant"]["probes"]["backgrounds"]
    for key, e in cols.items():
        if key.startswith("bg_gap/"):
            assert e["value"] == 0.0 and e["ci95"] == [0.0, 0.0] and e["p_value"] >= 0.05
            continue
        assert e["value"] == pytest.approx(1 / K) and e["chance"] == pytest.approx(1 / K)
        assert e["auc"]["value"] == pytest.approx(0.5)  # all scores tied: one half
        assert e["vs_original"]["accuracy"]["value"] == 0 and e["vs_original"]["accuracy"]["p_value"] >= 0.05
        assert e["vs_original"]["auc"]["p_value"] >= 0.05 and e["vs_original"]["auc"]["interval"] == "DeLong"
        assert e["vs_original"]["auc_bootstrap"]["p_value"] >= 0.05
        assert e["correct"]["subset"] == "correct" and e["correct"]["n"] == N // K


def test_all_nine_conditions_and_gap_per_method_by_default(reports):
    keys = list(reports["constant"]["probes"]["backgrounds"])
    conditions = ["original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "only_fg_b", "mixed_same", "mixed_rand", "mixed_next"]
    assert keys == [f"{c}/{m}" for c in conditions for m in ("black", "grey")] + ["bg_gap/black", "bg_gap/grey"]


def test_layer_masking_only_fg_exists_and_reads_the_object():
    report = _run(ObjectReaderLayer(), methods=("layer",), conditions=["original", "only_fg", "no_fg"])
    cols = report["probes"]["backgrounds"]
    assert cols["only_fg/layer"]["value"] == 1.0
    assert cols["no_fg/layer"]["ci95"][0] <= 1 / K <= cols["no_fg/layer"]["ci95"][1]
    assert "bg_gap/layer" not in cols


class ObjectReaderLayer(nn.Module):
    """The object reader with the layer-masking interface (``normalize``, ``layer_masked``): the mask zeroes the input."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ObjectReader()

    def forward(self, x):
        return self.inner(x)

    def normalize(self, x):
        return x

    def layer_masked(self, output):
        return lambda x, keep: self.inner(x * keep)


def test_auc_against_a_pairwise_count():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    pos = rng.random(60) < 0.4
    w = rng.integers(0, 3, size=(5, 60)).astype(float)
    got = weighted_auc(scores, pos, w)
    for b in range(5):
        wp, wn = w[b] * pos, w[b] * ~pos
        gt = (scores[:, None] > scores[None]) + 0.5 * (scores[:, None] == scores[None])
        want = (wp[:, None] * wn[None] * gt).sum() / (wp.sum() * wn.sum())
        assert got[b] == pytest.approx(want)
    labels = rng.integers(0, 3, 60)
    s3 = rng.random((60, 3))
    per, macro = macro_auc(s3, labels, 3, np.ones((1, 60)))
    assert macro[0] == pytest.approx(per[0].mean())


def test_report_json_and_markdown(tmp_path, reports):
    files = write_report(reports["background"], tmp_path, plots=True)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert "backgrounds" in saved["probes"] and saved["probes"]["backgrounds"]["no_fg/black"]["auc"]["value"] == pytest.approx(1.0)
    md = files["report.md"].read_text()
    assert "| no_fg | black | all |" in md and "BG-Gap" in md and "paired bootstrap" in md


def test_bad_input_is_one_line():
    with pytest.raises(UserError, match="condition 'only_bg' is unknown"):
        _run(ConstantModel(), conditions=["original", "only_bg"])

    class NoMasks(PlantedSet):
        has_object_masks = False
        missing_masks_reason = "fg_mask/val is missing"

    with pytest.raises(UserError, match="needs object masks.*fg_mask/val is missing"):
        evaluate(ConstantModel(), NoMasks(), probes=["backgrounds"], methods=["black"], num_classes=K, device="cpu")


def test_not_run_by_default():
    from masktrain.evaluation import default_probes

    assert "backgrounds" not in default_probes()


# --- evaluate.py on IN-9 (the release's layout, written by tests/test_in9.py's writer) --------------

def _in9_weights(tmp_path, classes: int):
    from masktrain.models import create_model

    torch.manual_seed(0)
    path = tmp_path / f"w{classes}.pth"
    torch.save(create_model("test_resnet", classes).state_dict(), path)
    return path


def _in9_args(tmp_path, weights, out, *extra):
    from test_in9 import S

    return ["model.name=test_resnet", f"model.num_classes={weights.stem[1:]}", f"model.checkpoint_path={weights}", "data=in9",
            f"data.root={tmp_path / 'in9'}", f"data.dataset.image_size={S}", "data.num_workers=0", "probes=[backgrounds]",
            "methods=[black,layer]", "n_boot=50", "threads=1", f"hydra.run.dir={out}", *extra]


def test_evaluate_cli_on_in9_with_the_imagenet_mapping(tmp_path):
    from test_evaluate_cli import evaluate_cli
    from test_in9 import write_in9

    write_in9(tmp_path / "in9")
    out = tmp_path / "out"
    proc = evaluate_cli(*_in9_args(tmp_path, _in9_weights(tmp_path, 1000), out, "data.in9.map_imagenet=true",
                                   "probe_options.backgrounds.conditions=[original,only_fg,no_fg,mixed_same,mixed_rand]"),
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    cols = report["probes"]["backgrounds"]
    assert set(cols) == {f"{c}/{m}" for c in ("original", "only_fg", "no_fg", "mixed_same", "mixed_rand", "bg_gap")
                         for m in ("black", "layer")}
    assert report["model"]["num_classes"] == 9 and "IN-9" in report["model"]["name"]
    assert cols["only_fg/layer"]["n"] == 6 and "| only_fg | layer | all |" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["imagenet-without-mapping", "mapping-with-other-probe", "no-object-masks", "unknown-condition"])
def test_evaluate_cli_on_in9_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    from test_evaluate_cli import assert_one_line_error, evaluate_cli
    from test_in9 import write_in9

    write_in9(tmp_path / "in9", masks=case != "no-object-masks")
    out = tmp_path / "out"
    weights = _in9_weights(tmp_path, 1000 if case != "no-object-masks" else 9)
    extra, needle = {
        "imagenet-without-mapping": ([], "data.in9.map_imagenet=true"),
        "mapping-with-other-probe": (["data.in9.map_imagenet=true", "probes=[backgrounds,object_removal]"], "use probes=[backgrounds]"),
        "no-object-masks": ([], "needs object masks"),
        "unknown-condition": (["data.in9.map_imagenet=true", "probe_options.backgrounds.conditions=[original,mixed]"],
                              "condition 'mixed' is unknown"),
    }[case]
    proc = evaluate_cli(*_in9_args(tmp_path, weights, out, *extra), cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert not out.exists() and not list(tmp_path.rglob("report.json"))


def test_empty_subset_gives_no_numbers_not_an_error():
    assert np.isnan(weighted_auc(np.zeros(0), np.zeros(0, dtype=bool), np.ones((3, 0)))).all()


# --- study: train regime × test condition --------------------------------------------------

def test_study_matrix_markdown_json_and_heatmap(tmp_path, reports):
    from masktrain.study import aggregate, plot_study, render_markdown

    runs = {("background", 0): reports["background"], ("background", 1): _run(BackgroundReader(), seed=1),
            ("object", 0): reports["object"]}
    table = aggregate(runs)
    study = {"study_dir": str(tmp_path), "runs": [{"regime": r, "seed": s} for r, s in runs], "regimes": ["background", "object"],
             "seeds": [0, 1], "methods": ["black", "grey"], "probes": ["backgrounds"], "n_images": N, "table": table,
             "flags": [], "hardware": "test", "timing": {"total_s": 1.0}}
    cell = table["background"]["backgrounds"]["no_fg/black"]
    assert cell["n_seeds"] == 2 and cell["mean"] == 1.0 and cell["auc"]["mean"] == pytest.approx(1.0)
    # each seed keeps its paired tests against original: accuracy by bootstrap, AUC by DeLong (and the bootstrap)
    lost = table["background"]["backgrounds"]["only_fg/black"]["seeds"]["0"]["vs_original"]
    assert lost["accuracy"]["interval"] == "paired bootstrap" and lost["auc"]["interval"] == "DeLong"
    assert lost["auc"]["p_value"] < 0.05 and lost["auc_bootstrap"]["interval"] == "paired bootstrap"
    # mixed_rand partners depend on the seed: two seeds give a spread
    spread = table["background"]["backgrounds"]["mixed_rand/black"]
    assert spread["n_seeds"] == 2 and spread["min"] <= spread["mean"] <= spread["max"]
    md = render_markdown(study)
    assert "### black: accuracy (%)" in md and "### grey: AUC" in md
    assert "| train \\ test | original | only_fg | no_fg | only_bg_b | only_bg_t | only_fg_b | mixed_same | mixed_rand | mixed_next | bg_gap |" in md
    row = next(line for line in md.splitlines() if line.startswith("| object |"))
    assert row.startswith("| object | 100.0 | 100.0 | 25.0 |"), row
    plot_study(study, tmp_path / "study.png")
    assert (tmp_path / "study.png").stat().st_size > 5000
    json.dumps(study, default=float)


@pytest.mark.slow
def test_mask_of_truth_sweep_through_evaluate_py_study_mode(tmp_path):
    """The command pair: train.py recipes (tiny) -> evaluate.py study=<dir> probes=[backgrounds]."""
    from conftest import TINY
    from masktrain.cli import compose
    from masktrain.training import train
    from test_evaluate_cli import evaluate_cli

    root = tmp_path / "sweep"
    for recipe in ("baseline", "no_fg", "only_fg"):
        cfg = compose("train", [f"recipe={recipe}", "logger=none", "seed=0", *TINY, "finetune.max_epochs=1"])
        train(cfg, root / recipe / "seed0")
    proc = evaluate_cli(f"study={root}", "n_images=16", "probes=[backgrounds]", "methods=[black,layer]", "n_boot=50", "threads=1",
                        "probe_options.backgrounds.conditions=[original,only_fg,no_fg]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = json.loads((root / "study.json").read_text())
    assert study["regimes"] == ["baseline", "no_fg", "only_fg"]
    assert set(study["table"]["no_fg"]["backgrounds"]) == {f"{c}/{m}" for c in ("original", "only_fg", "no_fg") for m in ("black", "layer")}
    md = (root / "study.md").read_text()
    assert "| only_fg |" in md and "### layer: AUC" in md and (root / "study.png").stat().st_size > 5000


def test_wandb_offline_tables_carry_the_auc(tmp_path, reports):
    from masktrain.reports import log_wandb
    from wandb_files import read_offline_run

    files = write_report(reports["background"], tmp_path / "r", plots=True)
    run_dir = log_wandb(reports["background"], files, tmp_path / "r", mode="offline")
    record = read_offline_run(Path(run_dir).parent)
    assert record["summary"]["backgrounds/no_fg/black/all"] == 1.0
    assert record["summary"]["backgrounds/only_fg/black/all"] == pytest.approx(0.25)
    s = record["summary"]
    assert s["evaluation/backgrounds/_type"] == "table-file"
    assert s["evaluation/backgrounds/nrows"] == 2 * len(reports["background"]["probes"]["backgrounds"])
    table = json.loads((Path(run_dir) / s["evaluation/backgrounds/path"]).read_text())
    auc = table["columns"].index("auc")
    assert {row[auc] for row in table["data"] if row[table["columns"].index("key")] == "no_fg/black"} == {1.0}
