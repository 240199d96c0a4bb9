"""Dataset identity: which files a store's rows were read from, cheap enough for 500k images.

Identity = the images' location (a resolved root, or a URL) + every row's record size and mtime
(one `stat` each, through the table's `source`) + a sampled content hash (the first and last
2 KB of a seeded sample of records). Never a full hash of every
image: that would cost a full read of the dataset on every resume. Two copies of a dataset
under different roots, a file replaced by another, or an edited file (size or mtime moved) are
told apart; what differs is said in one line.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .sources import SAMPLE_BYTES
from .table import SampleTable

SAMPLE_FILES = 16
SAMPLE_SEED = 0


@dataclass
class FileIdentity:
    root: str  # resolved
    sizes: np.ndarray  # int64 [N]; -1 where the file is missing
    mtimes_ns: np.ndarray  # int64 [N]; -1 where the file is missing
    sample_rows: list[int]
    sample_sha256: str

    def attrs(self) -> dict:
        """What goes into samples/ attrs (sizes and mtimes go in arrays beside the rows)."""
        return {"root": self.root, "sample_rows": self.sample_rows, "sample_sha256": self.sample_sha256,
                "sample_bytes": SAMPLE_BYTES, "schema": 1}


def file_identity(table: SampleTable) -> FileIdentity:
    """Stat every row's record and hash the ends of a seeded sample of them."""
    n, source = len(table), table.source
    sizes, mtimes = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    for row in range(n):
        sizes[row], mtimes[row] = source.stat(row)
    rng = np.random.default_rng(SAMPLE_SEED)
    rows = sorted(int(r) for r in rng.choice(n, size=min(SAMPLE_FILES, n), replace=False))
    digest = hashlib.sha256()
    for row in rows:
        digest.update(table.paths[row].encode())
        digest.update(source.ends(row))
    return FileIdentity(source.location, sizes, mtimes, rows, digest.hexdigest())


def identity_differences(old_attrs: dict, old_sizes: np.ndarray | None, old_mtimes: np.ndarray | None,
                         paths: list[str], new: FileIdentity) -> list[str]:
    """What differs between a stored identity and the files as they are now (empty: the same)."""
    changes = []
    if old_attrs.get("root") and old_attrs["root"] != new.root:
        changes.append(f"images under {old_attrs['root']}, this run reads {new.root}")
    if old_sizes is not None and old_mtimes is not None:
        moved = np.flatnonzero((old_sizes != new.sizes) | (old_mtimes != new.mtimes_ns))
        if len(moved):
            r = int(moved[0])
            what = (f"size {old_sizes[r]} → {new.sizes[r]}" if old_sizes[r] != new.sizes[r] else "modified since")
            changes.append(f"{len(moved)} image files changed (first: {paths[r]}, {what})")
    if not changes and old_attrs.get("sample_sha256") not in (None, new.sample_sha256):
        changes.append("the content of sampled image files differs")
    return changes
