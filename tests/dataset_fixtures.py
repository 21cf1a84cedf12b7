"""Writers of tiny datasets in the exact on-disk formats masktrain reads, for tests.

Each writer fills ``root`` and returns what it wrote, keyed the way the dataset names its
samples, so a test can check labels and masks: ``{key: (label, object mask bool (H, W))}``.
Images are ``SIZE`` = 48×40 (W×H); class k's object is a rectangle whose width grows with k,
so the mask shape carries the class (a probe can find it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (48, 40)  # (W, H)
H, W = SIZE[1], SIZE[0]

# A VOC-like palette: index i -> some colour, 255 -> the cream colour VOC uses for void.
_PALETTE = sum(([(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(256)), [])
_PALETTE[255 * 3: 256 * 3] = [224, 224, 192]


def _rect(top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


def _class_rect(k: int, i: int) -> np.ndarray:
    """Class k's object in sample i: width 8 + 6k, shifted by i."""
    return _rect(5 + i % 6, 3 + i % 5, 20, 8 + 6 * k)


def _image(rng: np.random.Generator, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    image = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    image[mask] = colour
    return Image.fromarray(image)


def _border(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel ring just outside ``mask`` (where VOC draws void)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def write_folder_dataset(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6) -> dict:
    """``images/<class>/<name>.png`` + ``masks/<class>/<name>.png`` (0/255).

    Returns ``{"<class>/<name>.png": (class name, mask bool (H, W))}``."""
    written = {}
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mask = _class_rect(k, i)
            stem = f"{name}_{i:02d}"
            _image(rng, mask, (200, 40 * k, 30)).save(root / "images" / name / f"{stem}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name / f"{stem}.png")
            written[f"{name}/{stem}.png"] = (name, mask)
    return written


PET_BREEDS = (("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1), ("beagle", 2))  # (name, species 1 cat 2 dog)


def write_oxford_pet(root: Path, per_class: int = 6, test_per_class: int = 2) -> dict:
    """Oxford-IIIT Pet layout: ``images/<Breed>_<n>.jpg``, ``annotations/trimaps/<Breed>_<n>.png``
    (1 foreground, 2 background, 3 a 1-pixel boundary ring), ``annotations/{list,trainval,test}.txt``.

    Returns ``{image name: (breed index, species index, object mask bool (H, W) = fg | boundary)}``
    and the names per list under keys ``"trainval"``/``"test"`` of ``written["lists"]``."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    written: dict = {"lists": {"trainval": [], "test": []}}
    lines = {"trainval": [], "test": []}
    for k, (breed, species) in enumerate(PET_BREEDS):
        for i in range(per_class + test_per_class):
            name = f"{breed}_{i + 1}"
            inner = _class_rect(k, i)
            ring = _border(inner)
            trimap = np.full((H, W), 2, dtype=np.uint8)
            trimap[inner] = 1
            trimap[ring] = 3
            _image(rng, inner, (210, 50 * k, 40)).save(root / "images" / f"{name}.jpg", quality=95)
            Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
            which = "trainval" if i < per_class else "test"
            lines[which].append(f"{name} {k + 1} {species} {k + 1}")
            written["lists"][which].append(name)
            written[name] = (k, species - 1, inner | ring)
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    for which, rows in lines.items():
        (root / "annotations" / f"{which}.txt").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "list.txt").write_text(header + "\n".join(lines["trainval"] + lines["test"]) + "\n")
    return written


VOC_USED = (12, 15, 8)  # VOC class values (1-based) used: dog, person, cat


def write_voc(root: Path, per_class: int = 5, val_per_class: int = 2, tiny: int = 1) -> dict:
    """VOC2012 layout: ``JPEGImages/<id>.jpg``, palette ``SegmentationClass/<id>.png`` and
    ``SegmentationObject/<id>.png`` with a 255 void ring around every instance, and
    ``ImageSets/Segmentation/{train,val}.txt``.

    Every image holds its class's big instance (id 2) and a small instance (id 1) of another
    class; ``tiny`` extra train images hold only a 2×2 object (below min_object_fraction=0.02).
    Returns ``{image id: (label 0-19, largest instance mask bool (H, W))}`` (tiny ones: None)."""
    rng = np.random.default_rng(2)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written, lists = {}, {"train": [], "val": []}

    def save(image_id: str, instances: list[tuple[np.ndarray, int]]) -> None:
        objects = np.zeros((H, W), dtype=np.uint8)
        classes = np.zeros((H, W), dtype=np.uint8)
        void = np.zeros((H, W), dtype=bool)
        for n, (mask, cls) in enumerate(instances, start=1):
            objects[mask], classes[mask] = n, cls
            void |= _border(mask)
        objects[void], classes[void] = 255, 255
        for name, array in (("SegmentationObject", objects), ("SegmentationClass", classes)):
            img = Image.fromarray(array, mode="P")
            img.putpalette(_PALETTE)
            img.save(root / name / f"{image_id}.png")
        _image(rng, instances[-1][0], (190, 90, 20)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)

    for k, cls in enumerate(VOC_USED):
        other = VOC_USED[(k + 1) % len(VOC_USED)]
        for i in range(per_class + val_per_class):
            image_id = f"2007_{k:02d}{i:04d}"
            big = _class_rect(k, i)
            small = _rect(30, 38, 6, 6)  # bottom-right corner, away from every big rectangle
            save(image_id, [(small, other), (big, cls)])
            lists["train" if i < per_class else "val"].append(image_id)
            written[image_id] = (cls - 1, big)
    for t in range(tiny):
        image_id = f"2008_tiny{t:02d}"
        save(image_id, [(_rect(10, 10, 2, 2), VOC_USED[0])])
        lists["train"].append(image_id)
        written[image_id] = None
    for split, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return written


COCO_CATEGORIES = ({"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 18, "name": "dog", "supercategory": "animal"})


def write_coco(root: Path, set_name: str = "val2017", per_class: int = 5, start_id: int = 1) -> dict:
    """COCO layout: ``annotations/instances_<set>.json`` and ``<set>/<12 digits>.jpg``.

    Each image: its class's big rectangle as compressed RLE, a smaller object of another class
    as a polygon, and a larger ``iscrowd`` region (uncompressed RLE) that must never win.
    Categories use COCO's sparse ids (1, 3, 18) -> contiguous labels 0, 1, 2.
    Returns ``{file name: (label, largest non-crowd instance mask bool (H, W))}``."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / set_name).mkdir(parents=True, exist_ok=True)
    images, annotations, written = [], [], {}
    ann_id = 100 * start_id
    for k, cat in enumerate(COCO_CATEGORIES):
        other = COCO_CATEGORIES[(k + 1) % len(COCO_CATEGORIES)]
        for i in range(per_class):
            image_id = start_id + k * per_class + i
            file_name = f"{image_id:012d}.jpg"
            big = _class_rect(k, i)
            _image(rng, big, (30, 160, 60 * k)).save(root / set_name / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": H, "width": W})
            rle = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0 = 36, 28  # small polygon in the bottom-right corner
            polygon = [x0, y0, x0 + 8, y0, x0 + 8, y0 + 8, x0, y0 + 8]
            counts = [0, H * W]  # uncompressed RLE of the whole image: larger than anything else
            for seg, cat_id, area, crowd_flag, box in (
                (rle, cat["id"], float(big.sum()), 0, [0, 0, 1, 1]),
                ([polygon], other["id"], 64.0, 0, [x0, y0, 8, 8]),
                ({"counts": counts, "size": [H, W]}, other["id"], float(H * W), 1, [0, 0, W, H]),
            ):
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat_id, "segmentation": seg,
                                    "area": area, "bbox": box, "iscrowd": crowd_flag})
            written[file_name] = (k, big)
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": list(COCO_CATEGORIES)}
    (root / "annotations" / f"instances_{set_name}.json").write_text(json.dumps(data))
    return written


# ImageNet-S-50's categories as released (data/categories/ImageNetS_categories_im50.txt of
# github.com/LUSSeg/ImageNet-S): sorted, so class id i (1-based) is the i-th wnid.
IMAGENET_S50 = tuple("""
n01443537 n01491361 n01531178 n01644373 n02104029 n02119022 n02123597 n02133161 n02165456 n02281406
n02325366 n02342885 n02396427 n02483362 n02504458 n02510455 n02690373 n02747177 n02783161 n02814533
n02859443 n02917067 n02992529 n03014705 n03047690 n03095699 n03197337 n03201208 n03445777 n03452741
n03584829 n03630383 n03775546 n03791053 n03874599 n03891251 n04026417 n04335435 n04380533 n04404412
n04447861 n04507155 n04522168 n04557648 n04562935 n04612504 n06794110 n07749582 n07831146 n12998815
""".split())
IMAGENET_S_IGNORE = 1000


def _imagenet_s_rgb(ids: np.ndarray) -> np.ndarray:
    """Class ids ``(H, W)`` -> the release's RGB encoding ``(H, W, 3)``: R = id % 256, G = id // 256, B = 0."""
    rgb = np.zeros(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    return rgb


def write_imagenet_s(root: Path, release: int = 50, categories: tuple[str, ...] = IMAGENET_S50,
                     used: tuple[int, ...] | None = None, per_class: int = 3) -> dict:
    """The ImageNet-S release layout under ``root/ImageNetS<release>``: ``validation/<wnid>/
    ILSVRC2012_val_<8 digits>.JPEG`` and ``validation-segmentation/<wnid>/<same stem>.png``, RGB
    masks with class id = R + 256 G (0 other, 1000 ignore).

    ``categories`` is the release's sorted wnid list; images are written for the class
    positions ``used`` (default: all). Each mask holds the image's own class (its 1-based
    position) as a rectangle whose width grows with the position, a 1-pixel ignore ring around
    it, and a small object of another class in the corner. Returns ``{"<wnid>/<file>":
    (0-based class position, own-class mask bool (H, W))}``."""
    rng = np.random.default_rng(4)
    base = root / f"ImageNetS{release}"
    used = tuple(range(len(categories))) if used is None else used
    written, serial = {}, 0
    for wnid in categories:  # the release creates a folder for every category
        (base / "validation" / wnid).mkdir(parents=True, exist_ok=True)
        (base / "validation-segmentation" / wnid).mkdir(parents=True, exist_ok=True)
    for rank, k in enumerate(used):
        wnid, own = categories[k], k + 1
        other = used[(rank + 1) % len(used)] + 1
        for i in range(per_class):
            serial += 1
            stem = f"ILSVRC2012_val_{serial * 37 % 50000:08d}"
            mask = _rect(5 + i % 6, 3 + i % 5, 20, 8 + 6 * (rank % 5))
            ids = np.zeros((H, W), dtype=np.int64)
            ids[30:36, 38:44] = other
            ids[_border(mask)] = IMAGENET_S_IGNORE
            ids[mask] = own
            _image(rng, mask, (180, 30 * (rank % 8), 70)).save(base / "validation" / wnid / f"{stem}.JPEG", quality=95)
            Image.fromarray(_imagenet_s_rgb(ids), mode="RGB").save(base / "validation-segmentation" / wnid / f"{stem}.png")
            written[f"{wnid}/{stem}.JPEG"] = (k, mask)
    return written
