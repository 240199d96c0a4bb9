"""Domain similarity between two stores' embeddings (Cui et al., §4) and greedy source selection.

Each class is represented by the mean of its images' embeddings and weighted by its share of
the split's images; the distance between domains is the Earth Mover's Distance between those
two weighted point sets with Euclidean ground distance (solved exactly by POT), and
sim = exp(−γ·d) with γ = 0.01 as in the paper. Class means are accumulated block by block over
the store's shards, so memory is O(classes × dim) whatever the number of rows; rows whose
image failed (NaN embedding, or a FAILED status) are left out.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ot

from ..datasets.table import SPLIT_NAMES
from ..errors import FgembedError
from ..images import FAILED
from ..plots import save_figure
from ..progress import progress_bar
from ..store import FeatureStore

DEFAULT_GAMMA = 0.01  # the paper's γ, "in all experiments"
BLOCK_ROWS = 8192  # rows read per step (rounded to whole shards)
# Fingerprint entries that define the embedding space: two stores must agree on them for their
# distances to mean anything. Precision, dtype and library versions only add rounding.
SPACE_KEYS = ("source", "model", "weights", "preprocessing", "pooling", "input_shape")


@dataclass
class SimilarityResult:
    features: str
    source: str
    target: str
    emd: float
    similarity: float
    source_split: str
    target_split: str
    source_classes: int  # classes with at least one usable row in the split
    target_classes: int


@dataclass
class ClassScore:
    """One source class's similarity to the whole target domain, sim({(s_i, 1)}, T)."""

    label: int
    name: str
    emd: float
    similarity: float
    rows: int


def _split_code(split: str) -> int:
    if split not in SPLIT_NAMES:
        raise FgembedError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES[split]


def class_means(store: FeatureStore, features: str, split: str = "train",
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(means [C, d] float64, counts [C] int64) over the usable rows of `split`.

    Classes with no usable row have count 0 and a NaN mean. Refuses an unfinished extraction.
    """
    info = store.backbone_info(features)  # one-line error naming the store's backbones
    code = _split_code(split)
    if info.rows_done < store.n_rows:
        raise FgembedError(f"features {features!r} in {store.location} are incomplete "
                           f"({info.rows_done}/{store.n_rows} rows); rerun fgembed extract to finish")
    labels = store.labels()
    usable = (store.split_codes() == code) & ~np.isin(store.status(features), FAILED)
    n_classes = len(store.class_names)
    sums = np.zeros((n_classes, info.dim), np.float64)
    counts = np.zeros(n_classes, np.int64)
    blocks = [rows for rows in store.row_blocks(BLOCK_ROWS) if usable[rows].any()]  # whole shards
    title = f"class means {features} {_name(store)} [{split}]"
    with progress_bar(len(blocks), title, progress, unit="block") as tick:
        for rows in blocks:
            keep = usable[rows]
            block = store.embeddings(features, rows)[keep].astype(np.float64)
            finite = np.isfinite(block).all(axis=1)  # a NaN row is a failed image, whatever its status says
            y = labels[rows][keep][finite]
            np.add.at(sums, y, block[finite])
            counts += np.bincount(y, minlength=n_classes)
            tick(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    return means, counts


def _name(store: FeatureStore) -> str:
    """A store's last path component (`cub.zarr`), for titles."""
    return store.location.rstrip("/").rsplit("/", 1)[-1]


def emd_distance(source_means: np.ndarray, source_counts: np.ndarray, target_means: np.ndarray,
                 target_counts: np.ndarray) -> float:
    """EMD between two class-mean sets weighted by normalised image counts (empty classes dropped)."""
    s, t = source_counts > 0, target_counts > 0
    a = source_counts[s] / source_counts[s].sum()
    b = target_counts[t] / target_counts[t].sum()
    cost = ot.dist(source_means[s], target_means[t], metric="euclidean")
    # Network simplex needs more than POT's default 1e5 iterations at iNat × CUB class counts.
    return float(ot.emd2(a, b, cost, numItermax=max(100_000, 50 * len(a) * len(b))))


def similarity_from_distance(d: float | np.ndarray, gamma: float = DEFAULT_GAMMA) -> float | np.ndarray:
    return np.exp(-gamma * d)


def _space(fingerprint: dict) -> dict:
    strict = fingerprint.get("strict", fingerprint)  # a schema that nests the strict part
    return {k: strict.get(k) for k in SPACE_KEYS}


def check_same_space(source: FeatureStore, target: FeatureStore, features: str) -> None:
    """Refuse distances between embeddings from different models or preprocessing."""
    a, b = (_space(s.backbone_info(features).fingerprint) for s in (source, target))
    differ = [k for k in SPACE_KEYS if a[k] != b[k]]
    if differ:
        raise FgembedError(f"features {features!r} differ between {source.location} and {target.location} "
                           f"({', '.join(differ)}): their distances would mean nothing")


class _MeansCache:
    """Class means of each (store, features, split) once, however many pairs use them."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.cache: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, store: FeatureStore, features: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        key = (store.url, features, split)
        if key not in self.cache:
            self.cache[key] = class_means(store, features, split, self.progress)
            if not self.cache[key][1].any():
                raise FgembedError(f"{store.location} has no usable {split} rows for {features!r}")
        return self.cache[key]


def domain_similarity(source: FeatureStore | Sequence[FeatureStore], target: FeatureStore | Sequence[FeatureStore],
                      features: str | Sequence[str], source_split: str = "train", target_split: str = "train",
                      gamma: float = DEFAULT_GAMMA, progress: bool = False) -> list[SimilarityResult]:
    """d(S, T) and sim(S, T) for every backbone × source × target (backbone-major order)."""
    sources = [source] if isinstance(source, FeatureStore) else list(source)
    targets = [target] if isinstance(target, FeatureStore) else list(target)
    names = [features] if isinstance(features, str) else list(features)
    if not names:
        raise FgembedError("name at least one --features backbone")
    for split in (source_split, target_split):
        _split_code(split)  # a bad split fails before any reading
    means = _MeansCache(progress)
    results = []
    for name in names:
        for s in sources:
            for t in targets:
                check_same_space(s, t, name)
                ms, cs = means(s, name, source_split)
                mt, ct = means(t, name, target_split)
                d = emd_distance(ms, cs, mt, ct)
                results.append(SimilarityResult(name, s.location, t.location, d,
                                                float(similarity_from_distance(d, gamma)), source_split,
                                                target_split, int((cs > 0).sum()), int((ct > 0).sum())))
    return results


def select_classes(source: FeatureStore, target: FeatureStore, features: str, k: int,
                   source_split: str = "train", target_split: str = "train", gamma: float = DEFAULT_GAMMA,
                   progress: bool = False) -> list[ClassScore]:
    """Cui et al.'s greedy rule: rank source classes by sim({(s_i, 1)}, T) and keep the top `k`.

    With all the mass at one point s_i, the only transport plan sends it to each target class in
    proportion to its weight, so EMD({(s_i, 1)}, T) = Σ_j w_j ‖s_i − t_j‖ — one row of the
    ground-distance matrix times the target weights (the tests check it against `ot.emd2`).
    """
    check_same_space(source, target, features)
    means = _MeansCache(progress)
    ms, cs = means(source, features, source_split)
    mt, ct = means(target, features, target_split)
    present = np.flatnonzero(cs > 0)
    if k < 1 or k > len(present):
        raise FgembedError(f"--select {k}: choose 1 to {len(present)} (source classes with "
                           f"{source_split} rows in {source.location})")
    t = ct > 0
    d = ot.dist(ms[present], mt[t], metric="euclidean") @ (ct[t] / ct[t].sum())
    order = np.argsort(d, kind="stable")[:k]
    names = source.class_names
    return [ClassScore(int(present[i]), names[present[i]], float(d[i]), float(similarity_from_distance(d[i], gamma)),
                       int(cs[present[i]])) for i in order]


def write_class_list(scores: list[ClassScore], path: str | Path, header: str = "") -> Path:
    """One class name per line (what `fgembed fit --classes FILE` reads), most similar first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in header.splitlines()] + [s.name for s in scores]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class SimilarityMatrix:
    """One panel per backbone (rows: sources, columns: targets), or, for a single store pair,
    one panel whose columns are the backbones."""

    title: str
    rows: list[str]
    columns: list[str]
    similarity: np.ndarray
    emd: np.ndarray
    column_kind: str  # "target" or "backbone"


