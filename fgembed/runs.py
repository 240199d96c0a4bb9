"""Run directories: one trained head (all its seeds) on one fusion view of a store.

    runs/<label>-<key>/
      config.json            the resolved RunConfig + the store identity it was trained on
      head-seed<S>.safetensors   head weights per seed (a state dict, never a pickled object)
      projection.safetensors     PCA means/components of a `sum` fusion (when it has one)
      history.json           per seed, per epoch: train loss and validation F1
      metrics.json           test metrics: mean over seeds under flat keys, `<key>_std`, per seed
      logits.zarr/           {val,test}: [seeds, rows, classes] float32; {val,test}_rows: store rows

`key` hashes the config together with the store's identity (its rows' manifest and every
member's extraction fingerprint), so the same request is reused and a re-extraction is not.
A run is written to a temporary folder and renamed into place, so a killed fit leaves either a
whole run or none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from .errors import FgembedError
from .fusion import PROJECTIONS, Members, PCASum, concat, l2_normalise
from .heads import LinearHead, MLPHead
from .metrics import classification_metrics
from .progress import progress_bar
from .store import FeatureStore

FUSIONS = ("single", "concat", "sum")
HEADS = ("mlp", "linear")


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes a run's numbers (the device does not, by design)."""

    features: tuple[str, ...]
    fusion: str = "single"
    head: str = "mlp"
    project: str = "pca"            # sum only: pca (fitted on train rows) or linear (learned)
    project_dim: int | None = None  # sum only: default the smallest member dim
    l2: bool = False                # concat/sum: L2-normalise each member first
    level: str | None = None        # train on a taxonomy level instead of the fine label
    epochs: int = 150
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    dropout: float = 0.5
    hidden: tuple[int, ...] = (512, 256)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        fix("features", tuple(self.features))
        fix("seeds", tuple(int(s) for s in self.seeds))
        fix("hidden", tuple(int(h) for h in self.hidden))
        if self.fusion not in FUSIONS:
            raise FgembedError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.head not in HEADS:
            raise FgembedError(f"unknown head {self.head!r}; choose one of {', '.join(HEADS)}")
        if self.project not in PROJECTIONS:
            raise FgembedError(f"unknown projection {self.project!r}; choose one of {', '.join(PROJECTIONS)}")
        if len(self.features) == 1 and self.fusion != "single":
            fix("fusion", "single")
        if len(self.features) > 1 and self.fusion == "single":
            raise FgembedError(f"{len(self.features)} features need a fusion: --fusion concat or sum")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise FgembedError(f"seeds must be distinct and at least one; got {self.seeds}")
        # settings that cannot matter are reset, so they cannot split one run into two keys
        if self.fusion != "sum":
            fix("project", "pca")
            fix("project_dim", None)
        if self.fusion == "single":
            fix("l2", False)
        if self.head == "linear":
            fix("dropout", 0.5)
            fix("hidden", (512, 256))

    @property
    def label(self) -> str:
        members = "+".join(self.features)
        name = members if self.fusion == "single" else f"{self.fusion}-{members}"
        return re.sub(r"[^\w.+-]", "_", name)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        return cls(**data)

    def make_head(self, dims: list[int], device: str) -> MLPHead | LinearHead:
        common = dict(lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size, epochs=self.epochs,
                      random_state=self.seeds[0], device=device)
        if self.fusion == "sum" and self.project == "linear":
            common.update(sum_blocks=tuple(dims), sum_dim=self.project_dim)
        if self.head == "linear":
            return LinearHead(**common)
        return MLPHead(hidden=self.hidden, dropout=self.dropout, **common)


def store_identity(store: FeatureStore, features: tuple[str, ...]) -> dict:
    """What a run's numbers depend on in the store: its rows and how each member was extracted."""
    identity = {"manifest_sha256": store.samples_attrs["manifest_sha256"], "features": {}}
    for name in features:
        info = store.backbone_info(name)
        identity["features"][name] = {"fingerprint": info.fingerprint, "dtype": info.dtype}
    return identity


