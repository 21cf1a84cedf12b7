"""Smoke-sized study through both command lines: the same code path as the real study
(Hydra multirun of every recipe, fine-tuning from the baseline, evaluate.py study=...)."""
import json

import pytest

from conftest import TINY, run_cli


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    train = run_cli(
        "train.py",
        ["-m", "recipe=baseline,continued_training,mask_aug,silhouette_aug,layer_mask_aug", "seed=0", "logger=csv", *TINY,
         "finetune.max_epochs=1", f"hydra.sweep.dir={sweep}"],
        tmp_path, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    for recipe in ("baseline", "continued_training", "mask_aug", "silhouette_aug", "layer_mask_aug"):
        assert (sweep / recipe / "seed0" / "checkpoints" / "last.ckpt").is_file()
    tuned = json.loads((sweep / "mask_aug" / "seed0" / "metrics.json").read_text())
    assert tuned["global_step"] == 4
    for recipe in ("continued_training", "mask_aug", "silhouette_aug", "layer_mask_aug"):
        saved = (sweep / recipe / "seed0" / "config.yaml").read_text()
        assert "baseline/seed0/checkpoints/last.ckpt" in saved, f"{recipe} did not fine-tune from the baseline"

    result = run_cli("evaluate.py", [f"study={sweep}", "n_images=16", "probes=[shape_only,object_removal]"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((sweep / "study.json").read_text())
    assert study["regimes"] == ["baseline", "continued_training", "mask_aug", "silhouette_aug", "layer_mask_aug"]
    # every augmented regime against both references, continued_training against the baseline; 2 probes x 3 methods
    assert study["comparison_tests"]["tests"] == (3 * 2 + 1) * 2 * 3
    c = study["comparisons"]["layer_mask_aug"]["continued_training"]["object_removal"]["layer"]
    assert c["n_pairs"] == 16 and c["verdict"] in {"raised", "lowered", "no evidence of a change"}
    assert study["table"]["mask_aug"]["shape_only"]["grey"]["ci95"] is not None
    assert "## Between-regime comparisons" in (sweep / "study.md").read_text()
    assert "layer" in study["table"]["layer_mask_aug"]["shape_only"]
    assert (sweep / "study.md").is_file() and (sweep / "study.png").is_file()
    assert not (tmp_path / "outputs").exists()
