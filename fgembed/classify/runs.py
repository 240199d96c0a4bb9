"""Run directories: one head configuration (all its seeds, and its lr × weight-decay grid)
trained on one view of a store.

    runs/<label>-<key>/
      config.json            format_version, fgembed_version, the RunConfig (view + head), the store identity,
                             holdout_classes and excluded_classes (store class ids)
      head-seed<S>.safetensors   the kept head's weights per seed (a state dict, never a pickle)
      projection.safetensors     PCA means/components of a `sum` view (when it has one)
      history.json           per seed, per epoch: train loss and validation F1 (the kept setting)
      metrics.json           test metrics: mean over seeds under flat keys, `<key>_std`, per seed;
                             dropped rows per split, the chosen lr / weight decay per seed
      logits.zarr/           {val,test}: [seeds, rows, classes] float16, chunked by rows;
                             {val,test}_rows: int64 store rows

`key` hashes the config and the store's identity (its rows' manifest and every member's
extraction fingerprint), so the same request is reused and a re-extraction is not. Neither
fgembed's version (recorded in config.json) nor the format version is in the key: a new release
or format reuses every run it can read (`READERS`) and retrains the rest in the same place. Nor is
a config field added since keys were first written, while it keeps its default (`run_key`): a
release that adds an option keeps every key. Keys computed while fgembed's version and the format
version were in the key (before git f05ce4b) are not looked up: such runs of the pre-release 0.1.0
are retrained once, under today's key (`run_key` says why).

A run is written to a temporary folder and swapped into place (the old one set aside first), so a
killed fit leaves either a whole run or none, and the next fit recovers it (`publish`,
`_remove_abandoned`): two fits of one key may race, and the one that publishes second reuses the
first's run.

Logits are predicted, masked and cast to float16 on the head's device and written by a thread
while the next block is predicted, one whole chunk per write (`_logits.write_logits`; figures in
benchmarks/README.md, `logits.py`).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from .. import __version__
from ..devices import release_freed_host_memory
from ..errors import FgembedError
from ..progress import Tick, progress_bar
from ..store import FeatureStore
from ._logits import LOGIT_ROWS, write_head_logits
from .fusion import PCASum
from .heads import HEADS, create_head
from .longtail import SHOT_BINS, by_frequency, parse_shot_bins
from .train import BALANCES, SECOND_STAGE_EPOCHS, selection
from .views import View, ViewConfig, build_view, level_key

if TYPE_CHECKING:
    import torch

# Bump when what a run directory holds changes, and add its reader to READERS. 3: a multi-level
# run's metrics.json has `decoder`, `selective` and `by_frequency` (format 2's multi-level runs
# lack some or all of them, depending on the day they were written: `_stale` marks them, so fit
# retrains them; a format-2 single-level run holds what format 3's does and is reused as it is).
FORMAT_VERSION = 3


@dataclass(frozen=True)
class HeadConfig:
    """What describes the head and its training (the view is described by ViewConfig)."""

    head: str = "mlp"               # a name in fgembed.classify.heads.HEADS
    level: str | None = None        # target level; None = fine label ('species' alias)
    epochs: int = 150
    lr: tuple[float, ...] = (1e-3,)
    weight_decay: tuple[float, ...] = (0.01,)
    batch_size: int = 128
    dropout: float = 0.5
    hidden: tuple[int, ...] = (512, 256)
    seeds: tuple[int, ...] = (0,)
    balance: str = "none"           # a name in fgembed.classify.train.BALANCES (trained heads only)
    shot_bins: tuple[int, int] = SHOT_BINS  # few < LOW ≤ medium ≤ HIGH < many, for by_frequency
    levels: tuple[str, ...] = ()    # coarse → fine taxonomy levels (multi-level head); () = one level
    hierarchy: str = "shared"       # a name in fgembed.classify.hierarchy.HIERARCHIES (with levels only)
    level_weights: tuple[float, ...] | None = None  # per-level loss weights (with levels only)

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
        fix("seeds", tuple(int(s) for s in as_tuple(self.seeds)))
        fix("hidden", tuple(int(h) for h in as_tuple(self.hidden)))
        fix("lr", tuple(float(v) for v in as_tuple(self.lr)))
        fix("weight_decay", tuple(float(v) for v in as_tuple(self.weight_decay)))
        fix("level", level_key(self.level))
        fix("shot_bins", parse_shot_bins(",".join(str(v) for v in as_tuple(self.shot_bins))))
        if self.balance not in BALANCES:
            raise FgembedError(f"unknown --balance {self.balance!r}; choose from {', '.join(BALANCES)}")
        if self.balance != "none" and "epochs" not in self.head_params():
            raise FgembedError(f"--balance {self.balance} re-balances a trained head; {self.head} is not trained")
        if self.head not in HEADS:
            create_head(self.head)  # raises the one-line error with close names
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise FgembedError(f"seeds must be distinct and at least one; got {self.seeds}")
        for name in ("lr", "weight_decay"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise FgembedError(f"--{name.replace('_', '-')} values must be distinct and at least one; got {values}")
        if any(v <= 0 for v in self.lr) or any(v < 0 for v in self.weight_decay):
            raise FgembedError(f"learning rates must be > 0 and weight decays ≥ 0; got {self.lr}, {self.weight_decay}")
        if int(self.epochs) < 1 or int(self.batch_size) < 2:
            raise FgembedError(f"epochs must be ≥ 1 and batch size ≥ 2; got {self.epochs}, {self.batch_size}")
        self._fix_levels(fix, as_tuple)
        # settings the head does not take cannot matter: reset, so they never split a key
        accepted = self.head_params()
        defaults = HeadConfig.__dataclass_fields__
        for name in ("dropout", "hidden", "epochs", "batch_size", "lr", "weight_decay"):
            if name not in accepted:
                fix(name, defaults[name].default)

    def _fix_levels(self, fix, as_tuple) -> None:
        """Canonical multi-level settings ('species' → 'label'); without levels they reset, so a
        single-level run's key never changes."""
        from .hierarchy import HIERARCHIES, list_hierarchies
        levels = tuple("label" if level_key(v) is None else str(v) for v in as_tuple(self.levels) if v != "")
        fix("levels", levels)
        if not levels:
            fix("hierarchy", "shared")
            fix("level_weights", None)
            return
        if self.hierarchy not in HIERARCHIES:
            raise FgembedError(f"unknown --hierarchy {self.hierarchy!r}; choose from {', '.join(list_hierarchies())}")
        if len(levels) < 2 or len(set(levels)) != len(levels):
            raise FgembedError(f"--levels needs two or more distinct levels, coarse to fine; got {','.join(levels)}")
        if self.head != "mlp" or self.balance != "none" or self.level is not None:
            raise FgembedError("--levels trains the MLP head on every level; "
                               "it takes no other --head, --balance or --level")
        if self.level_weights is not None:
            weights = tuple(float(w) for w in as_tuple(self.level_weights))
            if len(weights) != len(levels) or min(weights) < 0:
                raise FgembedError(f"--level-weights needs {len(levels)} values ≥ 0 (one per level); got "
                                   f"{','.join(map(str, weights))}")
            fix("level_weights", weights)

    @property
    def total_epochs(self) -> int:
        """Epochs a progress bar counts: `second-stage` adds its balanced epochs."""
        return self.epochs + (SECOND_STAGE_EPOCHS if self.balance == "second-stage" else 0)

    def head_params(self) -> set[str]:
        return set(inspect.signature(HEADS[self.head].__init__).parameters) - {"self"}


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes a run's numbers (the device does not, by design)."""

    view: ViewConfig
    head: HeadConfig = HeadConfig()

    def __post_init__(self) -> None:
        if self.head.levels and self.view.learned_projection:  # the multi-level heads have no projection layer
            raise FgembedError("--levels trains on a fixed view; a learned --project linear sum needs a single-level "
                               "head: use --project pca")

    @property
    def label(self) -> str:
        head = ("" if self.head.head == "mlp" else f"@{self.head.head}")
        head += f"@{self.head.hierarchy}" if self.head.levels else ""
        return re.sub(r"[^\w.+-]", "_", self.view.label + head)

    def to_json(self) -> dict:
        return {"view": dataclasses.asdict(self.view), "head": dataclasses.asdict(self.head)}

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        return cls(ViewConfig(**data["view"]), HeadConfig(**data["head"]))

    def make_head(self, dims: list[int], device: str):
        """The head estimator, at the grid's first setting (fit_grid is given the whole grid)."""
        h = self.head
        values = {"lr": h.lr[0], "weight_decay": h.weight_decay[0], "batch_size": h.batch_size, "epochs": h.epochs,
                  "dropout": h.dropout, "hidden": h.hidden, "random_state": h.seeds[0], "device": device}
        if self.view.learned_projection:
            values.update(sum_blocks=tuple(dims), sum_dim=self.view.project_dim)
        accepted = h.head_params()
        return create_head(h.head, **{k: v for k, v in values.items() if k in accepted})


