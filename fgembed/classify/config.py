"""What a run is: its configuration (`ViewConfig` for the rows and columns, `HeadConfig` for the
head and its training) and its key.

A run's key hashes the config and the store's identity (`store_identity`: its rows, the images
they were read from, and per member how it was extracted and which of its rows failed), so the
same request on the same data is reused and anything else is not. Neither fgembed's version
(recorded in config.json) nor the run directory's format version is in the key: a new release or
format reuses every run it can read and retrains the rest in the same place. Nor is a config
field added after keys were first written, while it keeps its default (`keyed_fields`): a
release that adds an option keeps every key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FgembedError
from ..store import FeatureStore
from .fusion import create_fusion
from .longtail import SHOT_BINS, parse_shot_bins
from .registry import create_head, head_class
from .soft_targets import KD_ALPHA, KD_TOP_K, TEMPERATURE
from .train import BALANCES, SECOND_STAGE_EPOCHS
from .views import ViewConfig, level_key

TRAINING = ("epochs", "lr", "weight_decay", "batch_size")  # what only a gradient-trained head takes


@dataclass(frozen=True)
class HeadConfig:
    """What describes the head and its training (the view is described by ViewConfig)."""

    head: str = "mlp"               # a name in fgembed.classify.registry.HEADS
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
    # knowledge distillation (`fgembed distill`, soft_targets.py): the late fusion of these members'
    # runs teaches; the other three are reset without a teacher
    teacher: tuple[str, ...] = ()
    temperature: float = TEMPERATURE
    kd_alpha: float = KD_ALPHA      # weight of the T²·KL term; 1 − kd_alpha weights the cross-entropy
    kd_top_k: int = KD_TOP_K        # teacher classes kept per row (exact when ≥ the classes)

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
        head = head_class(self.head)  # an unknown head: one line with the close names
        if self.balance != "none" and not head.trained:
            raise FgembedError(f"--balance {self.balance} re-balances a trained head; {self.head} is not trained")
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
        self._fix_distillation(fix, as_tuple)
        # settings the head does not take cannot matter: reset, so they never split a key
        taken = self.head_settings()
        defaults = HeadConfig.__dataclass_fields__
        for name in ("dropout", "hidden", *TRAINING):
            if name not in taken:
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

    def _fix_distillation(self, fix, as_tuple) -> None:
        """Without a teacher the distillation settings reset (a plain run's key never changes);
        with one, only a trained single-level head without re-balancing learns from it."""
        teacher = tuple(str(m) for m in as_tuple(self.teacher) if m != "")
        fix("teacher", teacher)
        if not teacher:
            for name in ("temperature", "kd_alpha", "kd_top_k"):
                fix(name, HeadConfig.__dataclass_fields__[name].default)
            return
        if len(set(teacher)) != len(teacher):
            raise FgembedError(f"a teacher member is named twice: {','.join(teacher)}")
        if not head_class(self.head).trained:
            raise FgembedError(f"distillation trains the student by gradient descent; --head {self.head} is not trained")
        if self.balance != "none" or self.levels:
            raise FgembedError("distillation trains one level on the teacher's targets; it takes no --balance or --levels")
        fix("temperature", float(self.temperature))
        fix("kd_alpha", float(self.kd_alpha))
        fix("kd_top_k", int(self.kd_top_k))
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise FgembedError(f"--temperature must be a number > 0, got {self.temperature:g}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise FgembedError(f"--kd-alpha weighs the teacher's term in [0, 1], got {self.kd_alpha:g}")
        if self.kd_top_k < 1:
            raise FgembedError(f"--kd-top-k must be ≥ 1, got {self.kd_top_k}")

    @property
    def total_epochs(self) -> int:
        """Epochs a progress bar counts: `second-stage` adds its balanced epochs."""
        return self.epochs + (SECOND_STAGE_EPOCHS if self.balance == "second-stage" else 0)

    def head_settings(self) -> set[str]:
        """The settings of this config its head takes, as the head class declares them."""
        head = head_class(self.head)
        return {*(TRAINING if head.trained else ()), *head.architecture}


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes a run's numbers (the device does not, by design)."""

    view: ViewConfig
    head: HeadConfig = HeadConfig()

    def __post_init__(self) -> None:
        if self.view.learned_projection and not head_class(self.head.head).learned_projection:
            raise FgembedError(f"--project linear is learned with the head; the {self.head.head} head learns no "
                               "projection: use --project pca")
        if self.head.levels and self.view.learned_projection:  # the multi-level heads have no projection layer
            raise FgembedError("--levels trains on a fixed view; a learned --project linear sum needs a single-level "
                               "head: use --project pca")

    @property
    def label(self) -> str:
        head = ("" if self.head.head == "mlp" else f"@{self.head.head}")
        head += f"@{self.head.hierarchy}" if self.head.levels else ""
        head += "-distilled" if self.head.teacher else ""
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
                  "dropout": h.dropout, "hidden": h.hidden}
        params = {k: v for k, v in values.items() if k in h.head_settings()}
        params.update(create_fusion(self.view, dims or []).head_params())  # a projection the head learns itself
        return create_head(h.head, random_state=h.seeds[0], device=device, **params)


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


def store_location(store: FeatureStore) -> str:
    """Where a run's store is, as it can be reopened from any working directory: a local store's
    resolved folder, or the URL of one elsewhere."""
    return str(Path(store.path).resolve()) if store.storage.local else store.location


def class_names(store: FeatureStore) -> dict:
    """The class names and taxonomy a run's predictions are named with, recorded in the run so that
    a run directory copied elsewhere predicts without its training store: each level's names and the
    level code of every fine class (-1 for a class with no row to say)."""
    attrs, fine = store.samples_attrs, store.labels()
    taxonomy = {}
    for level, names in attrs["levels"].items():
        of_class = np.full(len(attrs["class_names"]), -1, np.int64)
        of_class[fine] = store.labels(level=level)
        taxonomy[level] = {"names": list(names), "of_class": of_class.tolist()}
    return {"class_names": list(attrs["class_names"]), "taxonomy": taxonomy}


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
    version, until a release dropped them) are not found here: they are retrained once, and their old
    folders stay readable by `Run.load` (`fgembed predict --run DIR`). No legacy-key fallback: it
    would keep two retired formulas (format 1's flat config; format 2's with the version) alive
    for runs that only the unreleased 0.1.0 wrote, in the fit path of every run."""
    keyed = {part: keyed_fields(getattr(config, part), ALWAYS_KEYED[part]) for part in ("view", "head")}
    blob = json.dumps({"config": keyed, "store": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
