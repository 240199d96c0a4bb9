"""Views: the one place a feature store becomes design rows (DESIGN.md's "fusion view").

A `ViewConfig` says which members and how they fuse (a name in `fusion.FUSIONS`), and which
rows and classes take part: a class subset (`classes`), classes held out of train and val for an
open-set protocol (`holdout`, whole taxonomy groups with `holdout_level`), K training rows per
class (`shots`, draw `draw`). `build_view` reads the members block by block (whole shards, only
the selected rows) and has the view's fusion write each block straight into one preallocated
float16 matrix per split — a concat puts each member into its own columns, so a five-member
concat costs about the float16 size of the rows it reads. A fusion with state (the PCA sum) is
first fitted on the training rows of one member at a time (a float32 copy of that member's
training rows; the exact PCA of `pca.PCASum`, on a GPU with `device`).

Classes are never renumbered: labels and logit columns are the store's class ids; unselected
and held-out classes are masked by the runs. Rows whose image failed in any member (status, or a
non-finite value) are dropped and counted per split.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from ..datasets.table import SPLIT_NAMES
from ..devices import resolve_device
from ..errors import FgembedError
from ..images import FAILED
from ..progress import progress_bar
from ..store import FeatureStore
from .fusion import FUSIONS, PROJECTIONS, Fusion, create_fusion

SPLITS = ("train", "val", "test")
FINE = (None, "label", "species")
READ_ROWS = 4096  # store rows read per block (rounded to whole shards): bounds the overhead
FUSION_SETTINGS = ("project", "project_dim", "l2")  # view fields a fusion reads if it names them


def level_key(level: str | None) -> str | None:
    """None for the fine label (`label` and `species` are its names), else the level."""
    return None if level in FINE else level


@dataclass(frozen=True)
class ViewConfig:
    """Everything that decides a view's rows and columns (and so a run's numbers)."""

    features: tuple[str, ...]
    fusion: str = "single"            # a name in fusion.FUSIONS (registered fusions included)
    # FUSION_SETTINGS: each kept only where the fusion's `settings` name it (reset otherwise)
    project: str = "pca"              # sum: pca (fitted on train rows) | linear (learned by the head)
    project_dim: int | None = None    # sum: default the smallest member dim
    l2: bool = False                  # concat, sum, most fusions: L2-normalise each member first
    classes: tuple[int, ...] | None = None   # store fine class ids kept (None: all)
    holdout: float = 0.0              # fraction of classes held out of train + val (novel at test)
    holdout_level: str | None = None  # None: fine classes; else whole groups of this taxonomy level
    holdout_seed: int = 0
    shots: int | None = None          # K training rows per class, drawn from train only
    draw: int = 0                     # which seeded draw of the K shots

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        fix("features", tuple(self.features))
        if not self.features:
            raise FgembedError("no features named; pass at least one backbone")
        if len(set(self.features)) != len(self.features):
            raise FgembedError(f"a member is named twice: {'+'.join(self.features)}")
        if self.fusion not in FUSIONS:
            raise FgembedError(f"unknown fusion {self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.project not in PROJECTIONS:
            raise FgembedError(f"unknown projection {self.project!r}; choose one of {', '.join(PROJECTIONS)}")
        if len(self.features) == 1 and self.fusion != "single":
            fix("fusion", "single")
        if len(self.features) < FUSIONS[self.fusion].min_members:
            raise FgembedError(f"--fusion {self.fusion} joins {FUSIONS[self.fusion].min_members} or more features")
        if len(self.features) > 1 and self.fusion == "single":
            raise FgembedError(f"{len(self.features)} features need a fusion: --fusion "
                               f"{' or '.join(n for n, f in FUSIONS.items() if f.min_members > 1)}")
        if self.project_dim is not None and int(self.project_dim) < 1:
            raise FgembedError(f"--project-dim must be ≥ 1, got {self.project_dim}")
        if self.classes is not None:
            fix("classes", tuple(sorted({int(c) for c in self.classes})))
            if not self.classes:
                raise FgembedError("the class selection is empty")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise FgembedError(f"--holdout is a fraction of classes in [0, 1), got {self.holdout}")
        if self.shots is not None and int(self.shots) < 1:
            raise FgembedError(f"--shots must be ≥ 1, got {self.shots}")
        if int(self.draw) < 0:
            raise FgembedError(f"--draw must be ≥ 0, got {self.draw}")
        # settings that cannot matter are reset, so they cannot split one run into two keys
        fix("holdout", float(self.holdout))
        fix("holdout_level", level_key(self.holdout_level))
        if self.holdout == 0.0:
            fix("holdout_level", None)
            fix("holdout_seed", 0)
        if self.shots is None:
            fix("draw", 0)
        defaults = {f.name: f.default for f in fields(self)}
        for name in FUSION_SETTINGS:  # the ones the fusion does not read (its `settings`)
            if name not in FUSIONS[self.fusion].settings:
                fix(name, defaults[name])

    @property
    def label(self) -> str:
        members = "+".join(self.features)
        return members if self.fusion == "single" else f"{self.fusion}-{members}"

    @property
    def learned_projection(self) -> bool:
        return self.fusion == "sum" and self.project == "linear"


@dataclass
class View:
    """The design rows of a store under a `ViewConfig`, per split, with labels at any level."""

    config: ViewConfig
    names: list[str]
    dims: list[int]
    input_dim: int
    rows: dict[str, np.ndarray]
    dropped: dict[str, int]
    holdout_classes: list[int]
    novel: np.ndarray
    fusion: Fusion                            # fitted on this view's training rows where it has state
    kept_classes: np.ndarray                  # bool over fine classes: selected and not held out
    store: FeatureStore = field(repr=False)
    _X: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def X(self, split: str) -> np.ndarray:
        """[rows, input_dim] float16 design rows of a split."""
        return self._X[split]

    def labels(self, split: str, level: str | None = None) -> np.ndarray:
        return self.store.labels(level=level_key(level)).astype(np.int64)[self.rows[split]]

    def n_classes(self, level: str | None = None) -> int:
        level = level_key(level)
        return len(self.store.class_names) if level is None else len(self.store.samples_attrs["levels"][level])

    def class_counts(self, split: str = "train", level: str | None = None) -> np.ndarray:
        return np.bincount(self.labels(split, level), minlength=self.n_classes(level))

    def text(self) -> tuple[np.ndarray, float]:
        """(class-name text embeddings, logit scale) of a single-member view: the zero-shot head's
        weights, stored by `fgembed extract --text`."""
        stored = self.store.text(self.names[0]) if len(self.names) == 1 and self.config.fusion == "single" else None
        if stored is None:
            raise FgembedError(f"no text embeddings for {'+'.join(self.names)}: the zeroshot head takes one open_clip "
                               "backbone extracted with `fgembed extract --text`")
        return stored

    def keep_rows(self, split: str, keep: np.ndarray) -> View:
        """This view with only the rows of `split` that `keep` marks (the others counted as
        dropped). The split's matrix is compacted in place, never copied: this view's own matrix
        of that split is overwritten, so use the view returned."""
        if keep.all():
            return self
        X = compact_rows(self._X[split], keep)
        return replace(self, rows={**self.rows, split: self.rows[split][keep]}, _X={**self._X, split: X},
                       dropped={**self.dropped, split: self.dropped[split] + int((~keep).sum())})

    def excluded_classes(self, level: str | None = None) -> np.ndarray:
        """Class ids at `level` a head trained on this view cannot know (unselected or held out):
        at a coarse level, groups none of whose fine classes is kept."""
        if level_key(level) is None:
            return np.flatnonzero(~self.kept_classes)
        fine, coarse = self.store.labels(), self.store.labels(level=level_key(level))
        known = np.zeros(self.n_classes(level), bool)
        known[coarse[self.kept_classes[fine]]] = True
        return np.flatnonzero(~known)


def build_view(store: FeatureStore, config: ViewConfig, *, progress: bool = False, device: str = "cpu") -> View:
    """Select rows and classes as `config` says and read the members' design rows. `device`
    (`auto`, `cpu`, `cuda`, …) is where a PCA sum's projections are fitted; the rows stay on the host."""
    dims = [_finished_dim(store, name) for name in config.features]
    split = store.split_codes()
    fine = store.labels().astype(np.int64)
    n_classes = len(store.class_names)
    kept, held = _select_classes(store, config, fine, n_classes)
    failed = np.zeros(store.n_rows, bool)
    with ThreadPoolExecutor(max_workers=len(config.features)) as pool:  # metadata requests on object storage
        for rows_failed in pool.map(store.failed_rows, config.features):
            failed[rows_failed] = True
    rows, dropped = {}, {}
    for name in SPLITS:
        in_split = (split == SPLIT_NAMES[name]) & kept[fine] if name == "test" else \
            (split == SPLIT_NAMES[name]) & kept[fine] & ~held[fine]
        rows[name], dropped[name] = np.flatnonzero(in_split & ~failed), int((in_split & failed).sum())
    if config.shots:
        _warn_few_shots(store, fine, rows["train"], config.shots)
        rows["train"] = _draw_shots(rows["train"], fine, config.shots, config.draw)
    reader = _Reader(store, config, rows, dims, progress, resolve_device(device))
    X, fusion = reader.read()
    for name in SPLITS:  # rows with a non-finite value that their status did not flag (older stores)
        X[name], rows[name], bad = _drop_nonfinite(X[name], rows[name])
        dropped[name] += bad
    for name in SPLITS:
        if len(rows[name]) == 0:
            raise FgembedError(_no_rows(store, name, split, dropped[name]))
    _warn_empty_classes(store, fine, kept & ~held, rows["train"])
    holdout = np.flatnonzero(held).tolist()
    return View(config, list(config.features), dims, X["train"].shape[1], rows, dropped, holdout,
                held[fine[rows["test"]]], fusion, kept & ~held, store, X)


