"""Reading images and object masks from disk, with one clear error naming the bad file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from masktrain.errors import UserError


def open_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image as float ``(3, H, W)`` in [0, 1]."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise UserError(f"image {str(path)!r} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {str(path)!r}: the file is corrupt or not an image") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def read_object_mask(path: str | os.PathLike, size: tuple[int, int], strict_binary: bool = False) -> torch.Tensor:
    """An object mask as float ``(1, H, W)`` in {0, 1} (any nonzero pixel = object).

    ``size`` is the image's ``(H, W)``; a mask of another size is an error. With
    ``strict_binary`` only the values {0, 1} or {0, 255} are accepted.
    """
    try:
        with Image.open(path) as img:
            array = np.asarray(img if img.mode in ("L", "P", "1", "I", "I;16") else img.convert("L"))
    except FileNotFoundError as exc:
        raise UserError(f"mask {str(path)!r} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read mask {str(path)!r}: the file is corrupt or not an image") from exc
    if array.ndim != 2:
        raise UserError(f"mask {str(path)!r} has shape {array.shape}; expected a single-channel image")
    if tuple(array.shape) != tuple(size):
        raise UserError(f"mask {str(path)!r} is {array.shape[1]}×{array.shape[0]} but its image is {size[1]}×{size[0]}")
    if strict_binary:
        values = set(np.unique(array).tolist())
        if not (values <= {0, 1} or values <= {0, 255}):
            raise UserError(f"mask {str(path)!r} is not binary (values {sorted(values)[:6]}); expected 0/1 or 0/255")
    return torch.from_numpy((array > 0).astype(np.float32))[None]


def require_dir(path: str | os.PathLike | None, what: str) -> Path:
    """``path`` as a Path; a UserError when it is unset or not a directory."""
    if path in (None, "", "???"):
        raise UserError(f"data.root is required for {what}: pass data.root=<directory>")
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data.root={str(path)!r} does not exist or is not a directory ({what})")
    return path
