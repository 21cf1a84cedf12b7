import json

import pytest

from conftest import TINY
from masktrain.cli import compose
from masktrain.errors import UserError
from masktrain.study import find_runs, run_study
from masktrain.training import train


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for recipe in ("baseline", "mask_aug"):
        for seed in (0, 1):
            cfg = compose("train", [f"recipe={recipe}", "logger=none", f"seed={seed}", *TINY, "finetune.max_epochs=1"])
            train(cfg, root / recipe / f"seed{seed}")
    return root


def test_find_runs_orders_baseline_first(sweep):
    runs = find_runs(sweep)
    assert [(r.regime, r.seed) for r in runs] == [("baseline", 0), ("baseline", 1), ("mask_aug", 0), ("mask_aug", 1)]


@pytest.mark.slow
def test_study_aggregates_regimes_probes_methods_over_seeds(sweep):
    study = run_study(sweep, probes=["shape_only", "object_removal"], methods=["black", "grey"], n_images=32, log=lambda m: None)
    saved = json.loads((sweep / "study.json").read_text())
    assert saved["regimes"] == ["baseline", "mask_aug"] and saved["seeds"] == [0, 1]
    cell = saved["table"]["mask_aug"]["shape_only"]["black"]
    assert cell["n_seeds"] == 2 and set(cell["seeds"]) == {"0", "1"}
    assert cell["chance"] == pytest.approx(0.1)
    values = [s["value"] for s in cell["seeds"].values()]
    assert cell["mean"] == pytest.approx(sum(values) / 2)
    assert study["baseline_check"]["status"] in {"reads_shape", "does_not_read_shape"}
    md = (sweep / "study.md").read_text()
    assert "Does the baseline read shape?" in md and "| mask_aug |" in md
    # one study-wide BH family over every headline verdict: 4 runs x (2 shape_only donors... ) x 2 methods
    assert saved["multiplicity"]["tests"] > 0 and "Benjamini" in saved["multiplicity"]["method"]
    seed_cell = saved["table"]["baseline"]["shape_only"]["black"]["seeds"]["0"]
    assert "q_study" in seed_cell["reads_shape"] and "q_report" in seed_cell["reads_shape"]
    assert "Reads shape — seeds whose verdict is significant" in md
    assert (sweep / "study.png").stat().st_size > 1000
    assert (sweep / "reports" / "baseline_seed0" / "report.json").is_file()


def test_empty_study_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds no runs"):
        find_runs(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        find_runs(tmp_path / "missing")
