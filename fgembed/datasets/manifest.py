"""A CSV manifest with columns path,label[,split]; relative paths are relative to the CSV.

A manifest is the user's own explicit list, so its paths may leave the CSV's folder (`..`,
absolute paths: e.g. one manifest over images on two disks). Nothing read goes unrecorded: the
store's dataset identity covers every row's file (size, mtime, sampled content), wherever it
lies, and `fgembed info` counts the rows outside the manifest's folder. The same image listed
twice (e.g. in train and in test) is refused: it would leak test images into training.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..errors import FgembedError
from .table import SPLIT_NAMES, SampleTable


def _normal(path: str) -> str:
    """One spelling per file, for the duplicate check (`a/./b.jpg` is `a/b.jpg`)."""
    return os.path.normpath(path.replace("\\", "/"))


def read_manifest(csv_path: Path) -> SampleTable:
    csv_path = Path(csv_path).expanduser()
    if csv_path.is_dir():
        csv_path = csv_path / "manifest.csv"
    if not csv_path.is_file():
        raise FgembedError(f"missing manifest file: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise FgembedError(f"manifest {csv_path} needs a header with columns path,label[,split]")
        rows, lines = [], []
        for r in reader:
            rows.append(r)
            lines.append(reader.line_num)
    if not rows:
        raise FgembedError(f"manifest {csv_path} has no rows")
    columns = len(reader.fieldnames)
    split, seen = [], {}
    for lineno, r in zip(lines, rows):
        if None in r.values() or None in r:  # DictReader's marks for a short row and for extra fields
            got = len([v for k, v in r.items() if k is not None and v is not None]) + len(r.get(None) or [])
            raise FgembedError(f"malformed row at line {lineno} of {csv_path}: {got} fields, the header has {columns}")
        value = (r.get("split") or "train").strip().lower()
        if value not in SPLIT_NAMES or not r["path"] or not r["label"]:
            raise FgembedError(f"malformed row at line {lineno} of {csv_path}: path={r['path']!r} "
                               f"label={r['label']!r} split={value!r}")
        key = _normal(r["path"])
        if key in seen:
            raise FgembedError(f"manifest {csv_path} lists {r['path']!r} twice (lines {seen[key]} and {lineno}); "
                               "each image may appear once")
        seen[key] = lineno
        split.append(SPLIT_NAMES[value])
    class_names = sorted({r["label"] for r in rows})
    index = {n: k for k, n in enumerate(class_names)}
    return SampleTable("manifest", str(csv_path.parent), np.arange(len(rows)), [r["path"] for r in rows],
                       [index[r["label"]] for r in rows], class_names, split)
