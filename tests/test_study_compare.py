"""A study's intervals over seeds *and* test images, and its between-regime tests (issue 13).

Planted reports (per-image outcomes drawn with known rates) check that a regime that truly differs is
called raised/lowered and one identical to its reference up to noise is not; a simulated case checks
the two-level bootstrap's coverage; planted checkpoints run the real ``run_study`` wiring.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from masktrain import hierarchical
from masktrain.data.shapes import ShapesDataset
from masktrain.evaluation import evaluate
from masktrain.models import create_model
from masktrain.reports import load_outcomes, write_report
from masktrain.rng import name_key
from masktrain.study import Run, build_study, render_markdown
from masktrain.study_compare import LOWERED, NO_CHANGE, RAISED, comparison_pairs

N_IMAGES, SEEDS = 400, (0, 1, 2)
METHODS = ("black", "grey")


def planted_reports(rates: dict[str, dict[str, float]], n: int = N_IMAGES, seeds=SEEDS, shared: float = 0.8,
                    salt: int = 0) -> dict[tuple[str, int], dict]:
    """Reports whose shape_only headline is a per-image 0/1 outcome with the given rate per regime and method.

    Every regime of a seed sees the same images: an image's outcome is ``u[i] < rate`` for a per-(seed, image)
    uniform ``u`` shared by all regimes with probability ``shared`` (images hard or easy for every model), an
    independent draw otherwise — regimes with the same rate are identical up to that noise."""
    reports = {}
    for seed in seeds:
        rng = np.random.default_rng(1000 * salt + seed)
        common = rng.random((len(METHODS), n))
        for regime, by_method in rates.items():
            g = np.random.default_rng([salt, seed, name_key(regime)])
            own, mix = g.random((len(METHODS), n)), g.random((len(METHODS), n))
            u = np.where(mix < shared, common, own)
            probes, outcomes = {"shape_only": {}}, {"shape_only": {}}
            for j, method in enumerate(METHODS):
                hits = (u[j] < by_method[method]).astype(np.float64)
                probes["shape_only"][method] = {"value": float(hits.mean()), "ci95": [0, 1], "n": n, "chance": 0.1,
                                                "correct": {"value": None, "ci95": None, "n": 0}, "flags": []}
                outcomes["shape_only"][method] = hits
            reports[(regime, seed)] = {"probes": probes, "outcomes": outcomes, "flags": [],
                                       "dataset": {"fingerprint": f"test-set-{seed}"}}
    return reports


def study_of(reports, **kw):
    runs = [Run(regime, seed, Path(f"{regime}/seed{seed}")) for regime, seed in reports]
    return build_study(reports, Path("planted"), runs, ["shape_only"], list(METHODS), N_IMAGES, 0.0, **kw)


RATES = {
    "baseline": {"black": 0.30, "grey": 0.30},
    "continued_training": {"black": 0.30, "grey": 0.30},
    "mask_aug": {"black": 0.40, "grey": 0.30},        # raised under black only
    "silhouette_aug": {"black": 0.30, "grey": 0.20},  # lowered under grey only
}


@pytest.fixture(scope="module")
def study():
    return study_of(planted_reports(RATES))


def test_regime_order_and_pairs_include_continued_training():
    from masktrain.study import REGIME_ORDER

    assert REGIME_ORDER[:2] == ("baseline", "continued_training")
    assert comparison_pairs(["baseline", "continued_training", "mask_aug"]) == [
        ("mask_aug", "baseline"), ("mask_aug", "continued_training"), ("continued_training", "baseline")]
    assert comparison_pairs(["baseline", "no_fg"]) == [("no_fg", "baseline")]


def test_a_true_difference_is_detected_and_an_identical_regime_is_not(study):
    c = study["comparisons"]
    for ref in ("baseline", "continued_training"):
        raised = c["mask_aug"][ref]["shape_only"]["black"]
        assert raised["verdict"] == RAISED and raised["q_value"] < 0.05 and raised["ci95"][0] > 0
        assert raised["difference"] == pytest.approx(0.10, abs=0.04)
        lowered = c["silhouette_aug"][ref]["shape_only"]["grey"]
        assert lowered["verdict"] == LOWERED and lowered["ci95"][1] < 0
    for method in METHODS:  # the same rate as the baseline: identical up to noise
        same = c["continued_training"]["baseline"]["shape_only"][method]
        assert same["verdict"] == NO_CHANGE and same["q_value"] >= 0.05, same
    m = study["comparison_tests"]
    assert m["tests"] == 2 * 2 * 2 + 2 and "Benjamini" in m["method"] and "sign-flip" in m["test"]


def test_identical_regimes_are_rarely_called_changed():
    """Global null (every regime has the same rates): BH keeps the chance of any "raised"/"lowered" in a study of
    10 comparisons at or below 5%; over 40 planted studies at most a few may show one."""
    same = {r: {"black": 0.3, "grey": 0.3} for r in RATES}
    called = []
    for salt in range(40):
        c = study_of(planted_reports(same, salt=salt + 1), n_boot=500, n_permutations=2000)["comparisons"]
        verdicts = [k["verdict"] for by_ref in c.values() for by_probe in by_ref.values() for by_key in by_probe.values()
                    for k in by_key.values()]
        assert len(verdicts) == 10
        called.append(any(v != NO_CHANGE for v in verdicts))
    assert np.mean(called) <= 0.125, np.mean(called)


def test_cells_get_two_level_intervals(study):
    cell = study["table"]["mask_aug"]["shape_only"]["black"]
    lo, hi = cell["ci95"]
    assert lo < cell["mean"] < hi and hi - lo < 0.15
    assert cell["interval"]["n_seeds"] == 3 and cell["interval"]["n_images"] == 3 * N_IMAGES
    assert cell["interval"]["value"] == pytest.approx(cell["mean"])


def test_markdown_says_raised_or_lowered_only_when_q_is_small(study):
    md = render_markdown({**study, "timing": {"total_s": 1.0}, "hardware": "test"})
    rows = [line for line in md.splitlines() if line.startswith("| ") and " − " in line.split("|")[1] and "reference" not in line]
    assert len(rows) == 5, md  # mask_aug and silhouette_aug against both references, continued_training − baseline
    for row in rows:
        for cell in row.split("|")[2:-1]:
            q = float(cell.split("q=")[1].split()[0])
            if RAISED in cell or LOWERED in cell:
                assert q < 0.05, cell
            else:
                assert NO_CHANGE in cell, cell
    prose = [line for line in md.splitlines() if line not in rows]
    assert not [line for line in prose if RAISED in line or LOWERED in line]  # the words appear only in judged cells
    by_row = {row.split("|")[1].strip(): row.split("|")[2:-1] for row in rows}
    for ref in ("baseline", "continued_training"):  # the planted effects: black raised, grey lowered
        assert f"**{RAISED}**" in by_row[f"mask_aug − {ref}"][0] and f"**{LOWERED}**" in by_row[f"silhouette_aug − {ref}"][1]
    assert "## Between-regime comparisons" in md and "[95% interval: two-level bootstrap" in md


def test_study_numbers_are_deterministic():
    a = study_of(planted_reports(RATES))
    b = study_of(planted_reports(RATES))
    assert json.dumps(a["comparisons"], sort_keys=True) == json.dumps(b["comparisons"], sort_keys=True)
    assert a["table"]["baseline"]["shape_only"]["grey"]["ci95"] == b["table"]["baseline"]["shape_only"]["grey"]["ci95"]


def test_seeds_with_other_test_images_are_not_paired():
    reports = planted_reports(RATES)
    reports[("mask_aug", 2)]["dataset"]["fingerprint"] = "another test set"
    c = study_of(reports)["comparisons"]["mask_aug"]["baseline"]["shape_only"]["black"]
    assert c["unpaired_seeds"] == [2] and c["n_seeds"] == 2 and set(c["per_seed"]) == {"0", "1"}


def test_sign_flip_counts_match_flipping_every_image(monkeypatch):
    """The binomial-count form of the null is the sign-matrix form's distribution (same quantiles)."""
    rng = np.random.default_rng(3)
    diffs = [rng.choice([-2, -1, 0, 0, 1, 1, 2], size=300).astype(float) for _ in range(3)]
    counted = hierarchical.sign_flip_null(diffs, 20000, np.random.default_rng(0))
    monkeypatch.setattr(hierarchical, "MAX_FLIP_LEVELS", 0)
    flipped = hierarchical.sign_flip_null(diffs, 20000, np.random.default_rng(1))
    q = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    assert np.allclose(np.quantile(counted, q), np.quantile(flipped, q), atol=0.004)
    assert counted.std() == pytest.approx(np.sqrt(sum((d ** 2).sum() for d in diffs)) / 900, rel=0.03)


