"""Read masktrain run checkpoints back into a pixel-space Classifier.

A run checkpoint is a Lightning checkpoint whose ``hyper_parameters["config"]`` holds
the run's resolved config (``model``, ``data``, ``mask`` …) and whose ``state_dict``
holds the classifier under ``model.``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from masktrain.errors import UserError
from masktrain.models import Classifier, create_model


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a run checkpoint dict (on CPU), with one clear error when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass checkpoint=<run dir>/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch checkpoint ({type(exc).__name__})") from exc
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise UserError(
            f"checkpoint {str(path)!r} is not a masktrain run checkpoint (no saved config); "
            f"for plain weights use model.name=<arch> model.checkpoint_path={str(path)!r}"
        )
    return ckpt


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the trained classifier of a run checkpoint.

    Returns ``(classifier in eval mode, the run's resolved config as a dict)``.
    """
    ckpt = read_checkpoint(path)
    config = ckpt["hyper_parameters"]["config"]
    model_cfg = config.get("model", {})
    model = create_model(model_cfg["name"], num_classes=int(config["data"]["num_classes"]),
                         channels_last=bool(model_cfg.get("channels_last", False)))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise UserError(f"checkpoint {str(path)!r} does not fit model {model_cfg['name']!r}: {str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from exc
    if missing or unexpected:
        raise UserError(
            f"checkpoint {str(path)!r} does not fit model {model_cfg['name']!r} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.to(map_location).eval(), config
