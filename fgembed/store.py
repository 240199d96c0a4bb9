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
the setup lock (`_store_setup.py`). This module and the set-up are the only code that knows the
layout: stage-2 code reads through the accessors below.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from ._store_setup import (
    STORE_FORMAT,
    auto_shard_rows,
    clear_debris,
    feature_groups,
    group_attrs,
    inner_rows,
    replace,
    rows_sha256,
    samples_complete,
    setup,
)
from .datasets.identity import file_identity
from .datasets.table import SPLIT_NAMES, Level, SampleTable
from .errors import FgembedError
from .images import FAILED, NONFINITE, OK, STATUS_NAMES, TRUNCATED
from .locks import HIDDEN, Lock, features_lock, setup_lock
from .storage import Storage, locate

DEFAULT_SHARD_ROWS: int | None = None  # None: chosen from the row count (`auto_shard_rows`)
# The fingerprint's strict part refuses a mismatch; these keys are the recorded part (warn only).
FINGERPRINT_SCHEMA = 2
RECORDED_KEYS = ("versions", "device", "cuda", "host", "root", "hub_revision")
# Group attributes fgembed owns; `record_backbone_attrs` may add any others (e.g. `cost`).
OWN_ATTRS = ("name", "dim", "dtype", "fingerprint", "recorded", "fingerprint_schema", "complete", "status_codes",
             "throughput_images_per_s", "text", "rows_sha256")


def group_key(name: str) -> str:
    """A backbone name as its group's key: `/` would nest groups, `:` is unportable."""
    return re.sub(r"[^\w.+-]", "_", name)


_key = group_key  # the name stage-2 modules imported before `group_key` was public


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, nested keys joined by dots."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)} → {json.dumps(b)}")
    return out


def split_fingerprint(fingerprint: dict) -> tuple[dict, dict]:
    """(strict, recorded) parts of a fingerprint (a schema-1 store kept both in one dict)."""
    return ({k: v for k, v in fingerprint.items() if k not in RECORDED_KEYS},
            {k: v for k, v in fingerprint.items() if k in RECORDED_KEYS})


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """Differences in the strict parts of two fingerprints (what changes the numbers), readable."""
    return _diff(split_fingerprint(old)[0], split_fingerprint(new)[0])


@dataclass
class BackboneInfo:
    name: str
    dim: int
    dtype: str
    rows_done: int
    rows_failed: int
    complete: bool
    fingerprint: dict  # the strict part
    throughput: float | None
    recorded: dict = field(default_factory=dict)  # library versions, device, host, … (warn only)


