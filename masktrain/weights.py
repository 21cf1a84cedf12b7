"""Load local weights files into a timm model, with errors that say what does not fit.

Accepted: ``.safetensors``; ``.pth``/``.pt``/``.bin`` holding a state dict, a dict with
``state_dict``/``model``/``state_dict_ema`` inside, or a masktrain Lightning checkpoint
(keys prefixed ``model.backbone.``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from masktrain.errors import UserError

_PREFIXES = ("model.backbone.", "backbone.", "module.", "model.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file, unwrapping the common containers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.checkpoint_path={str(path)!r} does not exist; give the path of a .pth, .pt or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read weights file {str(path)!r}: it is corrupt or not a PyTorch/safetensors file ({type(exc).__name__})") from exc
    for key in ("state_dict", "model", "state_dict_ema", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {str(path)!r} holds no state dict of tensors")
    return {_strip_prefix(k): v for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _head_keys(model: nn.Module) -> set[str]:
    """Parameter names of the classifier head (timm's ``get_classifier``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ``path`` into ``model`` in place.

    A head whose shape differs (another number of classes) is left at its fresh
    initialisation; any other missing, unexpected or mis-shaped key is an error
    that lists the keys.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = _head_keys(model)
    skipped_head = [k for k in head if k in state and state[k].shape != own[k].shape]
    for k in skipped_head:
        del state[k]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in skipped_head]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise UserError(
            f"weights in {str(path)!r} do not fit model {type(model).__name__} "
            f"({'; '.join(parts)}); check model.name matches the checkpoint's architecture"
        )
    model.load_state_dict(state, strict=False)
    return model
