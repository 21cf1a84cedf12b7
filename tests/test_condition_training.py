"""Training on a foreground/background condition: mask=condition and the Mask-of-truth recipes."""
import pytest
import torch

from conftest import TINY
from masktrain.cli import compose
from masktrain.errors import UserError
from masktrain.training import build_masks, train

MOT = ["no_fg", "only_bg_b", "only_fg", "only_fg_b"]


@pytest.mark.parametrize("recipe", MOT)
def test_mask_of_truth_recipes_train_every_image_on_their_condition(recipe):
    cfg = compose("train", [f"recipe={recipe}"])
    assert cfg.name == recipe and cfg.mask.kind == "condition" and cfg.mask.condition == recipe and cfg.mask.p == 1.0
    assert not cfg.finetune.from_recipe  # one model per condition, trained like the baseline
    augment, val_mask = build_masks(cfg.mask)
    objects = torch.zeros(3, 1, 8, 8)
    objects[:, :, 2:5, 3:6] = 1
    objects[:, :, 2, 3] = 0
    keep = augment(3, (8, 8), torch.Generator().manual_seed(0), object_masks=objects)
    expected = {"no_fg": 1 - objects, "only_fg": objects}
    box = torch.zeros_like(objects)
    box[:, :, 2:5, 3:6] = 1
    expected.update(only_bg_b=1 - box, only_fg_b=box)
    assert torch.equal(keep, expected[recipe])
    assert torch.equal(val_mask(3, (8, 8), torch.Generator(), object_masks=objects), expected[recipe])


@pytest.mark.parametrize("recipe,method", [("no_fg", "grey"), ("only_fg", "layer")])
def test_training_on_a_condition_runs(tmp_path, recipe, method):
    cfg = compose("train", [f"recipe={recipe}", f"mask.method={method}", "logger=csv", *TINY])
    metrics = train(cfg, tmp_path)
    assert metrics["global_step"] == 4 and 0 <= metrics["val/acc_masked"] <= 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("condition,message", [("only_bg", "unknown"), ("mixed_rand", "changes pixels")])
def test_bad_condition_is_one_user_error_and_writes_nothing(tmp_path, condition, message):
    cfg = compose("train", ["recipe=no_fg", f"mask.condition={condition}", "logger=csv", *TINY])
    with pytest.raises(UserError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
