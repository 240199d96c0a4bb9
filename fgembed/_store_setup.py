"""How a feature store's structure is made and changed: under the setup lock, each node made whole
before a reader counts it, and the layout of its arrays.

A node counts once its marks are in place: samples/ when its zarr.json carries `manifest_sha256`
and every array it names has metadata; a backbone group when its zarr.json carries `name` and its
arrays have metadata; the store when its root zarr.json (the "ready" mark, written last) exists.
Builders write a node's arrays first and its mark last. Placing a node takes one of two routes:

- local disk: the node is built whole under `.fgembed/staging/` and renamed into place
  (`swap_in`); what it replaces goes to `.fgembed/trash/` and is deleted only once every new node
  is in place, so a failure on the way (a full disk, Ctrl-C) puts the old store back as it was.
- object storage (no rename): the old node's mark is deleted first, then its objects, then the new
  node is written in place, mark last. A failure on the way leaves an unmarked node, which readers
  ignore and the next set-up rebuilds; what depends on the rows goes before the rows change
  (features/ before samples/), and each group records the rows it was made for, so no moment
  pairs groups with other rows.

A kill leaves debris (local: staging, trash, zarr temp files; object storage: an unmarked node)
that the next writer clears or rebuilds under the setup lock (see `locks.py`).

Arrays are sharded with zarr's sharding codec: one object per `shard_rows` rows of each feature
array (the unit of resume and of parallel writes: a shard is written whole, by one process), and
one object per array of samples/ (written once, at set-up). `auto_shard_rows` picks the shard from
the row count so a store holds a few hundred objects, not tens of thousands.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from .datasets.identity import FileIdentity, identity_differences
from .datasets.table import SPLIT_NAMES, SampleTable
from .errors import FgembedError
from .locks import HIDDEN, setup_lock
from .storage import Storage

STORE_FORMAT, STORE_VERSION = "fgembed-store", 2
FEATURE_ARRAYS = ("emb", "done", "status")
# Shards: at most ~TARGET_SHARDS per array, whole powers of two between the bounds (the upper one
# bounds what a shard costs: the host memory a writer holds for it, the work a kill loses).
TARGET_SHARDS, MIN_SHARD_ROWS, MAX_SHARD_ROWS = 64, 256, 32768
INNER_ROWS = 1024  # rows per chunk inside a shard (what a partial read fetches)
MAX_SAMPLES_SHARD_ROWS = 1 << 20  # samples/ arrays: one object each up to this many rows

Build = Callable[[zarr.Group], None]  # writes a node's arrays, then its mark


def auto_shard_rows(n_rows: int) -> int:
    """Rows per shard for a store of `n_rows`: ~TARGET_SHARDS shards of a power of two rows."""
    want = max(1, -(-n_rows // TARGET_SHARDS))
    return min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, 1 << (want - 1).bit_length()))


def inner_rows(shard_rows: int) -> int:
    return INNER_ROWS if shard_rows % INNER_ROWS == 0 else shard_rows


def samples_shard_rows(n_rows: int, shard_rows: int) -> int:
    inner = inner_rows(shard_rows)
    return inner * max(1, -(-min(n_rows, MAX_SAMPLES_SHARD_ROWS) // inner))


def rows_sha256(ids: np.ndarray, paths: list[str]) -> str:
    """The rows' identity without labels or splits: what embeddings depend on."""
    h = hashlib.sha256(np.ascontiguousarray(np.asarray(ids, np.int64)).tobytes())
    h.update(json.dumps([str(p) for p in paths], ensure_ascii=False).encode())
    return h.hexdigest()


def setup(storage: Storage, table: SampleTable, shard_rows: int, overwrite: bool, names: list[str],
          identity: FileIdentity) -> None:
    """Make the store for `table`, finish a half-made one, or reconcile an existing one."""
    with storage.errors(), setup_lock(storage):
        clear_debris(storage)
        ready = storage.exists("zarr.json")
        if ready and _attrs(storage, "zarr.json").get("format") != STORE_FORMAT \
                and "samples" not in storage.list_dir(""):
            raise FgembedError(f"{storage} is a Zarr group but not a feature store; choose another --store")
        if not ready or not samples_complete(storage):
            stale = _groups_of_other_rows(storage, table, overwrite, names)
            replace(storage, *stale, ("samples", samples_builder(table, shard_rows, identity)))
        else:
            _reconcile(storage, table, identity, overwrite, names)
        if not storage.exists("features/zarr.json"):
            zarr.open_group(storage.zarr_store("features"), mode="w", zarr_format=3)
        if not ready:  # the ready mark, last
            zarr.create_group(storage.zarr_store(), attributes={"format": STORE_FORMAT, "version": STORE_VERSION})