def _finished_dim(store: FeatureStore, name: str) -> int:
    """A member's width, refusing one whose extraction has not finished. A group marked complete
    is taken at its word; only one that is not has its `done` rows counted (on object storage each
    array read is a request per shard)."""
    attrs = store.backbone_attrs(name)
    if not attrs.get("complete"):
        info = store.backbone_info(name)
        if info.rows_done < store.n_rows:
            raise FgembedError(f"features {name!r} in {store.path} are incomplete ({info.rows_done}/"
                               f"{store.n_rows} rows); rerun fgembed extract to finish")
    return int(attrs["dim"])


def _no_rows(store: FeatureStore, name: str, split: np.ndarray, dropped: int) -> str:
    """Why a split has no row to train or score on, and what to do about it."""
    if not (split == SPLIT_NAMES[name]).any():
        fix = {"train": "its dataset has no training images",
               "val": "extract with --val-fraction > 0 to carve one from train",
               "test": "its dataset has no test split (a flat folder dataset puts every image in train: use "
                       "root/{train,val,test}/<class>/*, or a manifest with a split column)"}[name]
        return f"store {store.path} has no {name} images: {fix}"
    if dropped:
        return f"every {name} image of store {store.path} failed in a member ({dropped} rows): see fgembed info"
    return f"no {name} image of store {store.path} is of a class this run keeps (--classes, --holdout)"


