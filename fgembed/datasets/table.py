"""The SampleTable: what every dataset reader returns and what the feature store's `samples/` holds.

Readers differ only in how they parse their on-disk format; everything downstream (extraction,
splits, taxonomy-aware heads) sees this one shape, in the dataset's own fixed row order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import FgembedError
from .sources import ImageSource, LocalFiles

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "val": VAL, "test": TEST}


@dataclass
class Level:
    """One taxonomy level (e.g. `order`): a code per row and the names behind the codes."""

    codes: np.ndarray  # int32 [N]
    names: list[str]


@dataclass
class SampleTable:
    """One row per image, in the dataset's own order; paths are relative to `root`.

    `source` reads each row's image bytes (`sources.ImageSource`); by default the files
    `root / path`. A reader of another format (tar shards, a Hugging Face dataset) gives its own,
    and `paths` are then the records' names within it."""

    kind: str
    root: str
    ids: np.ndarray  # int64 [N]
    paths: list[str]
    labels: np.ndarray  # int32 [N], 0..C-1
    class_names: list[str]
    split: np.ndarray  # uint8 [N], TRAIN / VAL / TEST
    levels: dict[str, Level] = field(default_factory=dict)
    split_recipe: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # e.g. which taxonomy the levels came from
    source: ImageSource | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = LocalFiles(self.root, self.paths)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int32)
        self.split = np.asarray(self.split, dtype=np.uint8)
        n = len(self.ids)
        if not (len(self.paths) == len(self.labels) == len(self.split) == n):
            raise ValueError("SampleTable columns differ in length")
        if n == 0:
            raise FgembedError(f"dataset at {self.root} has no images")
        if len(np.unique(self.ids)) != n:
            raise FgembedError(f"dataset at {self.root} has duplicate image ids")

    def __len__(self) -> int:
        return len(self.ids)

    def sha256(self) -> str:
        """Hash of everything that defines the rows: extraction into a store checks it."""
        h = hashlib.sha256()
        for arr in (self.ids, self.labels, self.split):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps([self.paths, self.class_names], ensure_ascii=False).encode())
        for name in sorted(self.levels):
            h.update(name.encode())
            h.update(self.levels[name].codes.tobytes())
        return h.hexdigest()

    def split_counts(self) -> dict[str, int]:
        return {name: int((self.split == code).sum()) for name, code in SPLIT_NAMES.items()}


def carve_validation(table: SampleTable, fraction: float = 0.2, seed: int = 0) -> SampleTable:
    """Move a seeded, stratified `fraction` of train rows to val (the reference recipe: 20%).

    Datasets that ship their own val split keep it. Classes with a single training image stay
    in train (stratification needs two), so every class the head sees is trainable.
    """
    if fraction <= 0 or (table.split == VAL).any():
        table.split_recipe = {"val": "official" if (table.split == VAL).any() else "none"}
        return table
    if not 0 < fraction < 1:
        raise FgembedError(f"--val-fraction must be in [0, 1), got {fraction}")
    train = np.flatnonzero(table.split == TRAIN)
    counts = np.bincount(table.labels[train], minlength=len(table.class_names))
    eligible = train[counts[table.labels[train]] >= 2]
    n_val = int(round(fraction * len(eligible)))
    n_classes = len(np.unique(table.labels[eligible]))
    if n_val < n_classes or len(eligible) - n_val < n_classes:
        raise FgembedError(
            f"cannot carve a stratified {fraction:.0%} val split: {len(eligible)} training images "
            f"for {n_classes} classes; use --val-fraction 0 or more images"
        )
    from sklearn.model_selection import train_test_split  # here: scikit-learn takes ~1-2 s to import

    _, val = train_test_split(
        eligible, test_size=n_val, stratify=table.labels[eligible], random_state=seed
    )
    split = table.split.copy()
    split[val] = VAL
    table.split = split
    table.split_recipe = {"val": "carved", "fraction": fraction, "seed": seed, "stratified": True}
    return table
