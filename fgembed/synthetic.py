"""A generated fine-grained image set, for the demo, tests and benchmarks (no downloads here).

Coarse groups differ by shape (like bird orders by body plan); fine classes within a group differ
subtly, by a small hue shift and the number of spots, so a coarse look is not enough — the
fine-grained problem in miniature. Images are real JPEGs on disk, read back through the same
dataset readers as real data; `write_cub`, `write_inat21`, `write_manifest` and
`write_folder_layout` lay them out in each supported dataset's own on-disk format.
"""
from __future__ import annotations

import colorsys
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .datasets.taxonomy import cub_taxonomy

SHAPES = ("ellipse", "rectangle", "triangle", "diamond")


@dataclass
class SyntheticImage:
    path: str  # relative to the root
    class_name: str
    group: str
    train: bool


def _draw(rng: np.random.Generator, group: int, fine: int, n_fine: int, size: tuple[int, int]) -> Image.Image:
    w, h = size
    background = rng.integers(40, 200, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(background).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    hue = (group / len(SHAPES) + 0.08 * fine / max(n_fine, 1) + rng.normal(0, 0.01)) % 1.0
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.9))
    scale = rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    rx, ry = scale * w / 2, scale * h / 2
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    shape = SHAPES[group % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=colour)
    else:
        draw.polygon([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)], fill=colour)
    for _ in range(fine + 1):  # the subtle cue: how many dark spots
        sx, sy = cx + rng.uniform(-0.4, 0.4) * rx, cy + rng.uniform(-0.3, 0.5) * ry
        r = 0.12 * min(rx, ry)
        draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(20, 20, 20))
    return image


def generate(root: str | Path, groups: int = 3, classes_per_group: int = 4, per_class: int = 24,
             size: tuple[int, int] = (128, 96), test_fraction: float = 0.3, seed: int = 0,
             quality: int = 90) -> list[SyntheticImage]:
    """Write `groups × classes_per_group × per_class` JPEGs under root/images/<class>/ and
    return their records (the caller lays out whichever dataset format it wants around them)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = []
    for g in range(groups):
        for f in range(classes_per_group):
            class_name = f"{SHAPES[g % len(SHAPES)]}{g}_{f:02d}"
            folder = root / "images" / class_name
            folder.mkdir(parents=True, exist_ok=True)
            n_test = int(round(per_class * test_fraction))
            for i in range(per_class):
                rel = f"images/{class_name}/{class_name}_{i:04d}.jpg"
                _draw(rng, g, f, classes_per_group, size).save(root / rel, quality=quality)
                records.append(SyntheticImage(rel, class_name, f"group{g}", i >= n_test))
    return records


def write_folder_layout(source: str | Path, records: list[SyntheticImage], target: str | Path) -> Path:
    """target/{train,test}/<class>/<image>: the `folder` format with official splits (copies)."""
    target = Path(target)
    for r in records:
        dest = target / ("train" if r.train else "test") / r.class_name / Path(r.path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((Path(source) / r.path).read_bytes())
    return target


CUB_CLASS_IDS = (1, 2, 44, 92, 110, 200)  # real CUB ids (two albatrosses, quirky genus-level ones)


def write_cub(root: Path, records: list[SyntheticImage]) -> Path:
    """CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
    bounding_boxes.txt, images/<NNN.Name>/<file>.jpg. Synthetic classes map onto real CUB ids."""
    cub = root / "CUB_200_2011"
    names = sorted({r.class_name for r in records})
    if len(names) > len(CUB_CLASS_IDS):
        raise ValueError(f"write_cub maps at most {len(CUB_CLASS_IDS)} classes onto real CUB ids; got {len(names)}")
    class_id = {n: CUB_CLASS_IDS[k] for k, n in enumerate(names)}
    folder = {n: f"{class_id[n]:03d}.{n}" for n in names}
    lines = {k: [] for k in ("images", "labels", "split", "boxes")}
    for image_id, r in enumerate(records, 1):
        rel = f"{folder[r.class_name]}/{Path(r.path).name}"
        (cub / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cub / "images" / rel).write_bytes((root / r.path).read_bytes())
        lines["images"].append(f"{image_id} {rel}")
        lines["labels"].append(f"{image_id} {class_id[r.class_name]}")
        lines["split"].append(f"{image_id} {int(r.train)}")
        lines["boxes"].append(f"{image_id} 1.0 2.0 30.0 40.0")
    # classes.txt lists all 200 in the real file; we list ours in id order
    (cub / "classes.txt").write_text("".join(f"{class_id[n]} {folder[n]}\n" for n in sorted(names, key=class_id.get)))
    for key, fname in (("images", "images.txt"), ("labels", "image_class_labels.txt"),
                       ("split", "train_test_split.txt"), ("boxes", "bounding_boxes.txt")):
        (cub / fname).write_text("\n".join(lines[key]) + "\n")
    return cub


def write_inat21(root: Path, records: list[SyntheticImage], train_name: str = "train_mini") -> Path:
    """train_mini.json / val.json in iNat 2021's COCO style, images at each file_name."""
    inat = root / "inat21"
    names = sorted({r.class_name for r in records})
    if len(names) > len(CUB_CLASS_IDS):
        raise ValueError(f"write_inat21 borrows the taxonomy of {len(CUB_CLASS_IDS)} real CUB classes; got {len(names)}")
    tax = cub_taxonomy()
    categories = []
    for k, n in enumerate(names):
        t = tax[CUB_CLASS_IDS[k]]
        categories.append({"id": 100 + k, "name": n, "common_name": n, "supercategory": "Birds",
                           "kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": t["order"],
                           "family": t["family"], "genus": t["scientific_name"].split()[0],
                           "specific_epithet": "x", "image_dir_name": f"{k:05d}_{n}"})
    cat_of = {c["name"]: c for c in categories}
    for split, name in ((True, train_name), (False, "val")):
        images, annotations = [], []
        for image_id, r in enumerate(records, 1):
            if r.train != split:
                continue
            c = cat_of[r.class_name]
            rel = f"{name}/{c['image_dir_name']}/{Path(r.path).name}"
            (inat / rel).parent.mkdir(parents=True, exist_ok=True)
            (inat / rel).write_bytes((root / r.path).read_bytes())
            images.append({"id": image_id, "width": 128, "height": 96, "file_name": rel, "license": 0})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": c["id"]})
        doc = {"info": {}, "images": images, "annotations": annotations, "categories": categories, "licenses": []}
        (inat / f"{name}.json").write_text(json.dumps(doc))
    return inat


def write_manifest(root: Path, records: list[SyntheticImage]) -> Path:
    """manifest.csv (path, label, split) beside the images: the CSV manifest dataset format."""
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for r in records:
            w.writerow([r.path, r.class_name, "train" if r.train else "test"])
    return path
