"""Run directories: one head configuration (all its seeds, and its lr × weight-decay grid)
trained on one view of a store, as it lies on disk.

    runs/<label>-<key>/
      config.json            format_version, fgembed_version, the RunConfig (view + head), the store identity,
                             holdout_classes and excluded_classes (store class ids)
      head-seed<S>.safetensors   the kept head's weights per seed (a state dict, never a pickle)
      projection.safetensors     the fitted state of the view's fusion (a PCA sum's means and components)
      history.json           per seed, per epoch: train loss and validation F1 (the kept setting)
      metrics.json           test metrics: mean over seeds under flat keys, `<key>_std`, per seed;
                             dropped rows per split, the chosen lr / weight decay per seed
      logits.zarr/           [<level>/]{val,test}: [seeds, rows, classes] float16, chunked by rows;
                             {val,test}_rows: int64 store rows

A directory written by an older fgembed is read through its format's reader (`READERS`) or, when
it cannot be, retrained in the same place — never a crash. A run is written to a temporary folder
and swapped into place (the old one set aside first), so a killed fit leaves either a whole run
or none, and the next fit recovers it (`publish`, `_remove_abandoned`): two fits of one key may
race, and the one that publishes second reuses the first's run.
"""
from __future__ import annotations

import errno
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

from ..devices import resolve_device
from ..errors import FgembedError
from ..store import FeatureStore
from ._logits import LOGIT_ROWS
from .config import RunConfig
from .fusion import Fusion, create_fusion
from .hierarchy import create_hierarchy
from .views import ViewConfig

if TYPE_CHECKING:
    import torch

# Bump when what a run directory holds changes, and add its reader to READERS. 3: a multi-level
# run's metrics.json has `decoder`, `selective` and `by_frequency` (format 2's multi-level runs
# lack some or all of them, depending on the day they were written: `_stale` marks them, so fit
# retrains them; a format-2 single-level run holds what format 3's does and is reused as it is).
FORMAT_VERSION = 3


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
    def store_path(self) -> Path | str:
        """The training store: its folder (resolved since runs record it so) or its URL."""
        where = self.meta["store_path"]
        return where if "://" in where else Path(where)

    def open_store(self, storage_options: dict | None = None) -> FeatureStore:
        """The store this run was trained on (ensembles and novelty read its rows; predict does not)."""
        try:
            return FeatureStore.open(self.store_path, storage_options=storage_options)
        except FgembedError as exc:
            raise FgembedError(f"run {self.path}: its training store cannot be opened ({exc})") from None

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

    def load_fusion(self, dims: list[int] | None = None) -> Fusion:
        """The view's fusion as it was fitted (its saved state loaded); `dims` of the members
        where the run did not record them (format 1)."""
        return load_fusion(self.path, self.config.view, dims or self.meta["dims"])

    def load_heads(self, device: str = "cpu") -> list:
        """The kept head of every seed, rebuilt from its saved state dict (a multi-level run's:
        its `hierarchy` module, whose forward gives one logit tensor per level)."""
        if self.meta.get("kind") == "gated":
            raise FgembedError(f"{self.path} is a gated run: it has gates, and its heads are its member runs' "
                               "(classify/gated.py)")
        if self.config.head.levels:
            return _level_modules(self, device)
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
    head.module_.to(resolve_device(device))
    return head


def load_fusion(run_dir: str | Path, view: ViewConfig, dims: list[int]) -> Fusion:
    """A run's fusion with its saved state (`projection.safetensors`, when it has one)."""
    path = Path(run_dir) / "projection.safetensors"
    return create_fusion(view, dims).load(load_numpy(str(path)) if path.is_file() else {})


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


def finished(path: Path) -> Run | None:
    """The finished run at `path`, or None (absent, unfinished, or of a format this fgembed cannot
    read: retrained, never a crash). A run a killed `publish` left behind is recovered first."""
    _remove_abandoned(path)
    if not (path / "metrics.json").is_file():
        return None
    return _reusable(path)


def temp_dir(path: Path) -> Path:
    """A fresh temporary folder beside the run's place, named for this host and process, after
    clearing what abandoned fits left there (`_remove_abandoned`)."""
    _remove_abandoned(path)
    tmp = path.with_name(f".{path.name}.tmp-{_owner()}")
    tmp.mkdir(parents=True)
    return tmp


def save_weights(tmp: Path, modules: dict[int, torch.nn.Module], fusion: Fusion) -> None:
    """What a run's predictions are rebuilt from (`Run.load_heads`, `Run.load_fusion`), for
    single- and multi-level runs alike: each seed's kept module as `head-seed<S>.safetensors` (a
    state dict, never a pickle) and the fitted state of the view's fusion, if it has one (a PCA
    sum's projection), as `projection.safetensors`."""
    for seed, module in modules.items():
        save_torch({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                   str(tmp / f"head-seed{seed}.safetensors"))
    if state := fusion.state():
        save_numpy({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "projection.safetensors"))


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


def _level_modules(run: Run, device: str = "cpu") -> list:
    """Each seed's multi-level module (eval mode), rebuilt from `head-seed<S>.safetensors`."""
    h = run.config.head
    n_classes = [run.meta["level_classes"][lv] for lv in h.levels]
    modules = []
    for seed in h.seeds:
        module = create_hierarchy(h.hierarchy, run.metrics["input_dim"], n_classes, hidden=h.hidden, dropout=h.dropout)
        module.load_state_dict(load_torch(str(run.path / f"head-seed{seed}.safetensors"), device="cpu"))
        modules.append(module.to(resolve_device(device)).eval())
    return modules
