"""How a feature store's structure is made and changed: always whole, under the setup lock.

samples/, features/ and each backbone group are built whole under `.fgembed/staging/` and
renamed into place (`swap_in`); what they replace goes to `.fgembed/trash/` and is deleted only
once every new node is in place, so a failure on the way (a full disk, Ctrl-C) puts the old store
back as it was. The root `zarr.json` (the "ready" mark) is written last. A kill leaves debris in
`.fgembed/` that the next writer clears (`clear_debris`) under the setup lock (see `locks.py`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from .datasets.identity import FileIdentity, identity_differences
from .datasets.table import SPLIT_NAMES, SampleTable
from .errors import FgembedError
from .locks import HIDDEN, setup_lock

STORE_FORMAT, STORE_VERSION = "fgembed-store", 2
FEATURE_ARRAYS = ("emb", "done", "status")


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk or a denied permission is one line that says what to do, not a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FgembedError(f"disk full while writing {path} ({exc.strerror}); the store is intact (finished "
                               "shards are kept, the interrupted one is redone): free space and rerun the same "
                               "command to resume") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = (exc.strerror or "permission denied").lower()
            raise FgembedError(f"cannot use feature store {path}: {why} on {exc.filename or path}; fix its "
                               "permissions or choose another --store") from None
        raise


def rows_sha256(ids: np.ndarray, paths: list[str]) -> str:
    """The rows' identity without labels or splits: what embeddings depend on."""
    h = hashlib.sha256(np.ascontiguousarray(np.asarray(ids, np.int64)).tobytes())
    h.update(json.dumps([str(p) for p in paths], ensure_ascii=False).encode())
    return h.hexdigest()


def setup(path: Path, table: SampleTable, shard_rows: int, overwrite: bool, names: list[str],
          identity: FileIdentity) -> None:
    """Make the store at `path` for `table`, finish a half-made one, or reconcile an existing one."""
    with setup_lock(path), disk_errors(path):
        clear_debris(path)
        ready = (path / "zarr.json").is_file()
        if ready and zarr.open_group(path, mode="r").attrs.get("format") != STORE_FORMAT \
                and not (path / "samples").is_dir():
            raise FgembedError(f"{path} is a Zarr group but not a feature store; choose another --store")
        if not ready or not samples_complete(path):
            swap_in(path, (stage_samples(path, table, shard_rows, identity), path / "samples"))
        else:
            _reconcile(path, table, identity, overwrite, names)
        if not (path / "features" / "zarr.json").is_file():
            zarr.open_group(path / "features", mode="w")
        if not ready:  # the ready mark, last
            zarr.create_group(path, attributes={"format": STORE_FORMAT, "version": STORE_VERSION})


def scratch(path: Path, kind: str, label: str) -> Path:
    folder = path / HIDDEN / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clear_debris(path: Path) -> None:
    """Staging and trash left by a killed setup, and zarr temp files of the root and features/
    metadata: nothing live writes any of them outside the setup lock."""
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


def group_complete(d: Path) -> bool:
    if not all((d / a / "zarr.json").is_file() for a in ("", *FEATURE_ARRAYS)):
        return False
    try:
        return "name" in json.loads((d / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def samples_complete(path: Path) -> bool:
    s = path / "samples"
    try:
        attrs = json.loads((s / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    arrays = ("id", "label", "split", "path", *attrs.get("levels", {}))
    return "manifest_sha256" in attrs and all((s / a / "zarr.json").is_file() for a in arrays)


def stage_samples(path: Path, table: SampleTable, shard_rows: int, identity: FileIdentity) -> Path:
    """samples/ for `table`, written whole under staging; returns where (for `swap_in`)."""
    staging = scratch(path, "staging", "samples")
    samples = zarr.open_group(staging, mode="w")
    n = len(table)

    def put(name: str, values, dtype) -> None:
        arr = samples.create_array(name, shape=(n,), chunks=(shard_rows,), dtype=dtype)
        arr[:] = values

    put("id", table.ids, "int64")
    put("label", table.labels, "int32")
    put("split", table.split, "uint8")
    put("path", np.array(table.paths, dtype=object), str)
    for level, data in table.levels.items():
        put(level, data.codes, "int32")
    put("file_size", identity.sizes, "int64")
    put("file_mtime_ns", identity.mtimes_ns, "int64")
    samples.attrs.update({
        "kind": table.kind, "root": table.root, "class_names": table.class_names,
        "levels": {k: v.names for k, v in table.levels.items()}, "split_codes": SPLIT_NAMES,
        "split_recipe": table.split_recipe, "provenance": table.provenance,
        "manifest_sha256": table.sha256(), "rows_sha256": rows_sha256(table.ids, table.paths),
        "identity": identity.attrs(), "shard_rows": shard_rows, "fgembed_version": __version__,
    })
    return staging


def _reconcile(path: Path, table: SampleTable, identity: FileIdentity, overwrite: bool, names: list[str]) -> None:
    """An existing store meets `table`: accept it, rewrite samples/, or refuse in one line."""
    samples = zarr.open_group(path / "samples", mode="r")
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
    root = path / "features"
    groups = sorted(json.loads((d / "zarr.json").read_text())["attributes"]["name"]
                    for d in (root.iterdir() if root.is_dir() else ()) if group_complete(d))
    if same_rows:  # same images, other labels / splits / classes: embeddings stay valid
        what = (f"split recipe {json.dumps(attrs.get('split_recipe'))} → {json.dumps(table.split_recipe)}"
                if attrs.get("split_recipe") != table.split_recipe else "labels, classes or splits differ")
        if not overwrite:
            raise FgembedError(f"store {path} holds the same images with other labels or splits ({what}); "
                               f"--overwrite rewrites samples/ and keeps its backbone groups (their rows are "
                               "unchanged), or use another --store")
        swap_in(path, (stage_samples(path, table, shard_rows, identity), path / "samples"))
        return
    what = "; ".join(moved) or (f"{attrs.get('kind')} at {attrs.get('root')}, {samples['id'].shape[0]} rows → "
                                f"{table.kind} at {table.root}, {len(table)} rows")
    others = [g for g in groups if g not in names]
    if not overwrite:
        raise FgembedError(f"store {path} holds another dataset or other files ({what}); use another --store, or "
                           "--overwrite naming every backbone in it" + (f" ({', '.join(groups)})" if groups else ""))
    if others:
        raise FgembedError(f"store {path} holds another dataset or other files ({what}); --overwrite replaces only "
                           f"the backbones it names, and {', '.join(others)} would have to be re-extracted: name "
                           "them too, or use another --store")
    # Every group is named, so all are rebuilt. The new samples/ and an empty features/ are made
    # whole first; only then are the old ones swapped out. features/ goes first, so no moment
    # pairs the old groups with the new rows.
    staged_samples = stage_samples(path, table, shard_rows, identity)
    staged_features = scratch(path, "staging", "features")
    zarr.open_group(staged_features, mode="w")
    swap_in(path, (staged_features, root), (staged_samples, path / "samples"))