def run_key(config: RunConfig, identity: dict) -> str:
    blob = json.dumps({"config": config.to_json(), "store": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class Run:
    """A finished run directory."""

    path: Path
    config: RunConfig
    metrics: dict
    store: dict = field(default_factory=dict)
    reused: bool = False

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "metrics.json").is_file():
            raise FgembedError(f"{path} is not a finished run (no metrics.json)")
        meta = json.loads((path / "config.json").read_text())
        return cls(path, RunConfig.from_json(meta["config"]), json.loads((path / "metrics.json").read_text()),
                   meta["store"])

    def logits(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, [seeds, rows, classes] logits) of the val or test split."""
        group = zarr.open_group(self.path / "logits.zarr", mode="r")
        return group[f"{split}_rows"][:], group[split][:]

    def history(self) -> dict[str, list[dict]]:
        return json.loads((self.path / "history.json").read_text())


def fit_run(store: FeatureStore, config: RunConfig, runs_dir: str | Path, device: str = "auto",
            force: bool = False, progress: bool = False) -> Run:
    """Train `config` on `store` (all seeds in one pass) or reuse the finished run of the same key."""
    identity = store_identity(store, config.features)
    path = Path(runs_dir) / f"{config.label}-{run_key(config, identity)}"
    if not force and (path / "metrics.json").is_file():
        run = Run.load(path)
        run.reused = True
        return run
    with progress_bar(config.epochs, config.label, enabled=progress, unit="epoch") as tick:
        return _train(store, config, identity, path, device, tick)


def _train(store: FeatureStore, config: RunConfig, identity: dict, path: Path, device: str,
           on_epoch: Callable[[int], None]) -> Run:
    members = Members.load(store, list(config.features), level=config.level)
    rows = {split: members.rows(split) for split in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        if len(rows[split]) == 0:
            hint = " (extract with --val-fraction > 0)" if split == "val" else ""
            raise FgembedError(f"store {store.path} has no usable {split} rows{hint}")
    X, projection = _design_matrix(members, config, rows["train"])
    y = members.labels.astype(np.int64)
    n_classes = len(store.class_names) if config.level is None else len(store.samples_attrs["levels"][config.level])

    started = time.perf_counter()
    head = config.make_head(members.dims, device)
    heads = head.fit_seeds(X[rows["train"]], y[rows["train"]], list(config.seeds), X[rows["val"]], y[rows["val"]],
                           n_classes=n_classes, on_epoch=on_epoch)
    seconds = time.perf_counter() - started

    _remove_abandoned(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    logits = zarr.open_group(tmp / "logits.zarr", mode="w")
    per_seed = []
    for split in ("val", "test"):
        stacked = np.stack([h.predict_logits(X[rows[split]]) for h in heads])
        logits.create_array(split, data=stacked)
        logits.create_array(f"{split}_rows", data=rows[split].astype(np.int64))
        if split == "test":
            per_seed = [classification_metrics(z, y[rows["test"]]) for z in stacked]
    for seed, h in zip(config.seeds, heads):
        save_torch({k: v.detach().cpu().contiguous() for k, v in h.module_.state_dict().items()},
                   str(tmp / f"head-seed{seed}.safetensors"))
    if projection is not None:
        save_numpy(projection.arrays(), str(tmp / "projection.safetensors"))
    (tmp / "history.json").write_text(json.dumps({str(s): h.history_ for s, h in zip(config.seeds, heads)}))
    (tmp / "config.json").write_text(json.dumps({"config": config.to_json(), "store": identity,
                                                 "store_path": str(store.path)}, indent=2))
    metrics = summarise(per_seed) | {
        "seeds": list(config.seeds), "per_seed": per_seed,
        "best_epoch": [h.best_epoch_ for h in heads], "best_val_f1": [h.best_val_f1_ for h in heads],
        "n_train": len(rows["train"]), "n_val": len(rows["val"]), "n_test": len(rows["test"]),
        "test_rows_dropped": members.dropped("test"), "input_dim": int(X.shape[1]), "train_seconds": seconds,
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return Run(path, config, metrics, identity)


def _remove_abandoned(path: Path) -> None:
    """Temp folders of fits that were killed or interrupted (their process is gone) are never runs."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = int(tmp.name.rsplit("-", 1)[1])
        if pid != os.getpid() and _alive(pid):
            continue  # another process is fitting the same configuration right now
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _design_matrix(members: Members, config: RunConfig, train_rows: np.ndarray) -> tuple[np.ndarray, PCASum | None]:
    """The head's input for every row: one member, the concatenation, or the PCA sum.
    (Learned-projection `sum` gets the concatenation; the head's SumProjection does the rest.)"""
    if config.fusion == "single":
        return members.features[0], None
    if config.fusion == "concat" or config.project == "linear":
        return concat(members.features, l2=config.l2), None
    features = [np.nan_to_num(f) for f in members.features]  # rows unusable anywhere are never read
    if config.l2:
        features = [l2_normalise(f) for f in features]
    projection = PCASum(config.project_dim).fit([f[train_rows] for f in features])
    return projection.transform(features), projection


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds under each metric's own key, and the standard deviation as `<key>_std`."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        values = np.array([m[key] for m in per_seed])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out
