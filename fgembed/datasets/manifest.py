"""A CSV manifest with columns path,label[,split]; relative paths are relative to the CSV."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import FgembedError
from .table import SPLIT_NAMES, SampleTable


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
        rows = list(reader)
    if not rows:
        raise FgembedError(f"manifest {csv_path} has no rows")
    class_names = sorted({r["label"] for r in rows})
    index = {n: k for k, n in enumerate(class_names)}
    split = []
    for lineno, r in enumerate(rows, 2):
        value = (r.get("split") or "train").strip().lower()
        if value not in SPLIT_NAMES or not r["path"]:
            raise FgembedError(f"malformed row at line {lineno} of {csv_path}: path={r['path']!r} split={value!r}")
        split.append(SPLIT_NAMES[value])
    return SampleTable("manifest", str(csv_path.parent), np.arange(len(rows)), [r["path"] for r in rows],
                       [index[r["label"]] for r in rows], class_names, split)
