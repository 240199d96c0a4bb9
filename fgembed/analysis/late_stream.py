"""Late fusion streamed over row blocks: every requested subset of members scored in one pass.

Each member's float16 logits are read once per seed (per level), in blocks whose edges fall on
the logits' chunks (zarr reads a whole chunk for any slice of it). A block is scored in pieces of
a few dozen rows whose float32 scores stay in cache: each member's piece prepared once
(`late.prepare`: widened, softmaxed for `proba`), every subset's sum one addition away from an
earlier one's (`late.running_combine`) or, with fitted per-subset weights (`--late-weights val`),
summed directly by `late.combine`; each subset's per-class counts accumulate
(`metrics.MetricCounts`), so peak memory depends on the block and the number of classes, not on
the rows or the subsets.
Multi-level members are fused level by level in the same pass, so each row's fused predictions
at all levels are at hand at once for consistency and mistake severity. `fit_subset_weights`
fits each subset's member weights on a bounded, seeded sample of validation rows.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..classify.hierarchy_metrics import Taxonomy, consistent_rows, lca_depth
from ..classify.late import combine, fit_late_weights, prepare, reuse_buffer, running_combine
from ..classify.longtail import SHOT_BINS, frequency_bins
from ..classify.metrics import MetricCounts
from ..cpu import torch_threads

if TYPE_CHECKING:
    from ..classify.rundir import Run

BLOCK_ELEMENTS = 2 ** 27      # float16 logits read per block, over all members (256 MB)
PIECE_ELEMENTS = 2 ** 22      # float32 scores of a piece, its members' and running sums' (16 MB: in cache)
WEIGHT_ELEMENTS = 2 ** 26     # float32 logits of the validation sample, over a subset's members
WEIGHT_ROWS = 20_000          # at most this many validation rows fit the late weights


@dataclass
class LogitSource:
    """One member's logits of a split: sorted store `rows` and `array` [seeds, rows, classes]
    (a zarr array or anything numpy-indexable, e.g. float16 or float32 numpy)."""

    rows: np.ndarray
    array: Any

    @classmethod
    def of(cls, run: Run, split: str, group_name: str | None = None) -> LogitSource:
        """The split's logits at the root of `logits.zarr`, or in its `group_name` (a level of a
        multi-level run)."""
        import zarr
        group = zarr.open_group(run.path / "logits.zarr", mode="r")
        return cls(group[f"{split}_rows"][:], group[f"{group_name}/{split}" if group_name else split])

    @property
    def n_seeds(self) -> int:
        return int(self.array.shape[0])

    def take(self, seed: int, positions: np.ndarray) -> np.ndarray:
        if hasattr(self.array, "get_orthogonal_selection"):
            return self.array.get_orthogonal_selection((seed, positions, slice(None)))
        return np.asarray(self.array[seed][positions])


def level_block(per_level: dict[str, dict]) -> dict:
    """One seed's `levels` block and `avg_accuracy` (the mean accuracy over levels), as a
    multi-level run's metrics.json holds them."""
    return {"levels": per_level, "avg_accuracy": float(np.mean([m["accuracy"] for m in per_level.values()]))}


def frequency_block(counts: MetricCounts, train_counts: np.ndarray,
                    bins: tuple[int, int] = SHOT_BINS) -> dict[str, dict]:
    """`longtail.by_frequency` from per-class counts (correct and test rows per class), as a
    run's metrics.json holds it: an empty bin's accuracy is None."""
    out = {}
    for name, mask in frequency_bins(train_counts, bins).items():
        n = int(counts.support[torch.as_tensor(mask)].sum())
        correct = float(counts.tp[torch.as_tensor(mask)].sum())
        out[name] = {"accuracy": correct / n if n else None, "n_classes": int(mask.sum()), "n_test": n}
    return out