def _label(path: str, split: str) -> str:
    return path if split == "train" else f"{path} [{split}]"


def similarity_matrices(results: list[SimilarityResult]) -> list[SimilarityMatrix]:
    names = list(dict.fromkeys(r.features for r in results))
    sources = list(dict.fromkeys(_label(r.source, r.source_split) for r in results))
    targets = list(dict.fromkeys(_label(r.target, r.target_split) for r in results))
    if len(sources) == len(targets) == 1:
        row = [next(r for r in results if r.features == n) for n in names]
        sim, emd = np.array([[r.similarity for r in row]]), np.array([[r.emd for r in row]])
        return [SimilarityMatrix(f"{sources[0]} → {targets[0]}", sources, names, sim, emd, "backbone")]
    panels = []
    for name in names:
        sim, emd = np.full((len(sources), len(targets)), np.nan), np.full((len(sources), len(targets)), np.nan)
        for r in (r for r in results if r.features == name):
            i, j = sources.index(_label(r.source, r.source_split)), targets.index(_label(r.target, r.target_split))
            sim[i, j], emd[i, j] = r.similarity, r.emd
        panels.append(SimilarityMatrix(name, sources, targets, sim, emd, "target"))
    return panels


def heatmap(results: list[SimilarityResult], path: str | Path, gamma: float = DEFAULT_GAMMA) -> Path:
    """A heat map of sim per panel, each cell annotated with sim and d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = similarity_matrices(results)
    values = np.concatenate([p.similarity.ravel() for p in panels])
    low, high = np.nanmin(values), np.nanmax(values)  # one colour scale for all panels, spread over the data:
    low, high = (low - 1e-3, high + 1e-3) if high - low < 1e-3 else (low, high)  # sims often differ in the 2nd digit
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(4.5, 1.6 * len(panels[0].columns) + 3) * len(panels),
                                      1.0 * len(panels[0].rows) + 2.5))
    for ax, p in zip(axes[0], panels):
        image = ax.imshow(p.similarity, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        columns = p.columns if p.column_kind == "backbone" else [Path(c).name for c in p.columns]
        ax.set_xticks(range(len(p.columns)), columns, rotation=30, ha="right")
        ax.set_yticks(range(len(p.rows)), [Path(r).name for r in p.rows])
        ax.set_xlabel(p.column_kind)
        ax.set_ylabel("source")
        ax.set_title(p.title, fontsize=10)
        for (i, j), value in np.ndenumerate(p.similarity):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.4f}\nd={p.emd[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if (value - low) / (high - low) < 0.6 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("similarity")
    fig.suptitle(f"domain similarity exp(−γ·EMD), γ = {gamma:g}", fontsize=11)
    return save_figure(fig, path)