def store_identity(store: FeatureStore, features: tuple[str, ...]) -> dict:
    """What a run's numbers depend on in the store, all of it in the run key: its rows (ids,
    paths, labels, splits: `manifest_sha256`), the image files they were read from (`content_sha256`:
    every file's size and mtime and a sampled content hash, so two stores of the same listing whose
    images differ never share a run), and per member how it was extracted and which of its rows
    failed (`failed_sha256`: a store whose extraction flagged other rows trains on other rows)."""
    identity = {"manifest_sha256": store.samples_attrs["manifest_sha256"],
                "content_sha256": store.content_sha256(), "features": {}}
    for name in features:
        info = store.backbone_info(name)
        identity["features"][name] = {"fingerprint": info.fingerprint, "dtype": info.dtype,
                                      "failed_sha256": hashlib.sha256(store.status(name).tobytes()).hexdigest()}
    return identity


def same_rows(a: dict, b: dict) -> bool:
    """Whether two runs' store identities are of the same rows and images (their members may differ)."""
    return all(a.get(k) == b.get(k) for k in ("manifest_sha256", "content_sha256"))


# The config fields when run keys were first hashed (every field was hashed then): always keyed,
# so the keys of those runs stay as they were. A field added since is keyed only when it differs
# from its default (one that keeps the old behaviour), so adding it keeps every existing key.
# Changing a default therefore needs a key change or migration: tests/test_runs.py pins them.
ALWAYS_KEYED = {
    "view": frozenset({"features", "fusion", "project", "project_dim", "l2", "classes", "holdout", "holdout_level",
                       "holdout_seed", "shots", "draw"}),
    "head": frozenset({"head", "level", "epochs", "lr", "weight_decay", "batch_size", "dropout", "hidden", "seeds",
                       "balance", "shot_bins", "levels", "hierarchy", "level_weights"}),
}


