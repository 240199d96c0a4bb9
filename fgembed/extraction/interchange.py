"""Features in and out of a store: HDF5 (h5py) and .npy.

Export writes what another tool needs to use the features without fgembed: the embeddings and
the rows' ids, labels, splits and paths. Import brings features made elsewhere (e.g.
thingsvision's `features.h5`, whose rows follow its `file_names.txt`) into a store, so the
classifier stage can use them. Rows are matched, never assumed: by image id when the file has
ids, by path when an order file is given, and by count only when neither exists.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..datasets.table import SPLIT_NAMES
from ..errors import FgembedError
from ..images import OK, UNREADABLE
from ..progress import progress_bar
from ..store import FeatureStore, group_key

EXPORT_FORMATS = ("h5", "npy")


def export_features(store: FeatureStore, out: str | Path, fmt: str = "h5", names: list[str] | None = None) -> Path:
    """Write `names` (default: every complete backbone) and the sample rows to one HDF5 file
    or a folder of .npy files (with `meta.json`)."""
    if fmt not in EXPORT_FORMATS:
        raise FgembedError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    names = names or [n for n in store.backbones() if store.backbone_info(n).complete]
    if not names:
        raise FgembedError(f"store {store.location} has no complete features to export")
    samples = {"id": store.sample_ids(), "label": store.labels(), "split": store.split_codes()}
    paths = np.array(store.sample_paths(), dtype=object)
    fingerprints = {n: store.backbone_info(n).fingerprint for n in names}
    meta = {"store": store.location, "class_names": store.class_names, "split_codes": SPLIT_NAMES,
            "features": {n: {"key": group_key(n), "fingerprint": fingerprints[n]} for n in names}}
    out = Path(out)
    if fmt == "h5":
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(out, "w") as f:
            for k, v in samples.items():
                f.create_dataset(f"samples/{k}", data=v)
            f.create_dataset("samples/path", data=paths, dtype=h5py.string_dtype())
            for n in names:
                dset = f.create_dataset(f"features/{group_key(n)}", data=store.features(n), chunks=True)
                dset.attrs["name"] = n
                dset.attrs["fingerprint"] = json.dumps(fingerprints[n])
            f.attrs["meta"] = json.dumps(meta)
        return out
    out.mkdir(parents=True, exist_ok=True)
    for k, v in samples.items():
        np.save(out / f"{k}.npy", v)
    (out / "paths.txt").write_text("\n".join(paths) + "\n")
    for n in names:
        np.save(out / f"{group_key(n)}.npy", store.features(n))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


@dataclass
class ImportSummary:
    name: str
    rows: int
    dim: int
    missing_rows: int  # store rows the file had no features for (NaN, flagged unreadable)
    matched_by: str


def read_matrix(source: str | Path, key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, ids or None) from an .npy file or an HDF5 file (dataset `key`, else
    `features`, else its only 2-D dataset; ids from an `id`/`ids` dataset beside it)."""
    source = Path(source)
    if not source.is_file():
        raise FgembedError(f"no such file: {source}")
    if source.suffix == ".npy":
        return np.load(source, mmap_mode="r"), None
    if source.suffix not in (".h5", ".hdf5", ".hdf"):
        raise FgembedError(f"{source}: import reads .npy or HDF5 (.h5, .hdf5) files")
    with h5py.File(source, "r") as f:
        datasets: dict[str, h5py.Dataset] = {}

        def collect(name: str, obj) -> None:  # visititems stops at the first non-None return
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj

        f.visititems(collect)
        matrices = [n for n, d in datasets.items() if d.ndim == 2]
        if key is None:
            key = "features" if "features" in datasets else (matrices[0] if len(matrices) == 1 else None)
        if key not in datasets:
            raise FgembedError(f"{source}: choose the features dataset with --key; 2-D datasets: "
                               f"{', '.join(matrices) or 'none'}")
        ids_key = next((k for k in ("id", "ids", "samples/id") if k in datasets), None)
        return datasets[key][:], datasets[ids_key][:] if ids_key else None


