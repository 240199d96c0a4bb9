"""FeatureStore: the Zarr v3 layout of DESIGN.md, readable with plain `zarr`, on a local disk or at
any fsspec URL (`storage.py`).

    samples/{id,label,split,path,<level>…,file_size,file_mtime_ns}   one row per image
    features/<key>/{emb,done,status[,text]}                           one group per backbone
    .fgembed/locks/                                                   writer locks (`locks.py`)

Feature arrays are sharded (zarr's sharding codec) by `shard_rows` rows: a shard is one object of
each array, written whole by one process (zarr's LocalStore writes it to a temp file and renames
it; an object store's PUT is atomic), so separate processes can fill disjoint shards without
locks and a kill leaves whole shards or none. `done` for a shard is written after its `emb` and
`status`, so a set bit always covers finished data. A store written before sharding (one object
per 256-row chunk) reads and resumes the same way: its shards are its chunks.

Structure changes (samples/, a backbone group) are made whole before readers count them, under
the setup lock (`_store_setup.py`). The store's modules and the set-up are the only code that
knows the layout — this one (opening, creating), `sample_rows.py` (samples/) and
`feature_groups.py` (features/), one class between them: stage-2 code reads through its accessors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Self

import zarr

from ._store_setup import STORE_FORMAT, auto_shard_rows, samples_complete, setup
from .datasets.identity import file_identity
from .datasets.table import SampleTable
from .errors import FgembedError
from .feature_groups import FeatureGroups, group_key
from .fingerprints import fingerprint_changes
from .locks import HIDDEN, Lock, features_lock
from .storage import Storage, locate

__all__ = ["DEFAULT_SHARD_ROWS", "FeatureStore", "fingerprint_changes", "group_key"]  # where callers import them

DEFAULT_SHARD_ROWS: int | None = None  # None: chosen from the row count (`auto_shard_rows`)


class FeatureStore(FeatureGroups):
    """One dataset's samples and the embeddings of any number of backbones: the samples/ half
    (`sample_rows.SampleRows`) and the features/ half (`feature_groups.FeatureGroups`) of one store,
    opened or created here."""

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, where: str | Path | Storage, mode: str = "r", storage_options: dict | None = None) -> FeatureStore:
        """Open the store at a local path or fsspec URL (`storage_options` go to the filesystem)."""
        storage = locate(where, storage_options)
        if mode != "r" and not storage.writable:
            raise FgembedError(f"{storage} can only be read (fgembed writes to local disk, s3://, gs://, az:// "
                               "and memory:// stores)")
        with storage.errors():  # an unreadable folder or a refused bucket is one line, as in create
            return cls._open(storage, mode)

    @classmethod
    def _open(cls, storage: Storage, mode: str) -> FeatureStore:
        if not storage.exists("zarr.json"):
            if {HIDDEN, "samples", "features"} & set(storage.list_dir("")):
                raise FgembedError(f"{storage} is a feature store whose setup was interrupted; rerun the fgembed "
                                   "extract (or import) command that made it to finish it")
            raise FgembedError(f"no feature store at {storage}")
        group = zarr.open_group(storage.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
        if group.attrs.get("format") != STORE_FORMAT and "samples" not in group:
            raise FgembedError(f"{storage} is a Zarr group but not a feature store (no samples/)")
        if not samples_complete(storage):
            raise FgembedError(f"{storage} is a feature store whose setup was interrupted (samples/ incomplete); "
                               "rerun the fgembed extract (or import) command that made it to finish it")
        return cls(storage, group)

    @classmethod
    def create(cls, where: str | Path | Storage, table: SampleTable, shard_rows: int | None = DEFAULT_SHARD_ROWS,
               overwrite: bool = False, names: tuple[str, ...] | list[str] = (),
               storage_options: dict | None = None) -> FeatureStore:
        """Open the store for `table`, making or finishing it as needed; refuse a different dataset.

        `where` is a local path or an fsspec URL (`storage_options` go to the filesystem).
        `shard_rows` (rows per shard: the unit of resume and of parallel writes) applies to a new
        store; None picks it from the row count. `names` are the backbones this job will write: the
        returned store holds their writer locks (see `lock_features`), and `overwrite` may replace
        only them. A store of the same images with other labels or splits is rewritten (samples/
        only, its groups kept: their rows are unchanged); a store of other images only when every
        group in it is named (else the refusal lists the groups that would have to be
        re-extracted). `with FeatureStore.create(…) as store:` releases the locks however the
        block ends.
        """
        storage = locate(where, storage_options)
        if not storage.writable:
            raise FgembedError(f"{storage} can only be read; write the store to local disk, s3://, gs://, az:// "
                               "or memory://")
        with storage.errors():  # an unreadable or read-only --store is one line, not a traceback
            _refuse_other_contents(storage)
        identity = file_identity(table)
        # the named groups' writer locks first: an --overwrite may not pull a group from under its writer
        locks: dict[str, Lock] = {}
        try:
            with storage.errors():
                for name in names:
                    if group_key(name) not in locks:
                        locks[group_key(name)] = features_lock(storage, group_key(name), name)
            setup(storage, table, shard_rows or auto_shard_rows(len(table)), overwrite, list(names), identity)
            with storage.errors():
                store = cls(storage, zarr.open_group(storage.zarr_store(), mode="r+", zarr_format=3))
        except BaseException:
            for lock in locks.values():
                lock.release()
            raise
        store._locks = locks
        return store

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        """`with store:` releases its writer locks however the block ends (an error, Ctrl-C)."""
        self.release()


def _refuse_other_contents(storage: Storage) -> None:
    """A --store that holds something other than a feature store (a file, another folder) is
    refused before anything is written to it."""
    if storage.local:
        path = storage.root
        if path.exists() and not path.is_dir():
            raise FgembedError(f"--store {storage} is a file, not a feature store folder")
        path.mkdir(parents=True, exist_ok=True)
    if storage.exists("zarr.json"):
        return
    stray = [n for n in storage.entries("") if n not in (HIDDEN, "zarr.json", "samples", "features")]
    if stray:
        raise FgembedError(f"{storage} exists and is not a feature store (holds {stray[0]}); choose another --store")
