"""Dataset readers: each on-disk format → one SampleTable, then a seeded validation split.

`READERS` is both the list of formats and the dispatch (timm-style registry): adding a format
is one reader function and one entry.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable

from ..errors import FgembedError
from .cub import read_cub
from .folder import read_folder
from .hf import read_hf
from .inat21 import read_inat21
from .manifest import read_manifest
from .tarshards import is_url, read_webdataset
from .table import SPLIT_NAMES, TEST, TRAIN, VAL, Level, SampleTable, carve_validation

READERS: dict[str, Callable[..., SampleTable]] = {
    "cub": lambda root, train_file: read_cub(root),
    "inat21": read_inat21,
    "folder": lambda root, train_file: read_folder(root),
    "manifest": lambda root, train_file: read_manifest(root),
    "webdataset": lambda root, train_file: read_webdataset(root),
    "hf": lambda root, train_file: read_hf(root),
}
KINDS = tuple(READERS)  # for the CLI's help text
URL_KINDS = ("webdataset",)  # formats whose root may be any fsspec URL


def list_datasets(pattern: str = "*") -> list[str]:
    """Dataset formats whose name matches a shell-style `pattern`."""
    return [k for k in READERS if fnmatch.fnmatch(k, pattern)]


def load_dataset(kind: str, root: str | Path, *, val_fraction: float = 0.2, seed: int = 0,
                 train_file: str = "train_mini") -> SampleTable:
    """Read a dataset and carve its validation split (unless it ships one). `root` is a path, or a
    URL (`s3://…`, `file://…`) for the formats read through fsspec (webdataset)."""
    if kind not in READERS:
        raise FgembedError(f"unknown dataset kind {kind!r}; choose one of {', '.join(READERS)}")
    if is_url(root) and kind not in URL_KINDS:
        raise FgembedError(f"--dataset {kind} reads a local folder, not a URL ({root}); "
                           f"URLs work with {', '.join(URL_KINDS)}")
    return carve_validation(READERS[kind](root if is_url(root) else Path(root), train_file), val_fraction, seed)


__all__ = ["KINDS", "READERS", "Level", "SampleTable", "SPLIT_NAMES", "TEST", "TRAIN", "VAL", "carve_validation",
           "list_datasets", "load_dataset"]
