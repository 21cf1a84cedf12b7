"""Writers of tiny datasets in real on-disk formats, for tests."""
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (48, 40)  # (W, H)


def write_folder_dataset(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6) -> dict:
    """``images/<class>/<name>.png`` + ``masks/<class>/<name>.png`` (0/255). Class k's object is
    a rectangle whose width encodes k; returns {relative image path: (class name, mask array)}."""
    written = {}
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
            top, left = 5 + i, 4 + i
            mask[top:top + 20, left:left + 8 + 6 * k] = 255
            image = (rng.random((SIZE[1], SIZE[0], 3)) * 255).astype(np.uint8)
            image[mask > 0] = (200, 40 * k, 30)
            stem = f"{name}_{i:02d}"
            Image.fromarray(image).save(root / "images" / name / f"{stem}.png")
            Image.fromarray(mask).save(root / "masks" / name / f"{stem}.png")
            written[f"{name}/{stem}.png"] = (name, mask > 0)
    return written
