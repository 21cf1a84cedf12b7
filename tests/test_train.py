import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from masktrain.checkpoint import load_classifier
from masktrain.cli import compose
from masktrain.training import train

RECIPES = sorted(p.stem for p in (REPO / "recipes" / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    cfg = compose("train", [f"recipe={recipe}"])
    assert cfg.name == recipe
    assert cfg.model.name and cfg.data.num_classes >= 2 and cfg.mask.method


def test_recipes_select_their_masks():
    assert compose("train", ["recipe=baseline"]).mask.kind is None
    aug = compose("train", ["recipe=mask_aug"]).mask
    assert aug.kind == "rectangles" and aug.method == "grey" and 0 < aug.p <= 1
    assert compose("train", ["recipe=silhouette_aug"]).mask.kind == "silhouettes"
    assert compose("train", ["recipe=layer_mask_aug"]).mask.method == "layer"


def test_fast_end_to_end_train_writes_checkpoints_and_metrics(tmp_path):
    cfg = compose("train", ["recipe=mask_aug", "logger=csv", *TINY])
    metrics = train(cfg, tmp_path)
    assert metrics["global_step"] == 4
    assert 0 <= metrics["val/acc_clean"] <= 1 and "val/acc_masked" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 4
    assert (tmp_path / "config.yaml").is_file() and list((tmp_path / "samples").glob("*.png"))
    model, config = load_classifier(tmp_path / "checkpoints" / "last.ckpt")
    assert config["name"] == "mask_aug" and model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_seed_same_metrics(tmp_path):
    cfg = compose("train", ["recipe=mask_aug", "logger=none", *TINY])
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert a == b


def test_wandb_logger_is_offline_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose("train", ["recipe=mask_aug", "logger=wandb", *TINY])
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B should write one offline run inside the run directory"
    media = list(runs[0].rglob("*.png"))
    assert media, "the masked-sample grid should be logged as an image"
    from wandb_files import read_offline_run

    record = read_offline_run(runs[0])
    assert record["config"]["name"] == "mask_aug" and record["config"]["mask"]["method"] == "grey"
    assert "config" not in record["config"], "the config is logged once, flat, not also nested under 'config'"
    import wandb

    assert wandb.run is None, "the W&B run is finished when train() returns"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["recipe=nonexistent"], "nonexistent"),
        (["model.name=resnet_does_not_exist"], "resnet_does_not_exist"),
        (["recipe=mask_aug", "mask.p=1.5"], "mask.p=1.5"),
        (["recipe=mask_aug", "mask.area=[0.0,0.5]"], "mask.area"),
        (["recipe=mask_aug", "mask.method=sparkle"], "sparkle"),
        (["trainer.max_epochs=abc"], "max_epochs"),
        (["no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, fragment):
    result = run_cli("train.py", [*args, "logger=none"], tmp_path, timeout=120)
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_train_cli_runs_and_prints_metrics(tmp_path):
    result = run_cli("train.py", ["recipe=mask_aug", "logger=csv", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val/acc_clean" in result.stdout
    assert list((tmp_path / "outputs" / "mask_aug").glob("*/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_ddp_two_cpu_ranks(tmp_path):
    result = run_cli(
        "train.py",
        ["recipe=mask_aug", "trainer=ddp", "trainer.devices=2", "logger=csv", *TINY, "hydra.run.dir=run"],
        tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 64 samples, batch 16, two ranks: each rank runs 2 steps.
    assert metrics["global_step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_augmented_recipe_fine_tunes_from_baseline_of_same_seed(tmp_path):
    sweep = tmp_path / "sweep"
    base_cfg = compose("train", ["recipe=baseline", "logger=none", "seed=1", *TINY])
    train(base_cfg, sweep / "baseline" / "seed1")
    cfg = compose("train", ["recipe=mask_aug", "logger=none", "seed=1", *TINY, "finetune.max_epochs=2", "finetune.lr=0.0",
                            f"finetune.from_sweep={sweep}"])  # train.py sets it inside a sweep
    run_dir = sweep / "mask_aug" / "seed1"
    metrics = train(cfg, run_dir)
    assert metrics["global_step"] == 8  # finetune.max_epochs=2 replaced trainer.max_epochs=1
    _, saved = load_classifier(run_dir / "checkpoints" / "last.ckpt")
    assert saved["init_from"].endswith("baseline/seed1/checkpoints/last.ckpt")
    # lr 0: the fine-tuned weights are exactly the baseline's
    base, _ = load_classifier(sweep / "baseline" / "seed1" / "checkpoints" / "last.ckpt")
    tuned, _ = load_classifier(run_dir / "checkpoints" / "last.ckpt")
    tuned_params = dict(tuned.named_parameters())  # parameters only: BN running statistics still move at lr 0
    assert all(torch.equal(p, tuned_params[n]) for n, p in base.named_parameters())


def test_augmented_recipe_outside_a_sweep_trains_from_scratch(tmp_path):
    # A finished baseline where a sweep would keep it is not a reason to fine-tune: outside a sweep
    # (finetune.from_sweep unset) nothing is looked up.
    train(compose("train", ["recipe=baseline", "logger=none", *TINY]), tmp_path / "baseline" / "seed0")
    cfg = compose("train", ["recipe=mask_aug", "logger=none", *TINY])
    assert train(cfg, tmp_path / "mask_aug" / "seed0")["global_step"] == 4
    _, saved = load_classifier(tmp_path / "mask_aug" / "seed0" / "checkpoints" / "last.ckpt")
    assert saved["init_from"] is None


def test_resume_in_a_sweep_never_takes_another_seeds_checkpoint(tmp_path):
    sweep = tmp_path / "sweep"
    train(compose("train", ["recipe=baseline", "logger=none", "seed=0", *TINY]), sweep / "baseline" / "seed0")
    cfg = compose("train", ["recipe=baseline", "logger=none", "seed=1", "resume=true", *TINY])
    metrics = train(cfg, sweep / "baseline" / "seed1")
    fresh = train(compose("train", ["recipe=baseline", "logger=none", "seed=1", *TINY]), tmp_path / "fresh")
    assert metrics == fresh  # started fresh, not from seed 0's checkpoint


def test_last_ckpt_is_the_newest_epoch_even_when_validation_does_not_improve(tmp_path):
    # lr 0 and one validation image: validation accuracy cannot improve after epoch 0 (ties do
    # not improve), so best.ckpt stays there. Lightning 2.6.6's save_last=True left last.ckpt there too.
    cfg = compose("train", ["recipe=baseline", "logger=none", "optim.lr=0", "optim.warmup_fraction=0",
                            *[a for a in TINY if not a.startswith(("trainer.max_epochs=", "data.dataset.lengths.val="))],
                            "data.dataset.lengths.val=1", "trainer.max_epochs=2"])
    train(cfg, tmp_path)
    load = lambda name: torch.load(tmp_path / "checkpoints" / name, map_location="cpu", weights_only=False)
    assert load("best.ckpt")["global_step"] == 4, "the setup must leave best.ckpt at epoch 0 for this test to mean anything"
    assert load("last.ckpt")["global_step"] == 8 and load("last.ckpt")["epoch"] == 1