def keyed_fields(config, always: frozenset[str]) -> dict:
    """The fields of a config dataclass that go into its run key: `always`, and any other whose
    value differs from its declared default."""
    keyed = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in always or default is dataclasses.MISSING or value != default:
            keyed[f.name] = value
    return keyed


def run_key(config: RunConfig, identity: dict) -> str:
    """What was asked (config) of which data (store identity) — not how or by which release it is
    stored: a format change reads old runs through `READERS` or retrains them at the same path.

    Runs keyed by the formula before this one (it also hashed fgembed's version and the format
    version; git f05ce4b dropped them) are not found here: they are retrained once, and their old
    folders stay readable by `Run.load` (`fgembed predict --run DIR`). No legacy-key fallback: it
    would keep two retired formulas (format 1's flat config; format 2's with the version) alive
    for runs that only the unreleased 0.1.0 wrote, in the fit path of every run."""
    keyed = {part: keyed_fields(getattr(config, part), ALWAYS_KEYED[part]) for part in ("view", "head")}
    blob = json.dumps({"config": keyed, "store": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class Run:
    """A finished run directory."""

    path: Path
    config: RunConfig
    metrics: dict
    store: dict = field(default_factory=dict)
    reused: bool = False
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """A finished run of a format in `READERS` (older ones upgraded in memory, the directory
        untouched); anything else is one line naming it (`finished`: unfinished, so retrained)."""
        path = Path(path)
        if not (path / "metrics.json").is_file():
            raise FgembedError(f"{path} is not a finished run (no metrics.json)")
        try:
            meta = json.loads((path / "config.json").read_text())
            version = meta.get("format_version", 1)  # format 1 did not record its version
            if version not in READERS:
                raise ValueError(f"format {version!r}; this fgembed reads formats {sorted(READERS)}")
            meta = READERS[version](path, meta)
            config = RunConfig.from_json(meta["config"])
            metrics = json.loads((path / "metrics.json").read_text())
            store = meta["store"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, FgembedError) as exc:
            raise FgembedError(f"{path} cannot be read as a run ({type(exc).__name__}: {exc}); "
                               "fgembed fit retrains it") from None
        return cls(path, config, metrics, store, meta=meta)

    @property
    def store_path(self) -> Path:
        return Path(self.meta["store_path"])

    def _logits_group(self) -> zarr.Group:
        return zarr.open_group(self.path / "logits.zarr", mode="r")

    def logits(self, split: str, level: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, [seeds, rows, classes] float16 logits) of the val or test split — whole;
        at scale read them with `iter_logits`. `level` reads a multi-level run's `<level>/<split>`."""
        group = self._logits_group()
        return group[f"{split}_rows"][:], group[f"{level}/{split}" if level else split][:]

    def rows(self, split: str) -> np.ndarray:
        return self._logits_group()[f"{split}_rows"][:]

    def iter_logits(self, split: str, block_rows: int = LOGIT_ROWS) -> Iterator[tuple[slice, np.ndarray]]:
        """(positions in the split's rows, [seeds, block, classes] float16) block by block."""
        array = self._logits_group()[split]
        for start in range(0, array.shape[1], block_rows):
            positions = slice(start, min(start + block_rows, array.shape[1]))
            yield positions, array[:, positions]

    def history(self) -> dict[str, list[dict]]:
        return json.loads((self.path / "history.json").read_text())

    def excluded_classes(self) -> np.ndarray:
        """Logit columns the heads cannot know (unselected or held-out classes): masked."""
        return np.asarray(self.meta.get("excluded_classes", []), np.int64)

    def load_projection(self) -> PCASum | None:
        return load_projection(self.path)

    def load_heads(self, device: str = "cpu") -> list:
        """The kept head of every seed, rebuilt from its saved state dict (a multi-level run's:
        its `hierarchy` module, whose forward gives one logit tensor per level)."""
        if self.config.head.levels:
            from .level_runs import load_modules
            return load_modules(self, device)
        dims, n_classes = self.meta["dims"], self.meta["n_classes"]
        template = self.config.make_head(dims, device)
        input_dim = self.metrics["input_dim"]
        heads = []
        for seed in self.config.head.seeds:
            state = load_torch(str(self.path / f"head-seed{seed}.safetensors"), device="cpu")
            params = template.get_params()
            if "random_state" in params:
                params["random_state"] = seed
            head = type(template).from_state(params, input_dim, n_classes, state)
            heads.append(_to_device(head, device))
        return heads


def _to_device(head, device: str):
    module = getattr(head, "module_", None)
    if module is not None:
        from ..devices import resolve_device
        module.to(resolve_device(device))
    return head


def load_projection(run_dir: str | Path) -> PCASum | None:
    """The PCA sum projection saved in a run directory (None when its view has none)."""
    path = Path(run_dir) / "projection.safetensors"
    return PCASum.from_arrays(load_numpy(str(path))) if path.is_file() else None


def _read_format1(path: Path, meta: dict) -> dict:
    """Format 1: a flat RunConfig (no view options beyond fusion), float32 logits (read as they
    are), no class selection or hold-out. Same numbers, stored otherwise: upgraded to today's meta."""
    flat = meta["config"]
    view = {k: flat[k] for k in ("features", "fusion", "project", "project_dim", "l2")}
    head = {k: flat[k] for k in ("head", "level", "epochs", "lr", "weight_decay", "batch_size", "dropout",
                                 "hidden", "seeds")}
    dims = None  # not recorded; only a learned projection needs them, and its weights hold them
    if view["fusion"] == "sum" and view["project"] == "linear":
        with safe_open(str(path / f"head-seed{head['seeds'][0]}.safetensors"), framework="np") as f:
            dims = [f.get_slice(f"0.projections.{i}.weight").get_shape()[1] for i in range(len(view["features"]))]
    n_classes = zarr.open_group(path / "logits.zarr", mode="r")["test"].shape[2]
    return meta | {"format_version": 1, "config": {"view": view, "head": head}, "dims": dims, "n_classes": n_classes}


# format version → how a run directory of that format is read (its meta upgraded to today's).
# A format whose runs mean something else (not just stored otherwise) has no reader: retrained.
READERS: dict[int, Callable[[Path, dict], dict]] = {
    1: _read_format1, 2: lambda path, meta: meta, FORMAT_VERSION: lambda path, meta: meta}


def _stale(run: Run) -> bool:
    """A readable run that fit retrains rather than reuses: a multi-level run before format 3
    lacks today's `decoder`, `selective` or `by_frequency` metrics (it still loads, for predict).
    A format-2 single-level run holds what format 3's does."""
    return bool(run.config.head.levels) and run.meta.get("format_version", 1) < 3


def run_path(store: FeatureStore, config: RunConfig, runs_dir: str | Path) -> tuple[Path, dict]:
    identity = store_identity(store, config.view.features)
    return Path(runs_dir) / f"{config.label}-{run_key(config, identity)}", identity


def check_levels(store: FeatureStore, config: RunConfig) -> None:
    """Refuse a taxonomy level the store lacks in one line, before any view is read or bar drawn."""
    has = store.samples_attrs["levels"]
    named = [config.head.level, *config.head.levels, config.view.holdout_level]
    missing = [lv for lv in named if level_key(lv) is not None and lv not in has]
    if missing:
        raise FgembedError(f"store {store.path} has no taxonomy level {missing[0]!r}; has: {', '.join(has) or 'none'}")


def finished(path: Path) -> Run | None:
    """The finished run at `path`, or None (absent, unfinished, or of a format this fgembed cannot
    read: retrained, never a crash). A run a killed `publish` left behind is recovered first."""
    _remove_abandoned(path)
    if not (path / "metrics.json").is_file():
        return None
    return _reusable(path)


def fit_run(store: FeatureStore, config: RunConfig, runs_dir: str | Path, device: str = "auto",
            force: bool = False, progress: bool = False, *, view: View | None = None,
            tick: Tick | None = None) -> Run:
    """Train `config` on `store` (seeds × lr × weight decay in one pass) or reuse the finished
    run of the same key. `view` reuses an already built view of the same ViewConfig; `tick`
    reports epochs to a caller's progress bar instead of this run's own."""
    check_levels(store, config)
    path, identity = run_path(store, config, runs_dir)
    if not force and (run := finished(path)) is not None:
        return run
    if view is not None and view.config != config.view:
        raise FgembedError("fit_run was given a view of another configuration")
    if tick is not None:
        view = view or build_view(store, config.view, progress=False, device=device)
        return _train(store, config, view, identity, path, device, tick, force)
    view = view or build_view(store, config.view, progress=progress, device=device)
    with progress_bar(config.head.total_epochs, config.label, enabled=progress, unit="epoch") as own:
        return _train(store, config, view, identity, path, device, own, force)


def _train(store: FeatureStore, config: RunConfig, view: View, identity: dict, path: Path, device: str,
           on_epoch: Callable[..., None], force: bool = False) -> Run:
    h, level = config.head, config.head.level
    if h.levels:  # one multi-level model per seed (fgembed.classify.hierarchy); written by level_runs
        from .level_runs import train_levels
        return train_levels(store, config, view, identity, path, device, on_epoch, force)
    y_train, y_val, y_test = (view.labels(s, level) for s in ("train", "val", "test"))
    n_classes = view.n_classes(level)
    release_freed_host_memory()  # the view's reading scratch: each phase's peak starts from the rows alone
    started = time.perf_counter()
    head = config.make_head(view.dims, device)
    if getattr(head, "needs_text", False):  # the zero-shot head's weights are the stored text embeddings
        text, scale = view.text()
        head.set_params(text_embeddings=text, logit_scale=scale)
    heads = head.fit_grid(view.X("train"), y_train, view.X("val"), y_val, seeds=list(h.seeds), lrs=list(h.lr),
                          weight_decays=list(h.weight_decay), n_classes=n_classes, on_epoch=on_epoch,
                          **({"balance": h.balance} if h.balance != "none" else {}))
    seconds = time.perf_counter() - started
    excluded = view.excluded_classes(level)

    release_freed_host_memory()  # the training batches' scratch, before the logits' blocks
    tmp = temp_dir(path)
    group = zarr.open_group(tmp / "logits.zarr", mode="w")
    seen = ~view.novel
    X = {split: view.X(split) for split in ("val", "test")}
    per_seed, preds = write_head_logits(group, [f.module_ for f in heads], X, view.rows, excluded, n_classes,
                                        y_test, seen)
    train_counts = view.class_counts("train", level)
    for metrics_k, pred in zip(per_seed, preds):  # argmax of the stored float16 test logits, seen rows only
        metrics_k["by_frequency"] = frequency_metrics(y_test[seen], pred[seen], train_counts, h.shot_bins)
    save_weights(tmp, {seed: fitted.module_ for seed, fitted in zip(h.seeds, heads)}, view.projection)
    (tmp / "history.json").write_text(json.dumps({str(s): getattr(f, "history_", []) for s, f in zip(h.seeds, heads)}))
    meta = {"format_version": FORMAT_VERSION, "fgembed_version": __version__, "config": config.to_json(),
            "store": identity, "store_path": str(store.path), "dims": view.dims, "n_classes": n_classes,
            "holdout_classes": view.holdout_classes, "excluded_classes": excluded.tolist(),
            "selection": selection(h.balance)}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    metrics = summarise(per_seed) | {
        "seeds": list(h.seeds), "per_seed": per_seed,
        "best_epoch": [getattr(f, "best_epoch_", None) for f in heads],
        "best_val_f1": [getattr(f, "best_val_f1_", None) for f in heads],
        "chosen": [getattr(f, "chosen_", None) for f in heads],
        **view_counts(view, seen), "train_seconds": seconds,
    }
    if len(h.lr) * len(h.weight_decay) > 1:
        metrics["grid"] = [getattr(f, "grid_", None) for f in heads]
    return publish(tmp, path, metrics, Run(path, config, metrics, identity, meta=meta), replace=force)


def view_counts(view: View, seen: np.ndarray) -> dict:
    """The rows a run saw, per split, and what the view left out or held out (metrics.json)."""
    counts = {"n_train": len(view.rows["train"]), "n_val": len(view.rows["val"]), "n_test": int(seen.sum()),
              "dropped": view.dropped, "test_rows_dropped": view.dropped["test"], "input_dim": view.input_dim}
    if view.holdout_classes:
        counts |= {"holdout_classes": view.holdout_classes, "n_novel": int(view.novel.sum())}
    return counts


def temp_dir(path: Path) -> Path:
    """A fresh temporary folder beside the run's place, named for this host and process, after
    clearing what abandoned fits left there (`_remove_abandoned`)."""
    _remove_abandoned(path)
    tmp = path.with_name(f".{path.name}.tmp-{_owner()}")
    tmp.mkdir(parents=True)
    return tmp


def save_weights(tmp: Path, modules: dict[int, torch.nn.Module], projection: PCASum | None) -> None:
    """What a run's predictions are rebuilt from (`Run.load_heads`, `views.design_rows`), for
    single- and multi-level runs alike: each seed's kept module as `head-seed<S>.safetensors` (a
    state dict, never a pickle) and a PCA sum view's fitted projection."""
    for seed, module in modules.items():
        save_torch({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                   str(tmp / f"head-seed{seed}.safetensors"))
    if projection is not None:
        save_numpy(projection.arrays(), str(tmp / "projection.safetensors"))


def frequency_metrics(y_true: np.ndarray, y_pred: np.ndarray, train_counts: np.ndarray,
                      bins: tuple[int, int]) -> dict[str, dict]:
    """`longtail.by_frequency` as metrics.json holds it: an empty bin's accuracy is null (NaN is
    not JSON, and never equals itself)."""
    return {name: {k: None if np.isnan(v) else v for k, v in b.items()}
            for name, b in by_frequency(y_true, y_pred, train_counts, bins).items()}


def publish(tmp: Path, path: Path, metrics: dict, run: Run, replace: bool = False) -> Run:
    """Write metrics.json last, then swap the finished temp folder into the run's place: a run
    already there is renamed aside first and removed last, so a crash at any step leaves a whole
    run in place, aside or in the temp folder (`_remove_abandoned` recovers it) — never none.

    Two fits of one key may race. Unless `replace` (`--force`), a readable run that another fit
    published while this one trained is kept: ours is dropped and theirs returned, as a reused
    run (a reader of it is never pulled from under). If both find the place empty, the second
    rename onto it fails, since a folder is already there, and ends the same way."""
    if not replace and (theirs := _reusable(path)) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return theirs
    (tmp / "metrics.json.part").write_text(json.dumps(metrics, indent=2))
    os.replace(tmp / "metrics.json.part", tmp / "metrics.json")  # whole or absent: it marks a finished run
    aside: Path | None = path.with_name(f".{path.name}.old-{_owner()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        aside = None  # nothing to set aside
    try:
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        for ours in (tmp, aside):
            if ours is not None:
                shutil.rmtree(ours, ignore_errors=True)
        theirs = Run.load(path)
        theirs.reused = True
        return theirs
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return run


HOST = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "localhost"  # in leftover names: whose pid it is
FOREIGN_ABANDONED_S = 24 * 3600  # another host's leftover untouched this long is abandoned (see _remove_abandoned)
_LEFTOVER = r"(?P<kind>tmp|old)-(?:(?P<host>[\w.-]+)-)?(?P<pid>\d+)"


def _owner() -> str:
    return f"{HOST}-{os.getpid()}"


def _reusable(path: Path) -> Run | None:
    """The run at `path` as a reused run, or None (absent, unreadable or stale: retrained)."""
    try:
        run = Run.load(path)
    except FgembedError:
        return None
    if _stale(run):
        return None
    run.reused = True
    return run


def _remove_abandoned(path: Path) -> None:
    """Recover or clear what killed or interrupted fits of this key left beside it:

    - a temp folder holding metrics.json is a whole run whose `publish` was killed between its
      renames: it goes into the run's place when no finished run is there (the newest first);
    - a run `publish` set aside goes back into place when nothing finished is there;
    - everything else of theirs goes.

    Whose a leftover is, its name says: `.<run>.{tmp,old}-<host>-<pid>`. On this host, one of a
    live process (a fit of the same key running now) is left alone. A pid means nothing on another
    host (a runs folder shared over the network), so another host's leftover is abandoned only once
    untouched (mtime and ctime, which a rename sets) for FOREIGN_ABANDONED_S: a day, against the
    minutes a fit holds its temp folder (it is made after training, for the logits' writing).
    A name without a host (fgembed before hosts were named) counts as this host's; a name not
    ending in a pid is not one fgembed writes: left alone."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_LEFTOVER}")
    found = []
    for leftover in path.parent.glob(f".{path.name}.*"):
        match = pattern.fullmatch(leftover.name)
        if match is not None and (stamp := _touched(leftover)) is not None and _abandoned(match, stamp):
            found.append((match["kind"] != "tmp", -stamp, leftover))
    for _, _, leftover in sorted(found):  # temp folders (a newer run) before asides, newest first
        if not (path / "metrics.json").is_file() and (leftover / "metrics.json").is_file():
            shutil.rmtree(path, ignore_errors=True)  # an unfinished folder in the run's place, if any
            try:
                os.rename(leftover, path)
            except OSError as exc:  # another process recovered this key first: its run stands
                if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _touched(path: Path) -> float | None:
    """When a folder was last changed (its contents or its name), or None once it is gone."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return max(info.st_mtime, info.st_ctime)


def _abandoned(match: re.Match, touched: float) -> bool:
    if match["host"] not in (None, HOST):
        return time.time() - touched > FOREIGN_ABANDONED_S
    pid = int(match["pid"])
    return pid == os.getpid() or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no pid can be
        return False
    except PermissionError:
        return True
    return True


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds under each metric's own key, and the standard deviation as `<key>_std`."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        if isinstance(per_seed[0][key], dict):  # nested blocks keep the same flat convention inside
            out[key] = summarise([m[key] for m in per_seed])
            continue
        # None: no value for that seed (an empty shot bin; mistake severity of a seed with no mistake)
        values = np.array([m[key] for m in per_seed if m[key] is not None])
        if not len(values):
            out[key], out[f"{key}_std"] = None, None
            continue
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out
