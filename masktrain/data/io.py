"""Reading images and masks from disk, with one clear error naming the bad file.

Every dataset loads through these helpers, so a corrupt image, a mask of the wrong size or
a mask with unexpected values gives the same kind of one-line :class:`UserError` whatever
the format. Nothing here writes to disk.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from masktrain.errors import UserError

# Everything PIL raises for a file it cannot decode (truncated JPEG -> OSError, bad PNG
# chunk -> SyntaxError/ValueError, zero-byte file -> UnidentifiedImageError).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image (grey, CMYK and palette files converted) as float ``(3, H, W)`` in [0, 1]."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise UserError(f"image {str(path)!r} does not exist") from exc
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read image {str(path)!r}: the file is corrupt or not an image ({exc})") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image from its header alone (no decoding: cheap enough for a listing pass)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError as exc:
        raise UserError(f"image {str(path)!r} does not exist") from exc
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read image {str(path)!r}: the file is corrupt or not an image ({exc})") from exc
    return int(height), int(width)


def read_label_map(path: str | os.PathLike, what: str = "mask", allow_rgb: bool = False) -> np.ndarray:
    """A mask PNG as an integer array ``(H, W)``: raw values, palette indices for palette
    ("P") images such as VOC's, never colours.

    With ``allow_rgb`` an RGB(A) mask is accepted too: grey-looking (R = G = B) files give
    that channel; others give ``R + 256 G + 65536 B`` (ImageNet-S stores its class id as
    ``R + 256 G``). Alpha is ignored.
    """
    try:
        with Image.open(path) as img:
            if allow_rgb and img.mode in ("RGB", "RGBA", "LA"):
                rgb = np.asarray(img.convert("RGB")).astype(np.int64)
                same = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
                return rgb[..., 0] if same else rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            if img.mode not in ("L", "P", "1", "I", "I;16"):
                raise UserError(f"{what} {str(path)!r} is a {img.mode} image; expected a single-channel or palette PNG")
            array = np.asarray(img)
    except FileNotFoundError as exc:
        raise UserError(f"{what} {str(path)!r} does not exist") from exc
    except UserError:
        raise
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot read {what} {str(path)!r}: the file is corrupt or not an image ({exc})") from exc
    return array.astype(np.int64)


def check_mask_size(array: np.ndarray, size: tuple[int, int], path: str | os.PathLike, what: str = "mask") -> None:
    """UserError unless the mask ``(H, W)`` equals its image's ``size`` = ``(H, W)``."""
    if tuple(array.shape[:2]) != tuple(size):
        raise UserError(f"{what} {str(path)!r} is {array.shape[1]}×{array.shape[0]} (W×H) but its image is {size[1]}×{size[0]}; "
                        f"masks must have their image's size")


def check_values(array: np.ndarray, allowed: Iterable[int], path: str | os.PathLike, what: str = "mask") -> None:
    """UserError naming the file when ``array`` holds a value outside ``allowed``."""
    allowed = set(int(a) for a in allowed)
    bad = sorted(set(np.unique(array).tolist()) - allowed)
    if bad:
        raise UserError(f"{what} {str(path)!r} has values {bad[:6]} outside {sorted(allowed)}; fix or remove the file")


def read_object_mask(path: str | os.PathLike, size: tuple[int, int], strict_binary: bool = False) -> torch.Tensor:
    """A binary object mask file as float ``(1, H, W)`` in {0, 1}: any nonzero pixel = object
    (grey, palette or RGB files; see :func:`read_label_map`).

    ``size`` is the image's ``(H, W)``; a mask of another size is an error. With
    ``strict_binary`` the file must hold only {0, 1} or only {0, 255}.
    """
    array = read_label_map(path, allow_rgb=True)
    check_mask_size(array, size, path)
    if strict_binary:
        values = set(np.unique(array).tolist())
        if not (values <= {0, 1} or values <= {0, 255}):
            raise UserError(f"mask {str(path)!r} is not binary (values {sorted(values)[:6]}); expected only 0/1 or only 0/255")
    return torch.from_numpy(array > 0).float()[None]


def require_dir(path: str | os.PathLike | None, what: str) -> Path:
    """``path`` as a Path; a UserError when it is unset or not a directory. ``what`` names the
    config, e.g. ``data=voc``."""
    if path is None or str(path) in ("", "???", "None"):
        raise UserError(f"data.root is required for {what}: pass data.root=<dataset directory>")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"data.root={str(path)!r} does not exist or is not a directory ({what})")
    return path


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` when it is a file; otherwise a UserError naming it (and ``hint``, a fix)."""
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist{'; ' + hint if hint else ''}")
    return path


def read_lines(path: Path) -> list[str]:
    """Non-empty, non-comment (``#``) lines of a text list, stripped."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise UserError(f"list file {str(path)!r} is not a text file") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (sha1): splits and orders that never change
    when other files are added, on any machine or Python version."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / float(1 << 48)
