"""Local weights files into timm models (masktrain.weights) and the offline hub error."""
import logging

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from masktrain.errors import UserError
from masktrain.models import create_model
from masktrain.weights import fit_prefix, head_prefixes, load_weights, read_state_dict


@pytest.fixture(scope="module")
def source():
    """A resnet18 with 7 classes and non-default weights (so a load is visible)."""
    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _same_backbone(a, b, skip_head: bool = False) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not (skip_head and k.startswith("fc.")))


@pytest.mark.parametrize("fmt", ["pth", "pt", "safetensors", "container", "ddp", "classifier"])
def test_round_trip_formats(tmp_path, source, fmt):
    state = source.state_dict()
    path = tmp_path / f"w.{fmt if fmt in ('pt', 'safetensors') else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "container":  # timm train.py checkpoints
        torch.save({"state_dict": state, "state_dict_ema": {}, "epoch": 3, "arch": "resnet18"}, path)
    elif fmt == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "classifier":  # torch.save(masktrain Classifier.state_dict())
        torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    model = create_model("resnet18", 7, checkpoint_path=str(path))
    assert _same_backbone(model.backbone, source)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), source.eval()(model.normalize(x)))


def test_masktrain_lightning_checkpoint(tmp_path, source):
    """Our run checkpoints: state_dict keys ``model.backbone.<timm key>`` beside other modules,
    hyper-parameters holding a config object (not loadable with weights_only)."""
    state = {f"model.backbone.{k}": v for k, v in source.state_dict().items()}
    state["mask_head.weight"] = torch.zeros(3)  # another submodule of the LightningModule
    ckpt = {"state_dict": state, "epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.6.0",
            "hyper_parameters": {"config": OmegaConf.create({"model": {"name": "resnet18"}, "data": {"num_classes": 7}})},
            "optimizer_states": [], "lr_schedulers": []}
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    model = create_model("resnet18", 7, checkpoint_path=str(path))
    assert _same_backbone(model.backbone, source)


def test_other_num_classes_reinitialises_only_the_head(tmp_path, source, caplog):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    fresh = timm.create_model("resnet18", num_classes=3)
    fresh_fc = fresh.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        load_weights(fresh, path)
    assert _same_backbone(fresh, source, skip_head=True)
    assert fresh.fc.weight.shape == (3, 512) and torch.equal(fresh.fc.weight, fresh_fc)  # head as initialised
    assert any("classifier head fc re-initialised for 3 classes" in r.getMessage() for r in caplog.records)
    headless = timm.create_model("resnet18", num_classes=0)  # feature extractor: the checkpoint head is ignored
    load_weights(headless, path)
    assert _same_backbone(headless, source, skip_head=True)
    features_only = tmp_path / "features.pth"  # checkpoint without a head into a model with one
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, features_only)
    load_weights(timm.create_model("resnet18", num_classes=5), features_only)


def test_head_prefixes_of_other_architectures():
    assert head_prefixes(timm.create_model("resnet18", num_classes=2)) == ("fc",)
    assert head_prefixes(timm.create_model("convnext_atto", num_classes=2)) == ("head.fc",)


def test_fit_prefix_prefers_the_matching_wrapper():
    own = {"conv1.weight", "fc.weight"}
    t = torch.zeros(1)
    assert set(fit_prefix({"conv1.weight": t, "fc.weight": t}, own)) == own
    assert set(fit_prefix({"model.backbone.conv1.weight": t, "model.backbone.fc.weight": t, "other.x": t}, own)) == own
    assert set(fit_prefix({"_orig_mod.conv1.weight": t}, own)) == {"conv1.weight"}


def test_wrong_architecture_lists_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", num_classes=7).state_dict(), path)
    with pytest.raises(UserError, match=r"unexpected: layer1\.2\..*more.*model\.name") as info:
        create_model("resnet18", 7, checkpoint_path=str(path))
    assert "\n" not in str(info.value) and "resnet34.pth" in str(info.value)


def test_wrong_shape_and_missing_keys_are_listed(tmp_path, source):
    state = dict(source.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer4.1.bn2.weight"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing: layer4\.1\.bn2\.weight; wrong shape: conv1\.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        create_model("resnet18", 7, checkpoint_path=str(path))


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"),
    ("suffix", "unknown suffix"),
    ("corrupt_pth", "corrupt or not a PyTorch/safetensors file"),
    ("corrupt_safetensors", "corrupt or not a PyTorch/safetensors file"),
    ("no_tensors", "holds no state dict of tensors"),
])
def test_unreadable_files(tmp_path, case, fragment):
    path = tmp_path / {"suffix": "w.onnx", "corrupt_safetensors": "w.safetensors"}.get(case, "w.pth")
    if case == "suffix":
        path.write_bytes(b"onnx")
    elif case.startswith("corrupt"):
        path.write_bytes(b"\x00garbage" * 10)
    elif case == "no_tensors":
        torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(UserError, match=fragment) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_pretrained_without_network_says_use_checkpoint_path(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # Offline and with an empty cache, so the hub is never contacted and nothing is found.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="model.checkpoint_path=<local weights file>") as info:
        create_model("resnet18", 5, pretrained=True)
    assert "\n" not in str(info.value) and "'resnet18'" in str(info.value)