def replace(storage: Storage, *builds: tuple[str, Build]) -> None:
    """Put each `(node, build)` in place, in order, replacing what is there (see the module docstring)."""
    if not storage.local:
        for node, build in builds:
            storage.remove(node)
            build(zarr.open_group(storage.zarr_store(node), mode="w", zarr_format=3))
        return
    moves = []
    for node, build in builds:
        staging = scratch(storage.root, "staging", node.rsplit("/", 1)[-1])
        build(zarr.open_group(staging, mode="w", zarr_format=3))
        moves.append((staging, storage.root / node))
    swap_in(storage.root, *moves)


def empty_group(group: zarr.Group) -> None:
    """The build of an empty features/."""


def scratch(root: Path, kind: str, label: str) -> Path:
    folder = root / HIDDEN / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clear_debris(storage: Storage) -> None:
    """Local disk: staging and trash left by a killed set-up, and zarr temp files of the root and
    features/ metadata (nothing live writes any of them outside the setup lock). Object storage
    leaves no debris beside unmarked nodes, which the set-up rebuilds."""
    if not storage.local:
        return
    path = storage.root
    for kind in ("staging", "trash"):
        for d in (path / HIDDEN / kind).glob("*"):
            shutil.rmtree(d, ignore_errors=True)
    for stray in (*path.glob("*.partial"), *(path / "features").glob("*.partial")):
        stray.unlink(missing_ok=True)


def swap_in(path: Path, *moves: tuple[Path, Path]) -> None:
    """Rename whole staged nodes into place, in order: `(staging, final)` pairs. What each replaces
    goes to trash and is deleted only after the last move; an exception on the way (Ctrl-C
    included) moves the new nodes out and the old ones back, so the store is as it was."""
    trashed: list[tuple[Path, Path]] = []
    placed: list[tuple[Path, Path]] = []
    try:
        for staging, final in moves:
            if final.exists():
                trash = scratch(path, "trash", final.name)
                os.rename(final, trash)
                trashed.append((final, trash))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
            placed.append((staging, final))
    except BaseException:
        for staging, final in reversed(placed):
            os.rename(final, staging)  # back to staging: the next setup clears it
        for final, trash in reversed(trashed):
            os.rename(trash, final)
        raise
    for _, trash in trashed:
        shutil.rmtree(trash, ignore_errors=True)


def _attrs(storage: Storage, key: str) -> dict:
    return (storage.read_json(key) or {}).get("attributes", {})


def group_attrs(storage: Storage, key: str) -> dict | None:
    """A backbone group's attrs once it is whole (marked, its arrays in place), else None."""
    attrs = _attrs(storage, f"features/{key}/zarr.json")
    if "name" not in attrs or not all(storage.exists(f"features/{key}/{a}/zarr.json") for a in FEATURE_ARRAYS):
        return None
    return attrs


def feature_groups(storage: Storage) -> dict[str, dict]:
    """Every whole backbone group: key → attrs. The folders listed, and the index in features/'s
    attrs (what a store served over plain HTTP, which cannot list, is read by)."""
    keys = set(storage.list_dir("features")) | set(_attrs(storage, "features/zarr.json").get("groups", {}))
    return {key: attrs for key in sorted(keys) if (attrs := group_attrs(storage, key)) is not None}


def samples_complete(storage: Storage) -> bool:
    attrs = _attrs(storage, "samples/zarr.json")
    arrays = ("id", "label", "split", "path", *attrs.get("levels", {}))
    return "manifest_sha256" in attrs and all(storage.exists(f"samples/{a}/zarr.json") for a in arrays)


