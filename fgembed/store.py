"""FeatureStore: the Zarr v3 layout of DESIGN.md, readable with plain `zarr`.

    samples/{id,label,split,path,<level>…}      one row per image, written once
    features/<key>/{emb,done,status}            one group per backbone

Every array is chunked by `shard_rows` rows, so a shard is exactly one chunk of each array:
separate processes can write disjoint shards without locks, and zarr's LocalStore writes each
chunk atomically (temp file + rename), so a kill leaves whole chunks or none. `done` for a shard
is written after its `emb` and `status`, so a set bit always covers finished data.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from . import __version__
from .datasets.table import SPLIT_NAMES, Level, SampleTable
from .errors import FgembedError
from .images import FAILED, STATUS_NAMES

DEFAULT_SHARD_ROWS = 256


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


@dataclass
class BackboneInfo:
    name: str
    dim: int
    dtype: str
    rows_done: int
    rows_failed: int
    complete: bool
    fingerprint: dict
    throughput: float | None


class FeatureStore:
    """One dataset's samples and the embeddings of any number of backbones."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise FgembedError(f"no feature store at {path}")
        group = zarr.open_group(path, mode=mode)
        if "samples" not in group:
            raise FgembedError(f"{path} is a Zarr group but not a feature store (no samples/)")
        return cls(path, group)

    @classmethod
    def create(cls, path: str | Path, table: SampleTable, shard_rows: int = DEFAULT_SHARD_ROWS,
               overwrite: bool = False) -> "FeatureStore":
        """Open the store for `table`, writing samples/ if new; refuse a different dataset."""
        path = Path(path)
        if (path / "zarr.json").is_file():
            store = cls.open(path, "r+")
            old = store.samples_attrs.get("manifest_sha256")
            if old == table.sha256():
                store.remove_partial_writes()
                return store
            if not overwrite:
                raise FgembedError(
                    f"store {path} holds another dataset ({store.samples_attrs.get('kind')} at "
                    f"{store.samples_attrs.get('root')}, {store.n_rows} rows); use --overwrite or another --store")
            shutil.rmtree(path)
        group = zarr.open_group(path, mode="w", attributes={"format": "fgembed-store", "version": 1})
        samples = group.create_group("samples")
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
        samples.attrs.update({
            "kind": table.kind, "root": table.root, "class_names": table.class_names,
            "levels": {k: v.names for k, v in table.levels.items()}, "split_codes": SPLIT_NAMES,
            "split_recipe": table.split_recipe, "provenance": table.provenance,
            "manifest_sha256": table.sha256(), "shard_rows": shard_rows, "fgembed_version": __version__,
        })
        group.create_group("features")
        return cls(path, group)

    def remove_partial_writes(self) -> None:
        """A kill mid-write can leave zarr's `*.partial` temp files; they are never data."""
        for stray in self.path.rglob("*.partial"):
            stray.unlink(missing_ok=True)

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
        if name not in self.group["samples"]:
            raise FgembedError(f"store {self.path} has no taxonomy level {level!r}; has: "
                               f"{', '.join(self.samples_attrs['levels']) or 'none'}")
        return self.group[f"samples/{name}"][:][self._split_mask(split)]

    @property
    def class_names(self) -> list[str]:
        return list(self.samples_attrs["class_names"])

    def table(self) -> SampleTable:
        """The stored rows as a SampleTable (what a later stage needs without the images)."""
        s, attrs = self.group["samples"], self.samples_attrs
        levels = {k: Level(s[k][:], names) for k, names in attrs["levels"].items()}
        return SampleTable(attrs["kind"], attrs["root"], s["id"][:], list(s["path"][:]), s["label"][:],
                           attrs["class_names"], s["split"][:], levels, attrs["split_recipe"],
                           attrs.get("provenance", {}))

    # ---- features ------------------------------------------------------------------------
    def _feature_groups(self) -> dict[str, zarr.Group]:
        return {dict(g.attrs)["name"]: g for _, g in self.group["features"].groups()}

    def backbones(self) -> list[str]:
        return sorted(self._feature_groups())

    def _features(self, name: str) -> zarr.Group:
        groups = self._feature_groups()
        if name not in groups:
            raise FgembedError(f"store {self.path} has no features {name!r}; has: "
                               f"{', '.join(sorted(groups)) or 'none'}")
        return groups[name]

    def prepare(self, name: str, fingerprint: dict, dim: int, dtype: str = "float16",
                overwrite: bool = False) -> None:
        """Create features/<name>, or check that the existing one has the same fingerprint."""
        key = _key(name)
        features = self.group["features"]
        if key in features:
            old = dict(features[key].attrs)
            if old.get("fingerprint") == fingerprint and old.get("dtype") == dtype:
                return
            if not overwrite:
                changes = _diff(old.get("fingerprint", {}), fingerprint)
                if old.get("dtype") != dtype:
                    changes.append(f"dtype: {old.get('dtype')} → {dtype}")
                raise FgembedError(f"features {name!r} in {self.path} were extracted differently — "
                                   f"{'; '.join(changes)} (use --overwrite to replace them)")
        n, rows = self.n_rows, self.shard_rows
        group = features.create_group(key, overwrite=True)
        group.create_array("emb", shape=(n, dim), chunks=(rows, dim), dtype=dtype, fill_value=np.nan)
        group.create_array("done", shape=(n,), chunks=(rows,), dtype="bool", fill_value=False)
        group.create_array("status", shape=(n,), chunks=(rows,), dtype="uint8", fill_value=0)
        group.attrs.update({"name": name, "dim": dim, "dtype": dtype, "fingerprint": fingerprint,
                            "complete": False, "status_codes": STATUS_NAMES})

    def pending_shards(self, name: str) -> list[int]:
        done = self._features(name)["done"][:]
        return [s for s in range(self.n_shards) if not done[self.shard_slice(s)].all()]

    def write_shard(self, name: str, shard: int, emb: np.ndarray, status: np.ndarray) -> None:
        """Write one whole shard; `done` last. Failed rows are NaN, never shifted."""
        group, rows = self._features(name), self.shard_slice(shard)
        emb = emb.astype(group["emb"].dtype, copy=True)
        emb[np.isin(status, FAILED)] = np.nan
        group["emb"][rows] = emb
        group["status"][rows] = status
        group["done"][rows] = True

    def mark_complete(self, name: str, throughput: float | None) -> bool:
        group = self._features(name)
        complete = bool(group["done"][:].all())
        group.attrs.update({"complete": complete, "throughput_images_per_s": throughput})
        return complete

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
        return BackboneInfo(name, attrs["dim"], attrs["dtype"], int(done.sum()),
                            int((done & np.isin(status, FAILED)).sum()), bool(attrs.get("complete")),
                            attrs["fingerprint"], attrs.get("throughput_images_per_s"))

    def failures(self, name: str) -> list[tuple[int, str, str]]:
        """(image id, path, status) for every row of `name` that is not plainly ok."""
        status = self.status(name)
        bad = np.flatnonzero(status != 0)
        ids, paths = self.group["samples/id"][:], self.group["samples/path"][:]
        return [(int(ids[i]), str(paths[i]), STATUS_NAMES.get(int(status[i]), str(status[i]))) for i in bad]
