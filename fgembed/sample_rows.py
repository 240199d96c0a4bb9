"""The samples/ half of a FeatureStore: where the store is, and its rows — their shards and
blocks, splits, labels, ids, paths and the identity of the images they were read from.

Every question about rows is answered here, from samples/ alone; the features/ half
(`feature_groups.py`) builds on it, and `FeatureStore` (`store.py`, opening and creating) is the
one class users see.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import zarr

from .datasets.table import SPLIT_NAMES, Level, SampleTable
from .errors import FgembedError
from .storage import Storage


class SampleRows:
    """A store's location and its samples/ group (its attrs read once, when the store is opened).

    `location` is the store as given (a path or URL: what messages show), `url` where it is,
    absolute (`file://…` for a local folder)."""

    def __init__(self, storage: Storage, group: zarr.Group) -> None:
        self.storage = storage
        self.group = group  # the root Zarr group (tests and plain-zarr users; stage-2 code uses the accessors)
        self._samples_attrs = dict(group["samples"].attrs)
        self._n_rows = int(group["samples/id"].shape[0])

    @property
    def location(self) -> str:
        return self.storage.location

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def path(self) -> Path | str:
        """The folder of a local store; the URL of one elsewhere (prefer `location` in messages)."""
        return self.storage.root if self.storage.local else self.storage.location

    @property
    def samples_attrs(self) -> dict:
        return dict(self._samples_attrs)

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def shard_rows(self) -> int:
        return int(self._samples_attrs["shard_rows"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_slice(self, shard: int) -> slice:
        return slice(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.n_rows))

    def row_blocks(self, rows: int | None = None) -> list[slice]:
        """Consecutive blocks of whole shards covering every row, about `rows` rows each (one
        shard at least): read block by block, a reader fetches each shard once."""
        step = self.shard_rows * max(1, (rows or 0) // self.shard_rows)
        return [slice(start, min(start + step, self.n_rows)) for start in range(0, self.n_rows, step)]

    def split_codes(self) -> np.ndarray:
        """Each row's split, uint8: `datasets.SPLIT_NAMES` maps names to codes."""
        return self.group["samples/split"][:]

    def split_mask(self, split: str | None) -> np.ndarray:
        """Rows of a split (every row when None), bool."""
        if split is None:
            return np.ones(self.n_rows, bool)
        if split not in SPLIT_NAMES:
            raise FgembedError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return self.split_codes() == SPLIT_NAMES[split]

    def labels(self, split: str | None = None, level: str | None = None) -> np.ndarray:
        """Fine labels, or a taxonomy level's codes, for a split (all rows when None)."""
        name = level or "label"
        if name not in ("label", *self._samples_attrs["levels"]) or name not in self.group["samples"]:
            raise FgembedError(f"store {self.location} has no taxonomy level {level!r}; has: "
                               f"{', '.join(self._samples_attrs['levels']) or 'none'}")
        return self.group[f"samples/{name}"][:][self.split_mask(split)]

    def sample_ids(self) -> np.ndarray:
        """The dataset's image id of each row, int64."""
        return self.group["samples/id"][:]

    def sample_paths(self) -> list[str]:
        """Each row's image path, relative to the dataset root."""
        return [str(p) for p in self.group["samples/path"][:]]

    @property
    def class_names(self) -> list[str]:
        return list(self._samples_attrs["class_names"])

    @property
    def identity(self) -> dict:
        """The dataset identity recorded at setup ({} for stores made before it was recorded)."""
        return dict(self._samples_attrs.get("identity", {}))

    def content_sha256(self) -> str:
        """A digest of the images the rows were read from: the recorded dataset identity (location,
        sampled content hash) and every row's file size and mtime. Two stores with the same listing
        whose images differ (one replaced, missing or edited) differ here."""
        samples = self.group["samples"]
        h = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        for name in ("file_size", "file_mtime_ns"):
            if name in samples:
                h.update(np.ascontiguousarray(samples[name][:], np.int64).tobytes())
        return h.hexdigest()

    def table(self) -> SampleTable:
        """The stored rows as a SampleTable (what a later stage needs without the images)."""
        s, attrs = self.group["samples"], self._samples_attrs
        levels = {k: Level(s[k][:], names) for k, names in attrs["levels"].items()}
        return SampleTable(attrs["kind"], attrs["root"], s["id"][:], list(s["path"][:]), s["label"][:],
                           attrs["class_names"], s["split"][:], levels, attrs["split_recipe"],
                           attrs.get("provenance", {}))
