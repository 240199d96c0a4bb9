"""iNaturalist 2021: COCO-style train_mini.json or train.json plus val.json (the test split).

Categories carry the taxonomy (kingdom … genus, supercategory); each becomes a level.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FgembedError
from ._parse import read_json, relative_inside, require_dir
from .table import TEST, TRAIN, Level, SampleTable

LEVELS = ("supercategory", "kingdom", "phylum", "class", "order", "family", "genus")
TRAIN_FILES = ("train_mini", "train")


def _records(path: Path) -> tuple[list[dict], dict[int, int], list[dict]]:
    doc = read_json(path)
    try:
        images, annotations, categories = doc["images"], doc["annotations"], doc["categories"]
        category_of = {a["image_id"]: a["category_id"] for a in annotations}
    except (KeyError, TypeError) as exc:
        raise FgembedError(f"malformed iNat JSON {path}: missing {exc}") from None
    return images, category_of, categories


def read_inat21(root: Path, train_file: str = "train_mini") -> SampleTable:
    root = require_dir(root)
    if train_file not in TRAIN_FILES:
        raise FgembedError(f"--train-file must be one of {', '.join(TRAIN_FILES)}, got {train_file!r}")
    rows: list[tuple[int, str, int, int]] = []
    categories: dict[int, dict] = {}
    for name, split in ((train_file, TRAIN), ("val", TEST)):
        path = root / f"{name}.json"
        images, category_of, cats = _records(path)
        categories.update({c["id"]: c for c in cats})
        for im in images:
            if im.get("id") not in category_of or "file_name" not in im:
                raise FgembedError(f"image {im.get('id')!r} in {path} lacks a file_name or annotation")
            file_name = relative_inside(str(im["file_name"]), path, f"image {im['id']}")
            rows.append((int(im["id"]), file_name, category_of[im["id"]], split))
    cat_ids = sorted(categories)
    index = {c: k for k, c in enumerate(cat_ids)}
    unknown = {r[2] for r in rows} - set(index)
    if unknown:
        raise FgembedError(f"annotations name category {sorted(unknown)[0]} absent from the categories")
    labels = np.array([index[r[2]] for r in rows])
    levels = {}
    for level in LEVELS:
        if all(level in categories[c] for c in cat_ids):
            names = sorted({str(categories[c][level]) for c in cat_ids})
            code = {n: k for k, n in enumerate(names)}
            per_class = np.array([code[str(categories[c][level])] for c in cat_ids])
            levels[level] = Level(per_class[labels].astype(np.int32), names)
    return SampleTable("inat21", str(root), [r[0] for r in rows], [r[1] for r in rows], labels,
                       [str(categories[c]["name"]) for c in cat_ids], [r[3] for r in rows], levels)
