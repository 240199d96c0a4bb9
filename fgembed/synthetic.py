"""A generated fine-grained image set, for the demo, tests and benchmarks (no downloads here).

Coarse groups differ by shape (like bird orders by body plan); fine classes within a group differ
subtly, by a small hue shift and the number of spots, so a coarse look is not enough — the
fine-grained problem in miniature. Images are real JPEGs on disk, read back through the same
dataset readers as real data.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