def test_sign_flip_p_is_uniform_under_the_null_and_small_under_an_effect():
    ps = [hierarchical.sign_flip_test([np.random.default_rng(100 * r + s).choice([-1.0, 0, 0, 1], 300) for s in range(3)],
                                      2000, r)["p_value"] for r in range(200)]
    assert 0.02 <= np.mean(np.array(ps) < 0.05) <= 0.09
    effect = [np.random.default_rng(s).choice([-1.0, 0, 0, 1, 1], 300) for s in range(3)]
    assert hierarchical.sign_flip_test(effect, 10000, 0)["p_value"] < 1e-3


def test_two_level_bootstrap_covers_the_truth_at_about_the_nominal_rate():
    """Simulated study: 3 seeds whose true rates scatter by sd 0.01 around 0.3 (about what trained seeds show),
    400 test images each; the interval should cover 0.3 in about 95% of studies."""
    covered = []
    for r in range(300):
        g = np.random.default_rng(10_000 + r)
        xs = [(g.random(N_IMAGES) < p).astype(float) for p in 0.3 + g.normal(0, 0.01, 3)]
        lo, hi = hierarchical.two_level_bootstrap(xs, 1000, r)["ci95"]
        covered.append(lo <= 0.3 <= hi)
    assert 0.90 <= np.mean(covered) <= 0.995