class LateScores:
    """One subset's running scores for one seed: per-class counts at every level, with a taxonomy
    the row sums behind consistency and mistake severity, and the finest level's predicted class
    of every row scored, int32 in the order the rows came (ascending store rows: what the
    bootstrap intervals resample). O(classes) memory, and four bytes a row."""

    def __init__(self, widths: list[int]) -> None:
        self.counts = [MetricCounts(w) for w in widths]
        self.consistent = self.mistakes = self.lca_sum = 0
        self._preds: list[np.ndarray] = []

    @property
    def predictions(self) -> np.ndarray:
        """The finest level's predicted class of every row scored so far, in order (int32)."""
        return np.concatenate(self._preds) if self._preds else np.empty(0, np.int32)

    def update(self, fused: list[torch.Tensor], ys: list[torch.Tensor], taxonomy: Taxonomy | None) -> None:
        preds = [counts.update(z, y).numpy() for counts, z, y in zip(self.counts, fused, ys)]  # the counts' argmax
        self._preds.append(preds[-1].astype(np.int32))   # the finest level's
        if taxonomy is None:
            return
        truth = ys[-1].numpy()
        wrong = preds[-1] != truth
        self.consistent += int(consistent_rows(preds, taxonomy).sum())
        self.mistakes += int(wrong.sum())
        self.lca_sum += int(lca_depth(preds[-1][wrong], truth[wrong], taxonomy).sum())

    def metrics(self, taxonomy: Taxonomy | None, train_counts: np.ndarray | None,
                bins: tuple[int, int]) -> dict:
        """The finest level's metrics (+ `by_frequency`), and with a taxonomy the `levels` block,
        `avg_accuracy`, `consistency` and `mistake_severity` (None without a mistake)."""
        per_level = [c.metrics() for c in self.counts]
        out = dict(per_level[-1])
        if taxonomy is not None:
            out |= level_block(dict(zip(taxonomy.order, per_level))) | {
                "consistency": self.consistent / max(self.counts[-1].rows, 1),
                "mistake_severity": self.lca_sum / self.mistakes if self.mistakes else None}
        if train_counts is not None:
            out["by_frequency"] = frequency_block(self.counts[-1], train_counts, bins)
        return out