def _select_classes(store: FeatureStore, config: ViewConfig, fine: np.ndarray,
                    n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held): bool over fine classes — selected by `classes`, and held out of train + val."""
    kept = np.ones(n_classes, bool)
    if config.classes is not None:
        bad = [c for c in config.classes if not 0 <= c < n_classes]
        if bad:
            raise FgembedError(f"class ids {bad[:5]} are not in store {store.path} ({n_classes} classes)")
        kept[:] = False
        kept[list(config.classes)] = True
    held = np.zeros(n_classes, bool)
    if config.holdout == 0:
        return kept, held
    rng = np.random.default_rng(config.holdout_seed)
    if config.holdout_level is None:
        groups = np.arange(n_classes)
    else:  # each fine class's group at that level, read from the rows
        groups = np.full(n_classes, -1, np.int64)
        groups[fine] = store.labels(level=config.holdout_level)
    candidates = np.unique(groups[kept & (groups >= 0)])
    n_out = max(1, round(config.holdout * len(candidates)))
    if n_out >= len(candidates):
        what = "classes" if config.holdout_level is None else f"{config.holdout_level} groups"
        raise FgembedError(f"--holdout {config.holdout} would hold out all {len(candidates)} {what}")
    chosen = rng.choice(candidates, n_out, replace=False)
    held = kept & np.isin(groups, chosen)
    return kept, held


def _warn_empty_classes(store: FeatureStore, fine: np.ndarray, trainable: np.ndarray, train: np.ndarray) -> None:
    """Warn of classes the store has rows of but no training row in this view — unless the view
    asked for that (held-out or unselected classes are masked, not warned about)."""
    in_store = np.bincount(fine, minlength=len(trainable)) > 0
    empty = np.flatnonzero(trainable & in_store & (np.bincount(fine[train], minlength=len(trainable)) == 0))
    if len(empty):
        names = store.class_names
        warnings.warn(f"{len(empty)} {'class has' if len(empty) == 1 else 'classes have'} no training rows in store {store.path} (e.g. "
                      f"{names[empty[0]]!r}); a head cannot predict them", UserWarning, stacklevel=3)


def _warn_few_shots(store: FeatureStore, fine: np.ndarray, train: np.ndarray, k: int) -> None:
    """One line when some classes have fewer than K training rows: they train on all they have."""
    counts = np.bincount(fine[train], minlength=len(store.class_names))
    short = np.flatnonzero((counts > 0) & (counts < k))
    if len(short):
        warnings.warn(f"--shots {k}: {len(short)} of {int((counts > 0).sum())} classes have fewer training rows "
                      f"(as few as {int(counts[short].min())}); they train on all they have", UserWarning, stacklevel=3)


def _draw_shots(train: np.ndarray, fine: np.ndarray, k: int, draw: int) -> np.ndarray:
    """K training rows per class: a seeded permutation, first K of each class (so the K-shot
    rows of one draw contain its smaller-K rows)."""
    order = np.random.default_rng(draw).permutation(train)
    labels = fine[order]
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[by_class[rank < k]])


COMPACT_ROWS = 1024  # rows per step of an in-place compaction: a [step, d] mask at a time


def _drop_nonfinite(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Compact X in place, keeping finite rows (a no-op when all are)."""
    keep = np.concatenate([np.isfinite(X[i:i + COMPACT_ROWS]).all(1) for i in range(0, len(X), COMPACT_ROWS)]
                          or [np.ones(0, bool)])
    bad = int((~keep).sum())
    return (compact_rows(X, keep), rows[keep], bad) if bad else (X, rows, 0)