def test_resampled_means_match_the_index_bootstrap(monkeypatch):
    x = np.random.default_rng(0).choice([-1.0, 0.0, 1.0], 200)
    counted = hierarchical.resample_means(x, (20000,), np.random.default_rng(0))
    monkeypatch.setattr(hierarchical, "MAX_LEVELS", 0)
    indexed = hierarchical.resample_means(x, (20000,), np.random.default_rng(1))
    assert counted.mean() == pytest.approx(x.mean(), abs=0.003) and counted.std() == pytest.approx(indexed.std(), rel=0.03)


# --- the probes' per-image outcomes, and the real run_study wiring with planted checkpoints -----------------

K, SIZE = 4, 32
DATA = {"_target_": "masktrain.data.datamodule.MaskDataModule", "name": "shapes", "num_classes": K, "batch_size": 16,
        "eval_batch_size": 16, "num_workers": 0, "mean": [0.5, 0.5, 0.5],
        "dataset": {"_target_": "masktrain.data.shapes.shapes", "_partial_": True, "image_size": SIZE, "num_classes": K,
                    "seed": 0, "lengths": {"train": 16, "val": 16, "test": 40}}}
OUTCOME_PROBES = ["object_removal", "shape_only", "linear_probe", "missingness_curve"]
OPTIONS = {"linear_probe": {"n_permutations": 50, "folds": 2}, "shape_only": {"n_permutations": 200},
           "object_removal": {"n_permutations": 200}}