def samples_builder(table: SampleTable, shard_rows: int, identity: FileIdentity) -> Build:
    """The build of samples/ for `table`: its arrays, then its attrs (the mark)."""
    n = len(table)
    chunks, shards = (inner_rows(shard_rows),), (samples_shard_rows(n, shard_rows),)

    def build(samples: zarr.Group) -> None:
        def put(name: str, values, dtype) -> None:
            samples.create_array(name, shape=(n,), chunks=chunks, shards=shards, dtype=dtype)[:] = values

        put("id", table.ids, "int64")
        put("label", table.labels, "int32")
        put("split", table.split, "uint8")
        put("path", np.array(table.paths, dtype=object), str)
        for level, data in table.levels.items():
            put(level, data.codes, "int32")
        put("file_size", identity.sizes, "int64")
        put("file_mtime_ns", identity.mtimes_ns, "int64")
        samples.update_attributes({  # the mark, last: one write, all keys at once
            "kind": table.kind, "root": table.root, "class_names": table.class_names,
            "levels": {k: v.names for k, v in table.levels.items()}, "split_codes": SPLIT_NAMES,
            "split_recipe": table.split_recipe, "provenance": table.provenance,
            "manifest_sha256": table.sha256(), "rows_sha256": rows_sha256(table.ids, table.paths),
            "identity": identity.attrs(), "shard_rows": shard_rows, "fgembed_version": __version__,
        })

    return build


def _groups_of_other_rows(storage: Storage, table: SampleTable, overwrite: bool, names: list[str]
                          ) -> list[tuple[str, Build]]:
    """Before samples/ is (re)made: groups recorded for other rows than `table`'s (left beside a
    set-up interrupted on object storage) must go first — with --overwrite naming them."""
    rows = rows_sha256(table.ids, table.paths)
    stale = sorted(a["name"] for a in feature_groups(storage).values() if a.get("rows_sha256", rows) != rows)
    if not stale:
        return []
    if not overwrite or any(name not in names for name in stale):
        raise FgembedError(f"store {storage} holds features of other images ({', '.join(stale)}) beside an "
                           "interrupted set-up; --overwrite naming them replaces them, or use another --store")
    return [("features", empty_group)]


def _reconcile(storage: Storage, table: SampleTable, identity: FileIdentity, overwrite: bool, names: list[str]) -> None:
    """An existing store meets `table`: accept it, rewrite samples/, or refuse in one line."""
    samples = zarr.open_group(storage.zarr_store("samples", read_only=True), mode="r", zarr_format=3)
    attrs = dict(samples.attrs)
    old_rows = attrs.get("rows_sha256") or rows_sha256(samples["id"][:], list(samples["path"][:]))
    has = "file_size" in samples and "file_mtime_ns" in samples
    listed = old_rows == rows_sha256(table.ids, table.paths)  # the same ids and paths, in order
    moved = identity_differences(attrs.get("identity", {}), samples["file_size"][:] if has else None,
                                 samples["file_mtime_ns"][:] if has else None, table.paths, identity) if listed else []
    same_rows = listed and not moved
    if same_rows and attrs["manifest_sha256"] == table.sha256():
        return
    shard_rows = int(attrs["shard_rows"])
    groups = sorted(a["name"] for a in feature_groups(storage).values())
    if same_rows:  # same images, other labels / splits / classes: embeddings stay valid
        what = (f"split recipe {json.dumps(attrs.get('split_recipe'))} → {json.dumps(table.split_recipe)}"
                if attrs.get("split_recipe") != table.split_recipe else "labels, classes or splits differ")
        if not overwrite:
            raise FgembedError(f"store {storage} holds the same images with other labels or splits ({what}); "
                               f"--overwrite rewrites samples/ and keeps its backbone groups (their rows are "
                               "unchanged), or use another --store")
        replace(storage, ("samples", samples_builder(table, shard_rows, identity)))
        return
    what = "; ".join(moved) or (f"{attrs.get('kind')} at {attrs.get('root')}, {samples['id'].shape[0]} rows → "
                                f"{table.kind} at {table.root}, {len(table)} rows")
    others = [g for g in groups if g not in names]
    if not overwrite:
        raise FgembedError(f"store {storage} holds another dataset or other files ({what}); use another --store, or "
                           "--overwrite naming every backbone in it" + (f" ({', '.join(groups)})" if groups else ""))
    if others:
        raise FgembedError(f"store {storage} holds another dataset or other files ({what}); --overwrite replaces only "
                           f"the backbones it names, and {', '.join(others)} would have to be re-extracted: name "
                           "them too, or use another --store")
    # Every group is named, so all are rebuilt: an empty features/ first, then the new samples/, so no
    # moment pairs the old groups with the new rows.
    replace(storage, ("features", empty_group), ("samples", samples_builder(table, shard_rows, identity)))
