"""Training on a foreground/background condition: mask=condition, every condition, and the recipes."""
import pytest
import torch

from conftest import TINY
from masktrain.cli import compose
from masktrain.conditions import CONDITIONS, ConditionSampler, apply_condition, object_box
from masktrain.errors import UserError
from masktrain.lit_module import TRAIN_STREAM, MaskTrainModule
from masktrain.methods import get_method
from masktrain.models import create_model
from masktrain.rng import step_generator
from masktrain.training import build_masks, train

MOT = ["no_fg", "only_bg_b", "only_fg", "only_fg_b"]
IN9_TRAIN = ["only_bg_t", "mixed_rand", "mixed_same", "mixed_next"]
K, S = 3, 16


def objects_batch(n=3, size=8):
    objects = torch.zeros(n, 1, size, size)
    objects[:, :, 2:5, 3:6] = 1
    objects[:, :, 2, 3] = 0
    return objects


@pytest.mark.parametrize("recipe", MOT)
def test_mask_of_truth_recipes_train_every_image_on_their_condition(recipe):
    cfg = compose("train", [f"recipe={recipe}"])
    assert cfg.name == recipe and cfg.mask.kind == "condition" and cfg.mask.condition == recipe and cfg.mask.p == 1.0
    assert not cfg.finetune.from_recipe  # one model per condition, trained like the baseline
    augment, val_mask = build_masks(cfg.mask)
    objects = objects_batch()
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    method = get_method("grey")
    got = augment.inputs(images, labels, objects, torch.Generator().manual_seed(0), method, K)
    expected = {"no_fg": 1 - objects, "only_fg": objects}
    box = torch.zeros_like(objects)
    box[:, :, 2:5, 3:6] = 1
    expected.update(only_bg_b=1 - box, only_fg_b=box)
    assert torch.equal(got.keep, expected[recipe]) and torch.equal(got.images, images)
    assert torch.equal(val_mask.inputs(images, labels, objects, torch.Generator(), method, K).keep, expected[recipe])


@pytest.mark.parametrize("recipe", IN9_TRAIN)
def test_in9_recipes_compose_to_their_condition(recipe):
    cfg = compose("train", [f"recipe={recipe}"])
    assert cfg.name == recipe and cfg.mask.kind == "condition" and cfg.mask.condition == recipe and cfg.mask.p == 1.0
    assert cfg.mask.method == ("tile" if recipe.startswith("mixed") else "grey")
    augment, _ = build_masks(cfg.mask)
    assert isinstance(augment, ConditionSampler) and augment.condition == recipe


def record_logits(method):
    """Make ``method`` (in place) record the (images, keep) each logits call gets, then run as before;
    returns the list of records (the method stays itself, so isinstance checks see its class)."""
    seen, real = [], method.logits

    def logits(model, images, keep, generator=None, inplace=False):
        seen.append((images.clone(), keep.clone()))
        return real(model, images, keep, generator, inplace)

    method.logits = logits
    return seen


