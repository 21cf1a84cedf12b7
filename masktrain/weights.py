"""Load local weights files into a timm model, with errors that say what does not fit.

Accepted files: ``.safetensors``; ``.pth``/``.pt``/``.bin``/``.ckpt`` holding a state dict, a
dict with ``state_dict``/``model``/``state_dict_ema``/``model_state`` inside (timm, torchvision
and most training scripts), or a masktrain Lightning checkpoint (keys ``model.backbone.<timm key>``).

The classifier head is the one part allowed not to fit: when the checkpoint was trained for
another number of classes (or has no head), the model's head keeps its fresh
initialisation, exactly as ``timm.create_model(pretrained=True, num_classes=K)`` does.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from masktrain.errors import UserError

log = logging.getLogger(__name__)

SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Wrappers around a timm state dict, most specific first: our Lightning module (model = Classifier,
# Classifier.backbone = timm model), a bare Classifier, DDP/DataParallel, torch.compile.
PREFIXES = ("model.backbone.", "backbone.", "module.", "model.", "_orig_mod.")
CONTAINERS = ("state_dict", "model", "state_dict_ema", "model_state", "model_state_dict")


def _read_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints also pickle their hyper-parameters (configs, enums); the user
        # chose this file to load, so read it in full.
        return torch.load(str(path), map_location="cpu", weights_only=False)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as a flat ``{key: tensor}``, containers unwrapped, key
    prefixes kept (see :func:`fit_prefix`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.checkpoint_path={str(path)!r} does not exist; give the path of a .pth, .pt or .safetensors file")
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"model.checkpoint_path={str(path)!r} has an unknown suffix; expected one of {', '.join(SUFFIXES)}")
    try:
        state = _read_file(path)
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        raise UserError(f"cannot read weights file {str(path)!r}: it is corrupt or not a PyTorch/safetensors file "
                        f"({type(exc).__name__})") from exc
    if isinstance(state, nn.Module):  # torch.save(model) instead of torch.save(model.state_dict())
        state = state.state_dict()
    for key in CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise UserError(f"weights file {str(path)!r} holds no state dict of tensors")
    return tensors


def fit_prefix(state: dict[str, torch.Tensor], own_keys: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with the wrapper prefix that best matches ``own_keys`` removed.

    Keys outside the chosen prefix are dropped (a Lightning checkpoint also holds other
    modules); no prefix is removed when the keys already match.
    """
    best, best_hits = "", sum(k in own_keys for k in state)
    for prefix in PREFIXES:
        hits = sum(k.startswith(prefix) and k[len(prefix):] in own_keys for k in state)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return dict(state)
    dropped = [k for k in state if not k.startswith(best)]
    if dropped:
        log.info("weights: ignored %d key(s) outside %r (e.g. %s)", len(dropped), best, dropped[0])
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head (``fc``, ``head.fc`` …), from timm's pretrained_cfg
    or, failing that, from ``get_classifier()``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        return tuple(names) if isinstance(names, (list, tuple)) else (str(names),)
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        return tuple(name for name, module in model.named_modules() if module is head and name)
    return ()


def _is_head(key: str, heads: tuple[str, ...]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
    return ", ".join(keys[:5]) + more


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights file ``path`` into the timm ``model`` in place and return it.

    The head is re-initialised (left as built) when the checkpoint's head has another shape or
    is absent; any other missing, unexpected or mis-shaped key is a UserError listing them.
    """
    own = model.state_dict()
    state = fit_prefix(read_state_dict(path), set(own))
    heads = head_prefixes(model)
    head_reset = sorted({k for k in own if _is_head(k, heads) and (k not in state or state[k].shape != own[k].shape)})
    head_extra = [k for k in state if _is_head(k, heads) and k not in own]  # checkpoint head, model built headless
    for k in head_reset + head_extra:
        state.pop(k, None)
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    # Old BatchNorm checkpoints have no num_batches_tracked; torch fills it in.
    missing = [k for k in own if k not in state and k not in head_reset and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = [f"{label}: {_listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
        raise UserError(f"weights in {str(path)!r} do not fit model {type(model).__name__} ({'; '.join(parts)}); "
                        f"check that model.name matches the checkpoint's architecture")
    model.load_state_dict(state, strict=False)
    if head_reset or head_extra:
        log.warning("weights %s: classifier head %s re-initialised for %s classes (the checkpoint's head does not fit)",
                    str(path), "/".join(heads), getattr(model, "num_classes", "?"))
    return model
