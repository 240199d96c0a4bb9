"""A folder of images: root/<class>/* or root/{train,val,test}/<class>/* (split folders)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FgembedError
from ._parse import require_dir
from .table import SPLIT_NAMES, TRAIN, SampleTable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def _class_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(root: Path) -> SampleTable:
    root = require_dir(root)
    top = _class_dirs(root)
    split_layout = bool(top) and {p.name for p in top} <= set(SPLIT_NAMES) and "train" in {p.name for p in top}
    groups = [(SPLIT_NAMES[p.name], p) for p in top] if split_layout else [(TRAIN, root)]
    class_names = sorted({c.name for _, g in groups for c in _class_dirs(g)})
    if not class_names:
        raise FgembedError(f"no class folders under {root} (expected root/<class>/<image>)")
    index = {n: k for k, n in enumerate(class_names)}
    paths, labels, split = [], [], []
    for code, group in sorted(groups, key=lambda g: g[0]):
        for class_dir in _class_dirs(group):
            for image in _images(class_dir):
                paths.append(image.relative_to(root).as_posix())
                labels.append(index[class_dir.name])
                split.append(code)
    if not paths:
        raise FgembedError(f"no images under {root}")
    return SampleTable("folder", str(root), np.arange(len(paths)), paths, labels, class_names, split)