def _block_rows(n_members: int, n_classes: int, chunk_rows: int | None = None) -> int:
    """Rows per block read: BLOCK_ELEMENTS over the members, rounded to a multiple of the
    logits' chunk rows, or to the chunk halved until it fits, so no chunk is read in part."""
    rows = max(64, BLOCK_ELEMENTS // max(1, n_members * n_classes))
    if not chunk_rows:
        return rows
    if rows >= chunk_rows:
        return rows // chunk_rows * chunk_rows
    while chunk_rows > rows and chunk_rows % 2 == 0:
        chunk_rows //= 2
    return max(chunk_rows, 64)


def stream_late(sources: list[LogitSource], subsets: list[tuple[int, ...]], labels: np.ndarray, mode: str = "logits",
                weights: list[list[np.ndarray]] | None = None,
                skip: np.ndarray | None = None) -> list[tuple[list[dict], int]]:
    """One level's late fusion (`stream_late_levels` of that level alone): per subset, the
    classification metrics per seed, the rows scored and their predictions per seed."""
    return stream_late_levels([sources], subsets, [labels], mode, None if weights is None else [weights], skip)


def stream_late_levels(sources: list[list[LogitSource]], subsets: list[tuple[int, ...]], labels: list[np.ndarray],
                       mode: str = "logits", weights: list[list[list[np.ndarray]]] | None = None,
                       skip: np.ndarray | None = None, *, taxonomy: Taxonomy | None = None,
                       train_counts: list[np.ndarray] | None = None,
                       bins: tuple[int, int] = SHOT_BINS) -> list[tuple[list[dict], int]]:
    """Per subset (member indices): (metrics per seed, `LateScores.metrics`; rows scored; the
    finest level's predictions `[seeds, rows]` int32 on those rows, ascending store rows).

    sources[level][member], coarse → fine (a member's levels share its rows); labels[level] and
    `skip` are indexed by store row; weights[level][subset][seed]: member weights (None: equal).
    A subset is scored on the rows all its members have (a failed image drops out of its
    backbone's run only). Every level of a block is fused before the next block is read, so
    consistency and mistake severity see each row's predictions at all levels; `train_counts`
    (per subset) adds `by_frequency` of the finest level."""
    union = functools.reduce(np.union1d, [s.rows for s in sources[-1]])
    if skip is not None:
        union = union[~skip[union]]
    widths = [int(level[0].array.shape[2]) for level in sources]
    members = sorted({m for s in subsets for m in s})
    chunks = getattr(sources[-1][members[0]].array, "chunks", None)
    block = _block_rows(len(members), sum(widths), chunks[1] if chunks else None)
    depth = max(len(set(s)) for s in subsets)  # running_combine holds a sum per depth past the first
    piece = max(8, PIECE_ELEMENTS // ((len(members) + depth - 1) * sum(widths)))
    n_seeds = [min(sources[-1][m].n_seeds for m in subset) for subset in subsets]
    scores = [[LateScores(widths) for _ in range(n)] for n in n_seeds]
    n_rows = [0] * len(subsets)
    # every piece's float32 scratch allocated once: fresh buffers would start cold and fragment the heap
    scratch = [({m: torch.empty(piece, w) for m in members}, []) for w in widths]
    with torch_threads(1):  # a piece's kernels are too small to share: OpenMP barriers cost more
        for k in range(max(n_seeds)):
            active = [i for i, n in enumerate(n_seeds) if n > k]
            needed = sorted({m for i in active for m in subsets[i]})
            read_block = functools.partial(_read_block, sources, needed, k)
            for rows, read in _ahead(read_block, _blocks(union, [sources[-1][m] for m in needed], block)):
                ys = [torch.from_numpy(y[rows]) for y in labels]
                for start, stop, i, fused in _pieces(read, len(rows), subsets, active, mode, weights, k, piece,
                                                     scratch):
                    mask = np.logical_and.reduce([read[-1][m].present[start:stop] for m in subsets[i]])
                    if not mask.any():
                        continue
                    select = slice(None) if mask.all() else torch.from_numpy(mask)
                    scores[i][k].update([z[select] for z in fused], [y[start:stop][select] for y in ys], taxonomy)
                    if k == 0:
                        n_rows[i] += int(mask.sum())
                del read  # while the next block is read: two blocks are held, never three
    return [([s.metrics(taxonomy, None if train_counts is None else train_counts[i], bins) for s in per_subset], n,
             np.stack([s.predictions for s in per_subset]))
            for i, (per_subset, n) in enumerate(zip(scores, n_rows))]


def _pieces(read: list[dict[int, _Block]], n_rows: int, subsets: list[tuple[int, ...]], active: list[int],
            mode: str, weights: list[list[list[np.ndarray]]] | None, seed: int, piece: int,
            scratch: list[tuple[dict[int, torch.Tensor], list[torch.Tensor]]],
            ) -> Iterator[tuple[int, int, int, list[torch.Tensor]]]:
    """(start, stop, subset, its fused scores per level) for every active subset on every piece of
    a block, in scratch[level] (the members' buffers, the running sums'). Equal weights: each
    level's running sums (`running_combine`), which order each row's classes as the means do (the
    counts read argmax and top-5 only), valid until the next step."""
    for start in range(0, n_rows, piece):
        stop = min(start + piece, n_rows)
        prepared = [{m: b.prepared(start, stop, mode, own[m][:stop - start]) for m, b in level.items()}
                    for level, (own, _) in zip(read, scratch)]
        if weights is None:
            walks = [running_combine(p, [subsets[i] for i in active], mode, True, sums)
                     for p, (_, sums) in zip(prepared, scratch)]
            for step in zip(*walks):
                yield start, stop, active[step[0][0]], [z for _, z in step]
        else:
            for i in active:
                yield start, stop, i, [combine([p[m] for m in subsets[i]], weights[lv][i][seed], mode,
                                               out=reuse_buffer(sums, 0, p[subsets[i][0]]))
                                       for lv, (p, (_, sums)) in enumerate(zip(prepared, scratch))]


def _read_block(sources: list[list[LogitSource]], members: list[int], seed: int,
                rows: np.ndarray) -> tuple[np.ndarray, list[dict[int, _Block]]]:
    """The block's rows and each level's members read at them."""
    return rows, [{m: _Block.read(level[m], seed, rows) for m in members} for level in sources]


def _ahead(function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """function(item) for each item, the next one computed in a thread while the caller uses this
    one's (reading a block's logits overlaps scoring the previous block)."""
    with ThreadPoolExecutor(1) as pool:
        current = None
        for item in items:
            following = pool.submit(function, item)
            if current is not None:
                yield current.result()
            current = following
        if current is not None:
            yield current.result()


def _blocks(union: np.ndarray, members: list[LogitSource], block: int) -> list[np.ndarray]:
    """`union` cut where every `block`-th row of the member with the most rows falls: members
    holding its rows read whole chunks, whichever rows `skip` or the others leave out."""
    edges = max(members, key=lambda s: len(s.rows)).rows[block::block]
    return [rows for rows in np.split(union, np.searchsorted(union, edges)) if len(rows)]


@dataclass
class _Block:
    """One member's float16 scores at a block's rows, read once: `present` per row, `raw` the
    rows it has, in order, and `before[j]` how many of them come before row j."""

    present: np.ndarray
    raw: np.ndarray
    before: np.ndarray

    @classmethod
    def read(cls, source: LogitSource, seed: int, rows: np.ndarray) -> _Block:
        lo, hi = np.searchsorted(source.rows, [rows[0], rows[-1] + 1])
        own = source.rows[lo:hi]
        at = np.minimum(np.searchsorted(own, rows), max(len(own) - 1, 0))
        present = own[at] == rows if len(own) else np.zeros(len(rows), bool)
        raw = np.asarray(source.array[seed, lo:hi]) if len(own) else np.empty((0, source.array.shape[2]))
        if present.sum() < len(own):  # rows left out of the union (skipped, or another level's)
            raw = raw[at[present]]
        return cls(present, raw, np.concatenate([[0], np.cumsum(present)]))

    def prepared(self, start: int, stop: int, mode: str, out: torch.Tensor) -> torch.Tensor:
        """`late.prepare` of rows start:stop of the block into `out`, zeros where the member has none."""
        raw = torch.from_numpy(self.raw[self.before[start]:self.before[stop]])
        if len(raw) == stop - start:
            return prepare(raw, mode, out)
        out.zero_()[torch.from_numpy(self.present[start:stop])] = prepare(raw, mode)
        return out


def fit_subset_weights(sources: list[LogitSource], subsets: list[tuple[int, ...]], labels: np.ndarray,
                       mode: str, seed: int = 0) -> tuple[list[list[np.ndarray]], list[int]]:
    """Per subset, per seed: member weights fitted on a seeded sample of the validation rows all
    its members have (at most WEIGHT_ROWS, fewer when classes are many); and the sample sizes."""
    n_classes = int(sources[0].array.shape[2])
    weights, sizes = [], []
    for subset in subsets:
        common = functools.reduce(np.intersect1d, [sources[m].rows for m in subset])
        limit = int(min(WEIGHT_ROWS, max(1000, WEIGHT_ELEMENTS // (len(subset) * n_classes))))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(common, limit, replace=False)) if len(common) > limit else common
        per_seed = []
        for k in range(min(sources[m].n_seeds for m in subset)):
            parts = [sources[m].take(k, np.searchsorted(sources[m].rows, sample)).astype(np.float32) for m in subset]
            per_seed.append(fit_late_weights(parts, labels[sample], mode))
        weights.append(per_seed)
        sizes.append(len(sample))
    return weights, sizes