def compact_rows(X: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`X[keep]` written into X's own first rows, block by block (no copy of the matrix): a view
    of X, whose other rows are overwritten."""
    write = 0
    for start in range(0, len(X), COMPACT_ROWS):
        block = keep[start:start + COMPACT_ROWS]
        if block.all() and write == start:
            write += len(block)
            continue
        good = X[start:start + COMPACT_ROWS][block]
        X[write:write + len(good)] = good
        write += len(good)
    return X[:write]


class _Reader:
    """Reads the members block by block (whole shards) and has the fusion write the split matrices."""

    def __init__(self, store: FeatureStore, config: ViewConfig, rows: dict[str, np.ndarray], dims: list[int],
                 progress: bool, device: torch.device) -> None:
        self.store, self.config, self.rows, self.dims, self.progress = store, config, rows, dims, progress
        self.device = device
        shard = store.shard_rows
        self.block = max(shard, READ_ROWS // shard * shard)

    def _blocks(self, rows: dict[str, np.ndarray]):
        """(store rows lo:hi to read, {split: (positions in the split, store rows)}) per block that holds rows."""
        n = self.store.n_rows
        bounds = {s: np.searchsorted(r, np.arange(0, n + self.block, self.block)) for s, r in rows.items()}
        for b, start in enumerate(range(0, n, self.block)):
            picks = {s: (slice(bounds[s][b], bounds[s][b + 1]), r[bounds[s][b]:bounds[s][b + 1]])
                     for s, r in rows.items() if bounds[s][b + 1] > bounds[s][b]}
            if picks:
                lo = max(start, min(r[0] for _, r in picks.values()))
                yield slice(lo, max(r[-1] for _, r in picks.values()) + 1), picks

    def _read_ahead(self, names, blocks):
        """(span, picks, each member's rows of the span) per block, the next block's members read
        while the caller works on this one: on object storage a read is mostly waiting for the
        service, so the members' requests overlap each other and the fusion's work. At most three
        blocks (`READ_ROWS` rows each) are held at once: the one in use and the next two."""
        readers = [self.store.embedding_reader(name) for name in names]

        def fetch(span: slice) -> list:
            return [pool.submit(read, span) for read in readers]

        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            pending = None
            for span, picks in blocks:
                ahead = (span, picks, fetch(span))
                if pending is not None:
                    yield pending[0], pending[1], [f.result() for f in pending[2]]
                pending = ahead
            if pending is not None:
                yield pending[0], pending[1], [f.result() for f in pending[2]]

    def read(self) -> tuple[dict[str, np.ndarray], Fusion]:
        fusion = create_fusion(self.config, self.dims, self.device)
        n_blocks = sum(1 for _ in self._blocks(self.rows))
        total = n_blocks + (len(self.dims) * sum(1 for _ in self._blocks({"train": self.rows["train"]}))
                            if fusion.stateful else 0)
        with progress_bar(total, f"view {self.config.label}", enabled=self.progress, unit="block") as tick:
            if fusion.stateful:
                self._fit(fusion, tick)
            X = {s: np.empty((len(r), fusion.width()), np.float16) for s, r in self.rows.items()}
            for span, picks, data in self._read_ahead(self.config.features, self._blocks(self.rows)):
                for split, (positions, r) in picks.items():  # data: the stored dtype, widened only where a fusion computes
                    fusion.apply_into([d[r - span.start] for d in data], X[split][positions])
                tick(1)
        return X, fusion

    def _fit(self, fusion: Fusion, tick) -> None:
        """Fit the fusion's state on the training rows, one member at a time (a float32 copy of
        that member's training rows only)."""
        train = self.rows["train"]
        fusion.start_fit(len(train))
        for i, (name, d) in enumerate(zip(self.config.features, self.dims)):
            member = np.empty((len(train), d), np.float32)
            for span, picks, (data,) in self._read_ahead([name], self._blocks({"train": train})):
                positions, r = picks["train"]
                member[positions] = data[r - span.start]
                tick(1)
            member = fusion.members([member])[0]  # L2-normalised with the view's l2
            finite = np.isfinite(member).all(1)
            fusion.fit_member(i, member if finite.all() else member[finite])
            del member
