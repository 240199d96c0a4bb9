"""Dataset readers: each on-disk format → one SampleTable, then a seeded validation split."""
from __future__ import annotations

from pathlib import Path

from ..errors import FgembedError
from .cub import read_cub
from .folder import read_folder
from .inat21 import read_inat21
from .manifest import read_manifest
from .table import SPLIT_NAMES, TEST, TRAIN, VAL, Level, SampleTable, carve_validation

KINDS = ("cub", "inat21", "folder", "manifest")


def load_dataset(kind: str, root: str | Path, *, val_fraction: float = 0.2, seed: int = 0,
                 train_file: str = "train_mini") -> SampleTable:
    """Read a dataset and carve its validation split (unless it ships one)."""
    root = Path(root)
    if kind == "cub":
        table = read_cub(root)
    elif kind == "inat21":
        table = read_inat21(root, train_file)
    elif kind == "folder":
        table = read_folder(root)
    elif kind == "manifest":
        table = read_manifest(root)
    else:
        raise FgembedError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    return carve_validation(table, val_fraction, seed)


__all__ = ["KINDS", "Level", "SampleTable", "SPLIT_NAMES", "TEST", "TRAIN", "VAL", "carve_validation",
           "load_dataset"]