class FeatureStore:
    """One dataset's samples and the embeddings of any number of backbones.

    `location` is the store as given (a path or URL: what messages show), `url` where it is,
    absolute (`file://…` for a local folder)."""

    def __init__(self, storage: Storage, group: zarr.Group) -> None:
        self.storage = storage
        self.group = group  # the root Zarr group (tests and plain-zarr users; stage-2 code uses the accessors)
        self._locks: dict[str, Lock] = {}
        self._writing: dict[str, zarr.Group] = {}  # groups this store holds the writer lock of, once prepared
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

    # ---- writer locks ----------------------------------------------------------------------
    def lock_features(self, name: str) -> None:
        """Hold the writer lock of `name` until `release()` (or this process ends); clear the
        temp files a killed writer of this group left on local disk (only this group's: others
        may be live)."""
        key = group_key(name)
        if key not in self._locks:
            with self.storage.errors():
                self._locks[key] = features_lock(self.storage, key, name)
        if self.storage.local:
            group_dir = self.storage.root / "features" / key
            if group_dir.is_dir():
                for stray in group_dir.rglob("*.partial"):
                    stray.unlink(missing_ok=True)

    def release(self) -> None:
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()
        self._writing.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        """`with store:` releases its writer locks however the block ends (an error, Ctrl-C)."""
        self.release()

    # ---- samples -------------------------------------------------------------------------
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

    # ---- features ------------------------------------------------------------------------
    def backbones(self) -> list[str]:
        """Whole backbone groups only: a half-made one is ignored by readers and replaced by the
        next writer."""
        with self.storage.errors():
            return sorted(attrs["name"] for attrs in feature_groups(self.storage).values())

    def _features(self, name: str) -> zarr.Group:
        key = group_key(name)
        if key in self._writing:
            return self._writing[key]
        with self.storage.errors():
            attrs = group_attrs(self.storage, key)
            if attrs is not None and attrs["name"] == name:
                return self.group[f"features/{key}"]
        raise FgembedError(f"store {self.location} has no features {name!r}; has: "
                           f"{', '.join(self.backbones()) or 'none'}")

    def prepare(self, name: str, fingerprint: dict, dim: int, dtype: str = "float16",
                overwrite: bool = False, recorded: dict | None = None) -> list[str]:
        """Create features/<name>, or check the existing one's strict fingerprint and its array's
        width and dtype (rows of another width would be written shifted into it); returns warnings
        about the recorded part (library versions, device, host…) where it differs."""
        strict, in_fp = split_fingerprint(fingerprint)
        recorded = {**in_fp, **(recorded or {})}
        key, shape = group_key(name), {"dim": int(dim), "dtype": dtype}
        with self.storage.errors(), setup_lock(self.storage):
            clear_debris(self.storage)
            if group_attrs(self.storage, key) is not None:
                group = self.group[f"features/{key}"]
                old = dict(group.attrs)
                old_shape = {"dim": int(group["emb"].shape[1]), "dtype": old.get("dtype", str(group["emb"].dtype))}
                old_strict, old_recorded = split_fingerprint(old.get("fingerprint", {}))
                old_recorded.update(old.get("recorded", {}))
                if old_strict == strict and old_shape == shape:
                    self._hold(key, group)
                    return [f"features {name!r} were extracted with {c} (recorded, not refused)"
                            for c in _diff(old_recorded, recorded) if "null" not in c]  # unrecorded: no news
                if not overwrite:
                    raise FgembedError(_mismatch(self.location, name, old_strict, strict, old_shape, shape))
            self._build_group(key, name, strict, recorded, int(dim), dtype)
        return []

    def _hold(self, key: str, group: zarr.Group) -> None:
        """Keep a group this store writes (holds the lock of) open: no lookups per shard."""
        if key in self._locks:
            self._writing[key] = group

    def _build_group(self, key: str, name: str, strict: dict, recorded: dict, dim: int, dtype: str) -> None:
        """Build the group whole, replacing any old one (`_store_setup.replace`), then list it in
        features/'s index."""
        n, rows = self.n_rows, self.shard_rows
        inner = inner_rows(rows)
        attrs = {"name": name, "dim": dim, "dtype": dtype, "fingerprint": strict, "recorded": recorded,
                 "fingerprint_schema": FINGERPRINT_SCHEMA, "complete": False, "status_codes": STATUS_NAMES,
                 "rows_sha256": self._samples_attrs.get("rows_sha256")
                 or rows_sha256(self.sample_ids(), self.sample_paths())}

        def build(group: zarr.Group) -> None:
            group.create_array("emb", shape=(n, dim), chunks=(inner, dim), shards=(rows, dim), dtype=dtype,
                               fill_value=np.nan)
            group.create_array("done", shape=(n,), chunks=(inner,), shards=(rows,), dtype="bool", fill_value=False)
            group.create_array("status", shape=(n,), chunks=(inner,), shards=(rows,), dtype="uint8", fill_value=0)
            group.update_attributes(attrs)  # the mark, last: one write, all keys at once

        self._writing.pop(key, None)
        replace(self.storage, (f"features/{key}", build))
        features = zarr.open_group(self.storage.zarr_store("features"), mode="r+", zarr_format=3)
        features.update_attributes({"groups": {**features.attrs.get("groups", {}), key: name}})
        self.group = zarr.open_group(self.storage.zarr_store(), mode="r+", zarr_format=3)
        self._hold(key, self.group[f"features/{key}"])

    def pending_shards(self, name: str) -> list[int]:
        done = self._features(name)["done"][:]
        return [s for s in range(self.n_shards) if not done[self.shard_slice(s)].all()]

    def _check_lock(self, name: str) -> None:
        lock = self._locks.get(group_key(name))
        if lock is not None:
            lock.check()

    def write_shard(self, name: str, shard: int, emb: np.ndarray, status: np.ndarray) -> None:
        """Write one whole shard; `done` last. Failed rows are NaN, never shifted; a row whose
        embedding is not finite in the stored dtype (float16 overflows past 65504) is flagged."""
        self._check_lock(name)
        group, rows = self._features(name), self.shard_slice(shard)
        with np.errstate(over="ignore", invalid="ignore"):
            emb = np.asarray(emb).astype(group["emb"].dtype, copy=True)
        status = np.asarray(status, np.uint8).copy()
        overflow = np.isin(status, (OK, TRUNCATED)) & ~np.isfinite(emb).all(axis=1)
        status[overflow] = NONFINITE
        emb[np.isin(status, FAILED)] = np.nan
        with self.storage.errors():
            group["emb"][rows] = emb
            group["status"][rows] = status
            group["done"][rows] = True

    def mark_complete(self, name: str, throughput: float | None) -> bool:
        self._check_lock(name)
        group = self._features(name)
        complete = bool(group["done"][:].all())
        with self.storage.errors():
            group.update_attributes({"complete": complete, "throughput_images_per_s": throughput})
        return complete

    def write_text(self, name: str, embeddings: np.ndarray, logit_scale: float, templates: tuple[str, ...]) -> None:
        """Class-name text embeddings `[classes, dim]` of a CLIP-style backbone (`features/<key>/text`),
        with the model's logit scale and the prompt templates they were averaged over."""
        self._check_lock(name)
        group = self._features(name)
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.shape[0] != len(self.class_names):
            raise FgembedError(f"{len(embeddings)} text rows for {len(self.class_names)} classes of {self.location}")
        with self.storage.errors():
            group.create_array("text", data=embeddings, overwrite=True)
            group.update_attributes({"text": {"logit_scale": float(logit_scale), "templates": list(templates)}})

    def text(self, name: str) -> tuple[np.ndarray, float] | None:
        """(text embeddings, logit scale) of a backbone extracted with `--text`, else None."""
        group = self._features(name)
        if "text" not in group:
            return None
        return group["text"][:], float(dict(group.attrs)["text"]["logit_scale"])

    def status(self, name: str) -> np.ndarray:
        """Each row's status code for one backbone (`images.STATUS_NAMES`)."""
        return self._features(name)["status"][:]

    def embeddings(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Rows of one backbone's embeddings as stored (float16 unless extracted as float32), NaN
        where the image failed or the row is not done yet. Read by `row_blocks`, a reader fetches
        each shard once."""
        return self._features(name)["emb"][rows if rows is not None else slice(None)]

    def features(self, name: str, split: str | None = None, dtype=np.float32) -> np.ndarray:
        """[rows, dim] embeddings of one backbone for a split; refuses an unfinished extraction."""
        group = self._features(name)
        done = group["done"][:]
        if not done.all():
            raise FgembedError(f"features {name!r} in {self.location} are incomplete "
                               f"({int(done.sum())}/{len(done)} rows); rerun fgembed extract to finish")
        return group["emb"][:].astype(dtype, copy=False)[self.split_mask(split)]

    def backbone_info(self, name: str) -> BackboneInfo:
        group = self._features(name)
        attrs = dict(group.attrs)
        done, status = group["done"][:], group["status"][:]
        strict, recorded = split_fingerprint(attrs["fingerprint"])
        return BackboneInfo(name, attrs["dim"], attrs["dtype"], int(done.sum()),
                            int((done & np.isin(status, FAILED)).sum()), bool(attrs.get("complete")),
                            strict, attrs.get("throughput_images_per_s"), {**recorded, **attrs.get("recorded", {})})

    def backbone_attrs(self, name: str) -> dict:
        """Every attribute of a backbone's group (its fingerprint, what was recorded beside it,
        and what `record_backbone_attrs` added)."""
        return dict(self._features(name).attrs)

    def record_backbone_attrs(self, name: str, **attrs) -> None:
        """Record attributes beside a backbone's fingerprint, e.g. `cost=` (`fgembed bench`): they
        describe the model, not the numbers, so nothing compares them. Works on a store opened
        for reading; refuses the keys fgembed owns (`OWN_ATTRS`)."""
        own = sorted(set(attrs) & set(OWN_ATTRS))
        if own:
            raise FgembedError(f"{', '.join(own)}: attributes fgembed owns; record others beside them")
        if not self.storage.writable:
            raise FgembedError(f"{self.location} can only be read: cannot record {', '.join(attrs)} there")
        self._features(name)  # one line for an unknown name
        with self.storage.errors():
            group = zarr.open_group(self.storage.zarr_store(f"features/{group_key(name)}"), mode="r+", zarr_format=3)
            group.update_attributes(attrs)

    def failures(self, *names: str) -> list[tuple[int, str, str]]:
        """(image id, path, status) for every row that any of `names` did not embed plainly, one
        entry per image. A decode failure flags the row for all of them; a status only some
        backbones show (a non-finite embedding) names them, so `--strict` and extract's summary
        see every backbone of a run."""
        status = np.stack([self.status(name) for name in names])
        ids, paths = self.sample_ids(), self.group["samples/path"][:]
        out = []
        for row in np.flatnonzero((status != OK).any(axis=0)):
            codes = [STATUS_NAMES.get(int(c), str(c)) for c in status[:, row]]
            text = codes[0] if len(set(codes)) == 1 else \
                "; ".join(f"{code} ({name})" for name, code, c in zip(names, codes, status[:, row]) if c != OK)
            out.append((int(ids[row]), str(paths[row]), text))
        return out


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


def _mismatch(path: str, name: str, old_strict: dict, strict: dict, old_shape: dict, shape: dict) -> str:
    changes = _diff(old_strict, strict) + [f"{k}: {old_shape[k]} → {shape[k]}" for k in shape if old_shape[k] != shape[k]]
    unknown = sorted(k for k in strict if k not in old_strict)
    if unknown and all(c.split(":")[0].split(".")[0] in unknown for c in changes):
        return (f"features {name!r} in {path} were written by an older fgembed that did not record "
                f"{', '.join(unknown)}, so they cannot be checked against this run; re-extract that group: "
                f"rerun with --overwrite (it replaces only {name!r})")
    return (f"features {name!r} in {path} were extracted differently — {'; '.join(changes)} "
            "(use --overwrite to replace them)")
