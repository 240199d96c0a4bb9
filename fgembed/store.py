"""FeatureStore: the Zarr v3 layout of DESIGN.md, readable with plain `zarr`.

    samples/{id,label,split,path,<level>…,file_size,file_mtime_ns}   one row per image
    features/<key>/{emb,done,status}                                  one group per backbone
    .fgembed/{locks,staging,trash}/                                   fgembed's bookkeeping

Every array is chunked by `shard_rows` rows, so a shard is exactly one chunk of each array:
separate processes can write disjoint shards without locks, and zarr's LocalStore (≥ 3.1.3)
writes each chunk atomically (temp file + rename), so a kill leaves whole chunks or none. `done`
for a shard is written after its `emb` and `status`, so a set bit always covers finished data.

Structure changes are atomic too: samples/ and each backbone group are built whole aside and
renamed into place, the old ones deleted only after (see `_store_setup.py`).
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
    clear_debris,
    disk_errors,
    group_complete,
    samples_complete,
    scratch,
    setup,
    swap_in,
)
from .datasets.identity import file_identity
from .datasets.table import SPLIT_NAMES, Level, SampleTable
from .errors import FgembedError
from .images import FAILED, NONFINITE, OK, STATUS_NAMES, TRUNCATED
from .locks import HIDDEN, FileLock, features_lock, setup_lock

DEFAULT_SHARD_ROWS = 256
# The fingerprint's strict part refuses a mismatch; these keys are the recorded part (warn only).
FINGERPRINT_SCHEMA = 2
RECORDED_KEYS = ("versions", "device", "cuda", "host", "root", "hub_revision")


def _key(name: str) -> str:
    """A backbone name as a group key: `/` would nest groups, `:` is unportable."""
    return re.sub(r"[^\w.+-]", "_", name)


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
    """One dataset's samples and the embeddings of any number of backbones."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self._locks: dict[str, FileLock] = {}

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        path = Path(path)
        with disk_errors(path):  # an unreadable folder is one line, as in create
            return cls._open(path, mode)

    @classmethod
    def _open(cls, path: Path, mode: str) -> FeatureStore:
        if not (path / "zarr.json").is_file():
            if (path / HIDDEN).is_dir():
                raise FgembedError(f"{path} is a feature store whose setup was interrupted; rerun the fgembed "
                                   "extract (or import) command that made it to finish it")
            raise FgembedError(f"no feature store at {path}")
        group = zarr.open_group(path, mode=mode)
        if group.attrs.get("format") != STORE_FORMAT and "samples" not in group:
            raise FgembedError(f"{path} is a Zarr group but not a feature store (no samples/)")
        if not samples_complete(path):
            raise FgembedError(f"{path} is a feature store whose setup was interrupted (samples/ incomplete); "
                               "rerun the fgembed extract (or import) command that made it to finish it")
        return cls(path, group)

    @classmethod
    def create(cls, path: str | Path, table: SampleTable, shard_rows: int = DEFAULT_SHARD_ROWS,
               overwrite: bool = False, names: tuple[str, ...] | list[str] = ()) -> FeatureStore:
        """Open the store for `table`, making or finishing it as needed; refuse a different dataset.

        `names` are the backbones this job will write: the returned store holds their writer locks
        (see `lock_features`), and `overwrite` may replace only them. A store
        of the same images with other labels or splits is rewritten (samples/ only, its groups
        kept: their rows are unchanged); a store of other images only when every group in it is
        named (else the refusal lists the groups that would have to be re-extracted). `with
        FeatureStore.create(…) as store:` releases the locks however the block ends.
        """
        path = Path(path)
        with disk_errors(path):  # an unreadable or read-only --store is one line, not a traceback
            if path.exists() and not path.is_dir():
                raise FgembedError(f"--store {path} is a file, not a feature store folder")
            stray = [p.name for p in path.iterdir() if p.name not in (HIDDEN, "zarr.json", "samples", "features")] \
                if path.is_dir() and not (path / "zarr.json").is_file() else []
            if stray:
                raise FgembedError(f"{path} exists and is not a feature store (holds {stray[0]}); "
                                   "choose another --store")
            path.mkdir(parents=True, exist_ok=True)
        identity = file_identity(table)
        # the named groups' writer locks first: an --overwrite may not pull a group from under its writer
        locks: dict[str, FileLock] = {}
        try:
            with disk_errors(path):
                for name in names:
                    if _key(name) not in locks:
                        locks[_key(name)] = features_lock(path, _key(name), name)
            setup(path, table, shard_rows, overwrite, list(names), identity)
            store = cls(path, zarr.open_group(path, mode="r+"))
        except BaseException:
            for lock in locks.values():
                lock.release()
            raise
        store._locks = locks
        return store

    # ---- writer locks ----------------------------------------------------------------------
    def lock_features(self, name: str) -> None:
        """Hold the writer lock of `name` until `release()` (or this process ends); clear the
        temp files a killed writer of this group left (only this group's: others may be live)."""
        key = _key(name)
        if key not in self._locks:
            self._locks[key] = features_lock(self.path, key, name)
        group_dir = self.path / "features" / key
        if group_dir.is_dir():
            for stray in group_dir.rglob("*.partial"):
                stray.unlink(missing_ok=True)

    def release(self) -> None:
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        """`with store:` releases its writer locks however the block ends (an error, Ctrl-C)."""
        self.release()

    # ---- samples -------------------------------------------------------------------------
    @property
    def samples_attrs(self) -> dict:
        return dict(self.group["samples"].attrs)

    @property
    def n_rows(self) -> int:
        return self.group["samples/id"].shape[0]

    @property
    def shard_rows(self) -> int:
        return int(self.samples_attrs["shard_rows"])

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def shard_slice(self, shard: int) -> slice:
        return slice(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.n_rows))

    def _split_mask(self, split: str | None) -> np.ndarray:
        if split is None:
            return np.ones(self.n_rows, bool)
        if split not in SPLIT_NAMES:
            raise FgembedError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return self.group["samples/split"][:] == SPLIT_NAMES[split]

    def labels(self, split: str | None = None, level: str | None = None) -> np.ndarray:
        """Fine labels, or a taxonomy level's codes, for a split (all rows when None)."""
        name = level or "label"
        if name not in self.group["samples"] or name not in ("label", *self.samples_attrs["levels"]):
            raise FgembedError(f"store {self.path} has no taxonomy level {level!r}; has: "
                               f"{', '.join(self.samples_attrs['levels']) or 'none'}")
        return self.group[f"samples/{name}"][:][self._split_mask(split)]

    @property
    def class_names(self) -> list[str]:
        return list(self.samples_attrs["class_names"])

    @property
    def identity(self) -> dict:
        """The dataset identity recorded at setup ({} for stores made before it was recorded)."""
        return dict(self.samples_attrs.get("identity", {}))

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
        s, attrs = self.group["samples"], self.samples_attrs
        levels = {k: Level(s[k][:], names) for k, names in attrs["levels"].items()}
        return SampleTable(attrs["kind"], attrs["root"], s["id"][:], list(s["path"][:]), s["label"][:],
                           attrs["class_names"], s["split"][:], levels, attrs["split_recipe"],
                           attrs.get("provenance", {}))

    # ---- features ------------------------------------------------------------------------
    def _feature_groups(self) -> dict[str, zarr.Group]:
        """Whole backbone groups only: a half-made one (from a release before atomic setup) is
        ignored by readers and replaced by the next writer."""
        root = self.path / "features"
        if not root.is_dir():
            return {}
        groups = {}
        for d in sorted(root.iterdir()):
            if not group_complete(d):
                continue
            group = self.group["features"][d.name]
            groups[dict(group.attrs)["name"]] = group
        return groups

    def backbones(self) -> list[str]:
        return sorted(self._feature_groups())

    def _features(self, name: str) -> zarr.Group:
        groups = self._feature_groups()
        if name not in groups:
            raise FgembedError(f"store {self.path} has no features {name!r}; has: "
                               f"{', '.join(sorted(groups)) or 'none'}")
        return groups[name]

    def prepare(self, name: str, fingerprint: dict, dim: int, dtype: str = "float16",
                overwrite: bool = False, recorded: dict | None = None) -> list[str]:
        """Create features/<name>, or check the existing one's strict fingerprint and its array's
        width and dtype (rows of another width would be written shifted into it); returns warnings
        about the recorded part (library versions, device, host…) where it differs."""
        strict, in_fp = split_fingerprint(fingerprint)
        recorded = {**in_fp, **(recorded or {})}
        key, shape = _key(name), {"dim": int(dim), "dtype": dtype}
        with setup_lock(self.path), disk_errors(self.path):
            clear_debris(self.path)
            final = self.path / "features" / key
            if group_complete(final):
                group = self.group["features"][key]
                old = dict(group.attrs)
                old_shape = {"dim": int(group["emb"].shape[1]), "dtype": old.get("dtype", str(group["emb"].dtype))}
                old_strict, old_recorded = split_fingerprint(old.get("fingerprint", {}))
                old_recorded.update(old.get("recorded", {}))
                if old_strict == strict and old_shape == shape:
                    return [f"features {name!r} were extracted with {c} (recorded, not refused)"
                            for c in _diff(old_recorded, recorded) if "null" not in c]  # unrecorded: no news
                if not overwrite:
                    raise FgembedError(_mismatch(self.path, name, old_strict, strict, old_shape, shape))
            self._build_group(key, name, strict, recorded, int(dim), dtype)
        return []

    def _build_group(self, key: str, name: str, strict: dict, recorded: dict, dim: int, dtype: str) -> None:
        """Build the group whole under staging, then rename it into place (replacing any old one)."""
        n, rows = self.n_rows, self.shard_rows
        staging = scratch(self.path, "staging", key)
        group = zarr.open_group(staging, mode="w")
        group.create_array("emb", shape=(n, dim), chunks=(rows, dim), dtype=dtype, fill_value=np.nan)
        group.create_array("done", shape=(n,), chunks=(rows,), dtype="bool", fill_value=False)
        group.create_array("status", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
        group.attrs.update({"name": name, "dim": dim, "dtype": dtype, "fingerprint": strict, "recorded": recorded,
                            "fingerprint_schema": FINGERPRINT_SCHEMA, "complete": False,
                            "status_codes": STATUS_NAMES})
        swap_in(self.path, (staging, self.path / "features" / key))
        self.group = zarr.open_group(self.path, mode="r+")

    def pending_shards(self, name: str) -> list[int]:
        done = self._features(name)["done"][:]
        return [s for s in range(self.n_shards) if not done[self.shard_slice(s)].all()]

    def write_shard(self, name: str, shard: int, emb: np.ndarray, status: np.ndarray) -> None:
        """Write one whole shard; `done` last. Failed rows are NaN, never shifted; a row whose
        embedding is not finite in the stored dtype (float16 overflows past 65504) is flagged."""
        group, rows = self._features(name), self.shard_slice(shard)
        with np.errstate(over="ignore", invalid="ignore"):
            emb = np.asarray(emb).astype(group["emb"].dtype, copy=True)
        status = np.asarray(status, np.uint8).copy()
        overflow = np.isin(status, (OK, TRUNCATED)) & ~np.isfinite(emb).all(axis=1)
        status[overflow] = NONFINITE
        emb[np.isin(status, FAILED)] = np.nan
        with disk_errors(self.path):
            group["emb"][rows] = emb
            group["status"][rows] = status
            group["done"][rows] = True

    def mark_complete(self, name: str, throughput: float | None) -> bool:
        group = self._features(name)
        complete = bool(group["done"][:].all())
        with disk_errors(self.path):
            group.attrs.update({"complete": complete, "throughput_images_per_s": throughput})
        return complete

    def write_text(self, name: str, embeddings: np.ndarray, logit_scale: float, templates: tuple[str, ...]) -> None:
        """Class-name text embeddings `[classes, dim]` of a CLIP-style backbone (`features/<key>/text`),
        with the model's logit scale and the prompt templates they were averaged over."""
        group = self._features(name)
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.shape[0] != len(self.class_names):
            raise FgembedError(f"{len(embeddings)} text rows for {len(self.class_names)} classes of {self.path}")
        with disk_errors(self.path):
            group.create_array("text", data=embeddings, overwrite=True)
            group.attrs.update({"text": {"logit_scale": float(logit_scale), "templates": list(templates)}})

    def text(self, name: str) -> tuple[np.ndarray, float] | None:
        """(text embeddings, logit scale) of a backbone extracted with `--text`, else None."""
        group = self._features(name)
        if "text" not in group:
            return None
        return group["text"][:], float(dict(group.attrs)["text"]["logit_scale"])

    def status(self, name: str) -> np.ndarray:
        return self._features(name)["status"][:]

    def features(self, name: str, split: str | None = None, dtype=np.float32) -> np.ndarray:
        """[rows, dim] embeddings of one backbone for a split; refuses an unfinished extraction."""
        group = self._features(name)
        done = group["done"][:]
        if not done.all():
            raise FgembedError(f"features {name!r} in {self.path} are incomplete "
                               f"({int(done.sum())}/{len(done)} rows); rerun fgembed extract to finish")
        return group["emb"][:].astype(dtype, copy=False)[self._split_mask(split)]

    def backbone_info(self, name: str) -> BackboneInfo:
        group = self._features(name)
        attrs = dict(group.attrs)
        done, status = group["done"][:], group["status"][:]
        strict, recorded = split_fingerprint(attrs["fingerprint"])
        return BackboneInfo(name, attrs["dim"], attrs["dtype"], int(done.sum()),
                            int((done & np.isin(status, FAILED)).sum()), bool(attrs.get("complete")),
                            strict, attrs.get("throughput_images_per_s"), {**recorded, **attrs.get("recorded", {})})

    def failures(self, *names: str) -> list[tuple[int, str, str]]:
        """(image id, path, status) for every row that any of `names` did not embed plainly, one
        entry per image. A decode failure flags the row for all of them; a status only some
        backbones show (a non-finite embedding) names them, so `--strict` and extract's summary
        see every backbone of a run."""
        status = np.stack([self.status(name) for name in names])
        ids, paths = self.group["samples/id"][:], self.group["samples/path"][:]
        out = []
        for row in np.flatnonzero((status != OK).any(axis=0)):
            codes = [STATUS_NAMES.get(int(c), str(c)) for c in status[:, row]]
            text = codes[0] if len(set(codes)) == 1 else \
                "; ".join(f"{code} ({name})" for name, code, c in zip(names, codes, status[:, row]) if c != OK)
            out.append((int(ids[row]), str(paths[row]), text))
        return out


def _mismatch(path: Path, name: str, old_strict: dict, strict: dict, old_shape: dict, shape: dict) -> str:
    changes = _diff(old_strict, strict) + [f"{k}: {old_shape[k]} → {shape[k]}" for k in shape if old_shape[k] != shape[k]]
    unknown = sorted(k for k in strict if k not in old_strict)
    if unknown and all(c.split(":")[0].split(".")[0] in unknown for c in changes):
        return (f"features {name!r} in {path} were written by an older fgembed that did not record "
                f"{', '.join(unknown)}, so they cannot be checked against this run; re-extract that group: "
                f"rerun with --overwrite (it replaces only {name!r})")
    return (f"features {name!r} in {path} were extracted differently — {'; '.join(changes)} "
            "(use --overwrite to replace them)")