def test_every_outcome_vector_averages_to_its_headline(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_resnet", K)
    ds = ShapesDataset("test", length=40, image_size=SIZE, num_classes=K)
    report = evaluate(model, ds, OUTCOME_PROBES, ["black", "grey"], num_classes=K, mean=(0.5, 0.5, 0.5), n_boot=50,
                      options=OPTIONS)
    assert set(report["outcomes"]) == set(OUTCOME_PROBES)
    for probe, by_key in report["outcomes"].items():
        for key, values in by_key.items():
            assert values.shape == (40,)
            assert np.nanmean(values) == pytest.approx(report["probes"][probe][key]["value"], abs=1e-9), (probe, key)
    files = write_report(report, tmp_path / "r")
    saved = json.loads(files["report.json"].read_text())
    assert "outcomes" not in saved and len(saved["dataset"]["fingerprint"]) == 40
    loaded = load_outcomes(files["outcomes.npz"])
    assert np.array_equal(loaded["shape_only"]["grey"], report["outcomes"]["shape_only"]["grey"])


def test_run_study_with_planted_checkpoints(tmp_path, monkeypatch):
    """Identical weights in baseline and continued_training: zero difference, p = 1, "no evidence of a change"."""
    import masktrain.study as study_mod

    torch.manual_seed(0)
    same, other = create_model("test_resnet", K), create_model("test_resnet", K)
    models = {"baseline": same, "continued_training": same, "mask_aug": other}
    root = tmp_path / "sweep"
    for regime in models:
        for seed in (0, 1):
            ckpt = root / regime / f"seed{seed}" / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir(parents=True)
            ckpt.write_bytes(b"")
    monkeypatch.setattr(study_mod, "load_classifier", lambda path: (models[Path(path).parents[2].name], {"data": DATA}))
    study = study_mod.run_study(root, probes=["shape_only", "object_removal"], methods=["black"], n_images=40,
                                options=OPTIONS, log=lambda m: None)
    saved = json.loads((root / "study.json").read_text())
    assert saved["regimes"] == ["baseline", "continued_training", "mask_aug"]
    tie = saved["comparisons"]["continued_training"]["baseline"]["shape_only"]["black"]
    assert tie["difference"] == 0 and tie["p_value"] == 1 and tie["verdict"] == NO_CHANGE and tie["n_pairs"] == 80
    assert set(saved["comparisons"]["mask_aug"]) == {"baseline", "continued_training"}
    assert saved["table"]["mask_aug"]["object_removal"]["black"]["ci95"] is not None
    assert saved["comparison_tests"]["tests"] == 3 * 2 and study["timing"]["intervals_and_comparisons_s"] >= 0
    assert (root / "reports" / "mask_aug_seed1" / "outcomes.npz").is_file()
    assert "### shape_only" in (root / "study.md").read_text()


def test_continued_training_recipe_is_the_baseline_fine_tuned_without_masks(tmp_path):
    from omegaconf import OmegaConf

    from masktrain.cli import compose
    from masktrain.training import resolve_init

    cfg, aug, base = (compose("train", [f"recipe={r}"]) for r in ("continued_training", "mask_aug", "baseline"))
    assert cfg.name == "continued_training" and cfg.mask.kind is None and cfg.mask.p == 0.0
    assert OmegaConf.to_container(cfg.mask) == OmegaConf.to_container(base.mask)
    assert cfg.finetune.from_recipe == "baseline" == aug.finetune.from_recipe
    assert (cfg.finetune.max_epochs, cfg.finetune.lr) == (aug.finetune.max_epochs, aug.finetune.lr) == (3, 1e-3)
    ckpt = tmp_path / "baseline" / "seed2" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    (ckpt.parents[1] / "metrics.json").write_text("{}")
    tuned = compose("train", ["recipe=continued_training", "seed=2", f"finetune.from_sweep={tmp_path}"])
    assert resolve_init(tuned, tmp_path / "continued_training" / "seed2") == str(ckpt)


def _assert_outcomes_average_to_headlines(report):
    for probe, by_key in report["outcomes"].items():
        for key, values in by_key.items():
            value = report["probes"][probe][key]["value"]
            assert np.nanmean(values) == pytest.approx(value, abs=1e-9), (probe, key)


def test_backgrounds_and_attribution_outcomes_average_to_their_headlines():
    import test_attribution as ta
    import test_backgrounds_probe as tb

    report = tb._run(tb.BackgroundReader())
    assert any(k.startswith("bg_gap/") for k in report["outcomes"]["backgrounds"])
    _assert_outcomes_average_to_headlines(report)
    opts = {"attribution": {"methods": ["occlusion"], "n_images": 3, "patch": 8, "stride": 8, "fractions": [0.0, 0.5, 1.0],
                            "eval_method": "grey", "n_examples": 1}}
    report = evaluate(ta.planted(), ta._PlantedSet(5), ["attribution"], ["grey"], num_classes=2, mean=(0.5, 0.5, 0.5),
                      n_boot=20, options=opts, device="cpu")
    values = report["outcomes"]["attribution"]["occlusion/grey"]
    assert np.isfinite(values).sum() == 3  # only the explained images
    _assert_outcomes_average_to_headlines(report)


@pytest.mark.slow
def test_comparisons_go_to_wandb(study, tmp_path):
    """``evaluate.py study=... logger=wandb``: the comparisons are a W&B table beside the study table."""
    from masktrain.tracking import comparison_rows, log_study_wandb

    rows = comparison_rows(study)
    assert len(rows) == study["comparison_tests"]["tests"] and {r[9] for r in rows} >= {RAISED, LOWERED, NO_CHANGE}
    log_study_wandb(study, tmp_path)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run / "files" / "media" / "table" / "study").glob("comparisons_*.table.json")
    saved = json.loads(table.read_text())
    assert saved["columns"][:2] == ["regime", "reference"] and len(saved["data"]) == len(rows)