def _align(store: FeatureStore, n_file: int, ids: np.ndarray | None, order: list[str] | None) -> tuple[np.ndarray, str]:
    """For each store row, the file row holding it (-1 where the file has none)."""
    if order is not None:
        if len(order) != n_file:
            raise FgembedError(f"order file lists {len(order)} paths but the features have {n_file} rows")
        listed = [p.strip().replace("\\", "/") for p in order]
        if len(set(listed)) != len(listed):
            twice = next(p for i, p in enumerate(listed) if p in listed[:i])
            raise FgembedError(f"the order file lists {twice!r} twice; each feature row needs its own path")
        by_tail: dict[int, dict[str, int]] = {}  # listed paths may be absolute or under another root:
        lookup = []                              # match a store path on its last components
        for path in (p.replace("\\", "/") for p in store.sample_paths()):
            depth = path.count("/") + 1
            if depth not in by_tail:
                by_tail[depth] = {"/".join(p.split("/")[-depth:]): i for i, p in enumerate(listed)}
            lookup.append(by_tail[depth].get(path, -1))
        return np.array(lookup), "path"
    if ids is not None:
        ids = np.asarray(ids).reshape(-1)
        if len(ids) != n_file:
            raise FgembedError(f"the file has {len(ids)} ids but {n_file} feature rows; they must match one to one")
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise FgembedError(f"the file lists image id {values[counts > 1][0]} {counts.max()} times; "
                               "ids must be unique")
        position = {int(v): i for i, v in enumerate(ids)}
        return np.array([position.get(int(v), -1) for v in store.sample_ids()]), "id"
    if n_file != store.n_rows:
        raise FgembedError(f"the features have {n_file} rows but the store has {store.n_rows}; "
                           "give ids in the file or an --order file of image paths")
    return np.arange(n_file), "row order"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_features(store: FeatureStore, name: str, source: str | Path, key: str | None = None,
                    order_file: str | Path | None = None, overwrite: bool = False,
                    progress: bool = False) -> ImportSummary:
    """Write features from `source` into `features/<name>` of `store`, row-matched, with a
    fingerprint naming the file and its hash; rows the file lacks are NaN and flagged."""
    matrix, ids = read_matrix(source, key)
    if matrix.ndim != 2:
        raise FgembedError(f"{source}: features must be a 2-D [rows, dim] array, got shape {matrix.shape}")
    order = Path(order_file).read_text().splitlines() if order_file else None
    lookup, matched_by = _align(store, matrix.shape[0], ids, order)
    if (lookup < 0).all():
        raise FgembedError(f"no row of {source} matches a row of store {store.location} (by {matched_by})")
    digest = _sha256(Path(source))
    fingerprint = {"source": "import", "file": Path(source).name, "sha256": digest, "key": key,
                   "matched_by": matched_by}
    store.lock_features(name)  # one writer per group; released below, or by the OS if this process dies
    try:
        store.prepare(name, fingerprint, dim=int(matrix.shape[1]), dtype="float32", overwrite=overwrite)
        pending = store.pending_shards(name)  # an interrupted import resumes where it stopped
        with progress_bar(len(pending), f"import {name}", enabled=progress, unit="shard") as tick:
            for shard in pending:
                rows = store.shard_slice(shard)
                source_rows = lookup[rows]
                emb = np.full((len(source_rows), matrix.shape[1]), np.nan, np.float32)
                present = source_rows >= 0
                with np.errstate(over="ignore", invalid="ignore"):
                    emb[present] = matrix[source_rows[present]].astype(np.float32)
                # rows the file lacks are unreadable; present non-finite ones get the store's own flag
                store.write_shard(name, shard, emb, np.where(present, OK, UNREADABLE).astype(np.uint8))
                tick(1)
        store.mark_complete(name, None)
    finally:
        store.release()
    return ImportSummary(name, store.n_rows, int(matrix.shape[1]), int((lookup < 0).sum()), matched_by)