def _step_batch(seed=0):
    """Eight 16x16 images, labels 0,0,0,1,1,2,2,2 ... with one class-1 pair, and boxy objects in varied places."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(8, 3, S, S, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    objects = torch.zeros(8, 1, S, S)
    for i in range(8):
        r, c = 1 + i % 5, 2 + (3 * i) % 7
        objects[i, 0, r:r + 5, c:c + 4] = 1
        objects[i, 0, r, c] = 0
    return images, labels, objects


@pytest.mark.parametrize("method_name", ["grey", "tile", "layer"])
@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_training_step_input_is_apply_condition_on_the_same_batch_and_partners(condition, method_name):
    """The model's input in the training step is, pixel for pixel, apply_condition's on that batch with the
    partners drawn from the step's (seed, rank, step) generator, and the keep mask is the condition's."""
    torch.manual_seed(0)
    model = create_model("test_resnet", K)
    sampler = ConditionSampler(p=1.0, condition=condition)
    module = MaskTrainModule(model, sampler, sampler, method=method_name, mean=(0.5, 0.5, 0.5), seed=7)
    seen = record_logits(module.method)
    images, labels, objects = _step_batch()
    module.training_step((images.clone(), labels, objects), batch_idx=1)
    (seen_images, seen_keep), = seen

    g = step_generator(7, 0, 0, "cpu", TRAIN_STREAM)  # rank 0, global step 0 outside a trainer
    uniform = torch.rand(8, generator=g, dtype=torch.float64) if CONDITIONS.get(condition).partner else None
    c = apply_condition(condition, images, labels, objects, get_method(method_name, (0.5, 0.5, 0.5)),
                        num_classes=K, generator=g, uniform=uniform)
    assert torch.equal(seen_images, c.images) and torch.equal(seen_keep, c.keep)
    if CONDITIONS.get(condition).partner:
        partner = c.partner
        assert bool((partner != torch.arange(8)).all())  # never the image itself
        rule = {"mixed_same": labels[partner] == labels, "mixed_next": labels[partner] == (labels + 1) % K,
                "mixed_rand": torch.ones(8, dtype=torch.bool)}[condition]
        assert bool((rule | c.fallback).all())
        if condition == "mixed_rand":
            assert not c.fallback.any()
        # object pixels are the sample's own, wherever the method leaves them visible
        obj = objects.expand_as(images) > 0.5
        assert torch.equal(seen_images[obj], images[obj])
        if method_name == "layer":
            box_p = object_box(objects[partner])
            assert torch.equal(seen_keep, torch.maximum(objects, 1 - box_p))
            assert torch.equal(seen_images[~obj], images[partner][~obj])  # raw partner pixels, its box masked


def test_mixed_partners_depend_on_seed_and_step_and_fall_back_when_alone():
    images, labels, objects = _step_batch()
    sampler = ConditionSampler(condition="mixed_same")
    method = get_method("grey")

    def draw(seed, step):
        return sampler.inputs(images, labels, objects, step_generator(seed, 0, step, "cpu", TRAIN_STREAM), method, K)

    a, b = draw(0, 0), draw(0, 0)
    assert torch.equal(a.partner, b.partner) and torch.equal(a.images, b.images)
    # classes 0 and 2 have three members: over a few steps their partners vary; class 1 (a pair) always swaps
    partners = torch.stack([draw(s, t).partner for s in range(3) for t in range(4)])
    assert bool((partners[:, 3] == 4).all() and (partners[:, 4] == 3).all())
    assert len(set(partners[:, 0].tolist())) == 2
    lone = torch.tensor([0, 0, 1, 2, 2, 2, 2, 2])  # class 1 alone in the batch
    c = sampler.inputs(images, lone, objects, step_generator(0, 0, 0, "cpu", TRAIN_STREAM), method, K)
    assert c.fallback.tolist() == [False, False, True, False, False, False, False, False]
    assert int(c.partner[2]) != 2  # a random other image, counted in fallback


def test_p_below_one_conditions_that_share_and_leaves_the_rest_untouched():
    images, labels, objects = _step_batch()
    images = images.repeat(8, 1, 1, 1)
    labels, objects = labels.repeat(8), objects.repeat(8, 1, 1, 1)
    c = ConditionSampler(p=0.5, condition="mixed_rand").inputs(
        images, labels, objects, step_generator(0, 0, 0, "cpu", TRAIN_STREAM), get_method("layer"), K)
    untouched = (c.partner == -1)
    assert 16 < int(untouched.sum()) < 48
    assert torch.equal(c.images[untouched], images[untouched]) and bool((c.keep[untouched] == 1).all())
    assert not bool((c.keep[~untouched] == 1).all())


@pytest.mark.parametrize("recipe,method", [("no_fg", "grey"), ("only_fg", "layer"), ("only_bg_t", "grey")])
def test_training_on_a_condition_runs(tmp_path, recipe, method):
    cfg = compose("train", [f"recipe={recipe}", f"mask.method={method}", "logger=csv", *TINY])
    metrics = train(cfg, tmp_path)
    assert metrics["global_step"] == 4 and 0 <= metrics["val/acc_masked"] <= 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_mixed_rand_under_layer_trains_and_repeats_per_seed(tmp_path):
    args = ["recipe=mixed_rand", "mask.method=layer", "logger=csv", *TINY, "data.dataset.image_size=32",
            "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1"]
    a = train(compose("train", args), tmp_path / "a")
    b = train(compose("train", args), tmp_path / "b")
    c = train(compose("train", args + ["seed=1"]), tmp_path / "c")
    assert a["global_step"] == 3 and 0 <= a["val/acc_masked"] <= 1
    assert a == b  # deterministic per seed: partners, masks and weights
    assert a != c
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("condition,message", [("only_bg", "mask.condition='only_bg': condition 'only_bg' is unknown"),
                                               ("mixed_rand", None)])
def test_bad_condition_is_one_user_error_and_writes_nothing(tmp_path, condition, message):
    cfg = compose("train", ["recipe=no_fg", f"mask.condition={condition}", "logger=csv", *TINY])
    if message is None:  # every condition trains now
        build_masks(cfg.mask)
        return
    with pytest.raises(UserError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_condition_parameter_is_one_user_error():
    cfg = compose("train", ["recipe=mixed_rand", "+mask.area=0.3"])
    with pytest.raises(UserError, match=r"mask.kind=condition takes mask.condition and mask.p only; remove \['area'\]"):
        build_masks(cfg.mask)


@pytest.mark.parametrize("recipe", ["mixed_rand", "only_bg_t"])
def test_pixel_changing_condition_without_object_masks_is_one_error_naming_the_key(tmp_path, recipe):
    from test_in9 import write_in9

    root = write_in9(tmp_path / "bg", split="train", masks=False, variants=("original",))
    write_in9(root, split="val", variants=("original",))
    overrides = [f"recipe={recipe}", "data=in9", f"data.root={root}", "data.dataset.image_size=16", "data.num_workers=0",
                 "logger=csv", "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    with pytest.raises(UserError, match=rf"^mask.kind=condition \(mask.condition={recipe}\) needs object masks, "
                                        r"but the in9 train set has none"):
        train(compose("train", overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()
