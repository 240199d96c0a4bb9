"""The features/ half of a FeatureStore: one group per backbone, `features/<key>/{emb,done,
status[,text]}` — its writer lock, its fingerprint, and its arrays, built, written shard by
shard, checked and read.

A group is built whole (`_store_setup.replace`) under the setup lock and listed in features/'s
index; its shards are then written whole, `done` last, by the job that holds its writer lock
(`locks.py`: torchrun ranks write disjoint shards without taking it). It builds on the samples/ half (`sample_rows.py`) for the row geometry; `FeatureStore`
(`store.py`) adds opening and creating.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zarr

from ._store_setup import (
    clear_debris,
    feature_groups,
    group_attrs,
    inner_rows,
    replace,
    rows_sha256,
)
from .errors import FgembedError
from .fingerprints import FINGERPRINT_SCHEMA, differences, split_fingerprint
from .images import FAILED, NONFINITE, OK, STATUS_NAMES, TRUNCATED
from .locks import Lock, features_lock, setup_lock
from .sample_rows import SampleRows
from .storage import Storage

# Group attributes fgembed owns; `record_backbone_attrs` may add any others (e.g. `cost`).
OWN_ATTRS = ("name", "dim", "dtype", "fingerprint", "recorded", "fingerprint_schema", "complete", "status_codes",
             "throughput_images_per_s", "text", "rows_sha256", "failed_rows")
# A finished group lists its failed rows in its attributes up to this many (else readers read
# its status array): the common case — none or a few — then costs a reader no status requests.
MAX_FAILED_IN_ATTRS = 10_000


def group_key(name: str) -> str:
    """A backbone name as its group's key: `/` would nest groups, `:` is unportable."""
    return re.sub(r"[^\w.+-]", "_", name)


@dataclass
class BackboneInfo:
    """One group at a glance: what it holds, how far its extraction got, what it was made with."""

    name: str
    dim: int
    dtype: str
    rows_done: int
    rows_failed: int
    complete: bool
    fingerprint: dict  # the strict part
    throughput: float | None
    recorded: dict = field(default_factory=dict)  # library versions, device, host, … (warn only)


class FeatureGroups(SampleRows):
    """The backbone groups of a store, and the writer locks this store holds on them."""

    def __init__(self, storage: Storage, group: zarr.Group) -> None:
        super().__init__(storage, group)
        self._locks: dict[str, Lock] = {}
        self._writing: dict[str, zarr.Group] = {}  # groups this store holds the writer lock of, once prepared

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
                            for c in differences(old_recorded, recorded) if "null" not in c]  # unrecorded: no news
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
        update = {"complete": complete, "throughput_images_per_s": throughput}
        if complete:  # a finished group's shards are never written again (`--overwrite` builds a new one)
            failed = np.flatnonzero(np.isin(group["status"][:], FAILED))
            update["failed_rows"] = failed.tolist() if len(failed) <= MAX_FAILED_IN_ATTRS else None
        with self.storage.errors():
            group.update_attributes(update)
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

    def failed_rows(self, name: str) -> np.ndarray:
        """Rows whose image failed for one backbone (a status in `images.FAILED`), sorted. A
        finished group records them at completion; only older or failure-heavy groups are read
        status shard by status shard (on object storage, a request per shard)."""
        attrs = dict(self._features(name).attrs)
        if attrs.get("complete") and attrs.get("failed_rows") is not None:
            return np.asarray(attrs["failed_rows"], dtype=np.int64)
        return np.flatnonzero(np.isin(self.status(name), FAILED))

    def embeddings(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Rows of one backbone's embeddings as stored (float16 unless extracted as float32), NaN
        where the image failed or the row is not done yet. Read by `row_blocks`, a reader fetches
        each shard once."""
        return self.embedding_reader(name)(rows if rows is not None else slice(None))

    def embedding_reader(self, name: str) -> Callable[[slice], np.ndarray]:
        """`embeddings(name, rows)` for a caller reading many blocks: the group is looked up once
        (on object storage each lookup is requests for its metadata), each call reads its rows."""
        emb = self._features(name)["emb"]
        return lambda rows: emb[rows]

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


def _mismatch(path: str, name: str, old_strict: dict, strict: dict, old_shape: dict, shape: dict) -> str:
    """`prepare`'s refusal: what differs, or — where only keys an older fgembed did not record
    differ — how to re-extract the group."""
    changes = differences(old_strict, strict) + [f"{k}: {old_shape[k]} → {shape[k]}"
                                                 for k in shape if old_shape[k] != shape[k]]
    unknown = sorted(k for k in strict if k not in old_strict)
    if unknown and all(c.split(":")[0].split(".")[0] in unknown for c in changes):
        return (f"features {name!r} in {path} were written by an older fgembed that did not record "
                f"{', '.join(unknown)}, so they cannot be checked against this run; re-extract that group: "
                f"rerun with --overwrite (it replaces only {name!r})")
    return (f"features {name!r} in {path} were extracted differently — {'; '.join(changes)} "
            "(use --overwrite to replace them)")
