"""Bootstrap intervals and paired differences of classification metrics, over test images.

A point metric says nothing about how much it would move on another test set of the same size;
a fusion gain of a point or two on a few thousand images may be noise. Every metric therefore
gets a 95 % percentile bootstrap interval over the test images, and a fused row its difference
to another row (the best single member of its subset) with a paired interval and p-value,
computed on the same resamples.

**Resamples.** The ordinary nonparametric bootstrap: a resample draws the n test rows n times
with replacement, held as how many times each row was drawn (multinomial counts). The draws come
from one seeded numpy `Generator` stream, exactly as `scipy.stats.bootstrap` draws its indices
(`rng.integers(0, n, (n_resamples, n))`), generated a chunk of resamples at a time. numpy's
stream does not depend on how the draws are split into calls, so a seed gives the same
resamples whatever the chunk size — and the very resamples scipy uses with
`rng=np.random.default_rng(seed)`. Counts are stored in the smallest unsigned dtype that holds a
chunk's largest count (uint8 in practice: 40 MB for 40,000 rows × 1,000 resamples, never an
int64 [resamples, rows] matrix) and kept while they fit in `CACHE_BYTES`, so every metric and
every row of a table reuses the same draws without drawing them again.

**Per-class counts per resample.** True positives, support and predicted count of each class
are weighted bincounts of the row counts — for a block of resamples at once, as one sparse
one-hot [classes, rows] matrix times the dense [rows, resamples] counts (scipy.sparse), which is
O(rows × resamples) and never a C × C confusion matrix. Only classes present in the truth or a
prediction get a row: the others count for nothing in any metric. Rows of a table scored on the
same test rows (`distributions`) share a block's counts, their support per class and all that
follows from it: each further row costs its own true positives and wrong predictions only.

**Metrics** from those counts, as scikit-learn defines them: `accuracy`; `f1` is
`f1_score(average="weighted")` and `f1_macro` `f1_score(average="macro")` over the classes
present in the truth or the prediction (labels absent from both are ignored, a 0/0 F1 counts as
0: zero_division=0); `balanced_accuracy` is `balanced_accuracy_score`, the mean recall over the
classes present in the truth.

**Seeds.** A run has predictions per training seed; its table value is the mean over seeds.
The interval is that of the seed-averaged metric: each resample draws the same test rows for
every seed and scores the mean of the seeds' metrics. It measures test-set sampling error of
the reported number, not training noise across seeds (that is the `_std` beside it).

**Row subsets.** A resample is over the table's test rows. A row scored on part of them (a
late-fusion subset scored where all its members have a row) takes `rows=`: its rows' counts
are used and the rest ignored, so all rows of a table share the same resamples and stay
paired. A resample that draws none of a subset's rows has no value for it and is left out of
its quantiles.

**Paired differences** are the per-resample difference a − b of the two rows' metrics on the
same resamples (and rows): `delta_<metric>` (the point difference), `delta_<metric>_ci` (its
percentile interval) and `delta_<metric>_p`, a two-sided p-value for "no difference": the
achieved significance level read off the bootstrap distribution of the difference as the dual
of its percentile interval (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993) —
twice the smaller share of resampled differences at or beyond 0 on either side — with the
(1 + count) / (1 + resamples) Monte-Carlo correction (Davison & Hinkley, *Bootstrap Methods and
their Application*, 1997; North, Curtis & Sham, "A note on the calculation of empirical P values
from Monte Carlo procedures", 2002) so that a finite number of resamples never gives p = 0,
capped at 1. Resampled differences of exactly 0 count on both sides, which keeps the test
conservative for metrics that move in steps. p < 1 − confidence exactly when 0 lies outside the
interval, up to the quantile interpolation and the +1; identical predictions give delta 0,
interval [0, 0] and p = 1.

**Macro F1 with few test rows per class.** A resample leaves out every test row of about e^−m of
the classes with m rows; such a class, still predicted for some other row, enters the macro
average with F1 = 0. Resampled macro F1 therefore runs below its point value, and with a handful
of rows per class its percentile interval need not contain it: at 40,000 rows over 10,000 classes
(4 a class, 80 % right) the point is 0.771, the resampled mean 0.746 and the interval
[0.741, 0.751]; at 10 a class the shift is −0.010, at CUB's 29 −0.003. Accuracy, weighted F1
and balanced accuracy (which average over the rows drawn, or over the classes drawn) shift by
less than 0.0002 in the same runs. A difference between two rows on the same resamples mostly
cancels it: +0.003 there for two rows 5 points apart, whose interval holds the point difference.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from ..errors import FgembedError

METRICS = ("accuracy", "f1", "f1_macro", "balanced_accuracy")
N_RESAMPLES = 1000
CONFIDENCE = 0.95
CHUNK_DRAWS = 2 ** 21       # row draws per generated chunk of resamples (16 MB of int64 indices)
CACHE_BYTES = 2 ** 28       # counts kept in memory up to this size (256 MiB), else drawn again per pass
BLOCK_ELEMENTS = 2 ** 23    # float32 per-class sums (or row weights) per block of resamples: 32 MB
CLASS_GROUP = 128           # classes summed in float32 before the float64 sum across groups
UINT16_ROWS = 2 ** 16       # tables of fewer rows sum their counts per class in uint16 (no sum can exceed the rows)
TINY = 1e-30                # added to support + predicted (integers ≥ 0): 0 / TINY = 0, n + TINY = n in float32


class Resamples:
    """The resampling plan shared by every metric and every row of a table: for each of
    `n_resamples` bootstrap resamples, how many times each of the table's `n_rows` test rows is
    drawn. Seeded; the same seed gives the same resamples whatever `chunk_size`."""

    def __init__(self, n_rows: int, n_resamples: int = N_RESAMPLES, seed: int = 0, *,
                 chunk_size: int | None = None) -> None:
        if n_rows < 1:
            raise FgembedError(f"bootstrap needs at least one test row, got {n_rows}")
        if n_resamples < 1:
            raise FgembedError(f"bootstrap needs at least one resample, got {n_resamples}")
        if seed < 0:
            raise FgembedError(f"bootstrap seed must be 0 or more, got {seed}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.n_rows, self.n_resamples, self.seed = int(n_rows), int(n_resamples), int(seed)
        self.chunk_size = int(chunk_size or max(1, min(self.n_resamples, CHUNK_DRAWS // self.n_rows)))
        self._cache: list[np.ndarray] | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        """What makes two plans draw the same resamples."""
        return self.n_rows, self.n_resamples, self.seed

    def chunks(self) -> Iterator[np.ndarray]:
        """Counts per chunk of resamples, in order: [n_rows, k] unsigned integers, column j the
        number of times each row is drawn in that chunk's j-th resample (each column sums to
        n_rows)."""
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[np.ndarray] | None = []
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.n_resamples, self.chunk_size):
            k = min(self.chunk_size, self.n_resamples - start)
            drawn = rng.integers(0, self.n_rows, (k, self.n_rows))
            drawn += np.arange(0, k * self.n_rows, self.n_rows)[:, None]
            counts = np.bincount(drawn.ravel(), minlength=k * self.n_rows).reshape(k, self.n_rows)
            counts = np.ascontiguousarray(counts.astype(np.min_scalar_type(counts.max())).T)
            if kept is not None:
                kept.append(counts)
                if sum(c.nbytes for c in kept) > CACHE_BYTES:
                    kept = None
            yield counts
        self._cache = kept


@dataclass(frozen=True, eq=False)
class Distribution:
    """One table row's metrics: the point values and their value on every resample."""

    point: dict[str, float]
    resampled: dict[str, np.ndarray]    # [n_resamples] per metric; NaN where no row of `rows` was drawn
    rows: np.ndarray                    # the table rows scored (positions), sorted
    resamples: tuple[int, int, int]     # Resamples.key

    def interval(self, confidence: float = CONFIDENCE) -> dict[str, float | list[float]]:
        """`<metric>` and `<metric>_ci: [lo, hi]`, the percentile interval."""
        _check_confidence(confidence)
        out: dict[str, float | list[float]] = {}
        for name, value in self.point.items():
            out[name] = value
            out[f"{name}_ci"] = _percentile_interval(self.resampled[name], confidence)
        return out

    def paired(self, other: Distribution, confidence: float = CONFIDENCE) -> dict[str, float | list[float]]:
        """This row minus `other`, resample by resample: `delta_<metric>`, `delta_<metric>_ci`,
        `delta_<metric>_p`. Both must come from the same resamples and the same rows."""
        _check_confidence(confidence)
        if self.resamples != other.resamples:
            raise ValueError(f"paired rows need the same resamples, got {self.resamples} and {other.resamples}")
        if not np.array_equal(self.rows, other.rows):
            raise ValueError("paired rows must be scored on the same test rows")
        if self.point.keys() != other.point.keys():
            raise ValueError(f"paired rows need the same metrics, got {list(self.point)} and {list(other.point)}")
        out: dict[str, float | list[float]] = {}
        for name in self.point:
            delta = self.resampled[name] - other.resampled[name]
            out[f"delta_{name}"] = self.point[name] - other.point[name]
            out[f"delta_{name}_ci"] = _percentile_interval(delta, confidence)
            out[f"delta_{name}_p"] = _p_value(delta)
        return out


def distribution(y_true: np.ndarray, y_pred: np.ndarray, resamples: Resamples,
                 metrics: Sequence[str] = METRICS, *, rows: np.ndarray | None = None,
                 n_classes: int | None = None) -> Distribution:
    """Point values and bootstrap distribution of `metrics` for one table row.

    `y_pred` is [rows] or [seeds, rows] (the metric is then the mean over seeds, resample by
    resample). `rows` says which of the table's test rows `y_true` / `y_pred` hold: a boolean
    mask over the table's rows or their positions; None means all of them, in order. Labels are
    class ids ≥ 0, below `n_classes` when it is given. The four metrics are computed together
    (they share the per-class counts); `metrics` picks those returned.
    """
    return distributions(y_true, [y_pred], resamples, metrics, rows=rows, n_classes=n_classes)[0]


def distributions(y_true: np.ndarray, y_preds: Sequence[np.ndarray], resamples: Resamples,
                  metrics: Sequence[str] = METRICS, *, rows: np.ndarray | None = None,
                  n_classes: int | None = None) -> list[Distribution]:
    """`distribution` of each of several rows' predictions on the same test rows, at once: the
    rows' counts, their support per class and what follows from it are computed once per block
    of resamples for all of them (a table's rows on the same test rows share them)."""
    metrics = _check_metrics(metrics)
    positions = _positions(rows, resamples.n_rows)
    y = np.asarray(y_true)
    preds = [np.asarray(p) for p in y_preds]
    preds = [p[None] if p.ndim == 1 else p for p in preds]
    if y.ndim != 1 or not preds or any(p.ndim != 2 or len(p) == 0 for p in preds):
        raise ValueError(f"y_true must be [rows] and each y_pred [rows] or [seeds, rows], got {y.shape} and "
                         f"{[np.shape(p) for p in y_preds]}")
    if len(y) != len(positions) or any(p.shape[1] != len(positions) for p in preds):
        raise ValueError(f"y_true ({len(y)}) and y_pred ({[p.shape[1] for p in preds]}) must have one label per "
                         f"scored row ({len(positions)})")
    if len(positions) == 0:
        raise ValueError("no test rows to score")
    order = np.argsort(positions, kind="stable")
    positions, y, preds = positions[order], y[order], [p[:, order] for p in preds]
    classes, labels = np.unique(np.concatenate([y, *(p.ravel() for p in preds)]), return_inverse=True)
    if (not np.issubdtype(classes.dtype, np.integer) or classes[0] < 0
            or (n_classes is not None and classes[-1] >= n_classes)):
        expected = "≥ 0" if n_classes is None else f"in [0, {n_classes})"
        raise ValueError(f"labels must be integer class ids {expected}, got values from {classes[0]} to {classes[-1]}")
    truth = _Truth(labels[:len(y)], len(classes))
    bounds = np.cumsum([len(y), *(p.size for p in preds)])
    sets = [_ClassSums(truth, labels[a:b].reshape(p.shape)) for a, b, p in zip(bounds[:-1], bounds[1:], preds)]
    ones = truth.stats(np.ones((len(y), 1)))
    points = [{name: float(v[0]) for name, v in c.metrics(np.ones((len(y), 1)), ones, metrics).items()} for c in sets]
    resampled = [{name: np.empty(resamples.n_resamples) for name in metrics} for _ in sets]
    # the counts as they are where every per-class sum fits uint16 (`_apply`), else as floats
    dtype = None if resamples.n_rows < UINT16_ROWS else np.float32 if resamples.n_rows < 2 ** 24 else np.float64
    block = max(1, BLOCK_ELEMENTS // max(truth.n_classes + max(c.n_sums for c in sets), len(y)))
    start = 0
    for counts in resamples.chunks():
        counts = counts if rows is None else counts[positions]
        for b in range(0, counts.shape[1], block):
            weights = counts[:, b:b + block] if dtype is None else counts[:, b:b + block].astype(dtype)
            stats = truth.stats(weights)
            stop = start + weights.shape[1]
            for c, out in zip(sets, resampled):
                for name, v in c.metrics(weights, stats, metrics).items():
                    out[name][start:stop] = v
            start = stop
    return [Distribution(point, r, positions, resamples.key) for point, r in zip(points, resampled)]


def interval(y_true: np.ndarray, y_pred: np.ndarray, resamples: Resamples, metrics: Sequence[str] = METRICS, *,
             rows: np.ndarray | None = None, n_classes: int | None = None,
             confidence: float = CONFIDENCE) -> dict[str, float | list[float]]:
    """Each metric's point value and percentile interval: `{<metric>: v, <metric>_ci: [lo, hi]}`.
    Arguments as `distribution`."""
    _check_confidence(confidence)
    return distribution(y_true, y_pred, resamples, metrics, rows=rows, n_classes=n_classes).interval(confidence)


def paired(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, resamples: Resamples,
           metrics: Sequence[str] = METRICS, *, rows: np.ndarray | None = None, n_classes: int | None = None,
           confidence: float = CONFIDENCE) -> dict[str, float | list[float]]:
    """The difference a − b per metric on the same resamples and rows: `delta_<metric>`,
    `delta_<metric>_ci: [lo, hi]`, `delta_<metric>_p`. Each of `pred_a`, `pred_b` is [rows] or
    [seeds, rows] (seed counts may differ); other arguments as `distribution`."""
    _check_confidence(confidence)
    a = distribution(y_true, pred_a, resamples, metrics, rows=rows, n_classes=n_classes)
    b = distribution(y_true, pred_b, resamples, metrics, rows=rows, n_classes=n_classes)
    return a.paired(b, confidence)


def _onehot(at: np.ndarray, where: np.ndarray, n_sums: int, n: int) -> scipy.sparse.csr_array:
    return scipy.sparse.csr_array((np.ones(len(at), np.uint16), (at, where)), shape=(n_sums, n))


def _apply(onehot: scipy.sparse.csr_array, weights: np.ndarray) -> np.ndarray:
    """`onehot @ weights` as floats. Bootstrap counts (unsigned integers; `distributions` passes
    them so only while a table has fewer than UINT16_ROWS rows: every per-class sum fits) go through
    exact uint16 sums — a quarter of float32's memory traffic, and no float copy of the counts —
    then float32; float weights (the point values' ones, larger tables' counts) in their dtype."""
    if weights.dtype.kind == "u":
        return (onehot @ weights).astype(np.float32)
    return onehot.astype(weights.dtype) @ weights


class _Truth:
    """Per-class support of weighted rows, and what every metric needs of it: one sparse one-hot
    [classes, rows] applied to row weights [rows, resamples]. Classes are padded to whole groups
    of `CLASS_GROUP` (zero rows, which count for nothing) so that sums over classes can be taken
    group by group."""

    def __init__(self, y: np.ndarray, n_classes: int) -> None:
        self.y = y
        self.n_classes = -(-n_classes // CLASS_GROUP) * CLASS_GROUP
        self.onehot = _onehot(y, np.arange(len(y)), self.n_classes, len(y))

    def stats(self, weights: np.ndarray) -> tuple[np.ndarray, ...]:
        """(support [classes, k], rows n [k], 1 / support, classes in the truth [k]) per column."""
        support = _apply(self.onehot, weights)
        with np.errstate(divide="ignore", invalid="ignore"):
            return support, _sum_classes(support), 1 / np.maximum(support, 1), np.count_nonzero(support, axis=0)


class _ClassSums:
    """Per seed, true positives and wrong predictions per class of weighted rows (support + wrong
    + tp is support + predicted, so each row enters once per seed): one sparse one-hot
    [2 seeds × classes, rows] applied to the row weights."""

    def __init__(self, truth: _Truth, preds: np.ndarray) -> None:
        n_seeds, n = preds.shape
        y = truth.y
        self.n_seeds, self.n_classes = n_seeds, truth.n_classes
        self.n_sums = 2 * n_seeds * self.n_classes
        where, at = [], []
        for s, pred in enumerate(preds):
            right, wrong = np.flatnonzero(pred == y), np.flatnonzero(pred != y)
            where += [right, wrong]
            at += [2 * s * self.n_classes + y[right], (2 * s + 1) * self.n_classes + pred[wrong]]
        self.onehot = _onehot(np.concatenate(at), np.concatenate(where), self.n_sums, n)

    def metrics(self, weights: np.ndarray, truth: tuple[np.ndarray, ...], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Each metric, averaged over seeds, for each column of row weights [rows, k] → [k];
        `truth`: `_Truth.stats` of the same weights.

        Per-class sums of bootstrap counts are integers (uint16 or float32 below 2**24: exact),
        held as float32, which keeps a block in cache; ratios are float32 (relative error ~6e-8)
        and their sums over classes float32 within a group of classes, float64 across groups —
        within ~1e-7 of float64 throughout, far below the resampling's own Monte-Carlo error.
        """
        sums = _apply(self.onehot, weights).reshape(2 * self.n_seeds, self.n_classes, -1)
        support, n, recall_scale, n_true_classes = truth
        total = {name: np.zeros(weights.shape[1]) for name in METRICS}
        with np.errstate(divide="ignore", invalid="ignore"):   # a resample that drew none of the rows: NaN
            for s in range(self.n_seeds):   # in place: the seed's sums are not needed afterwards
                tp, wrong = sums[2 * s], sums[2 * s + 1]
                total["accuracy"] += _sum_classes(tp) / n
                both = np.add(np.add(support, wrong, out=wrong), tp, out=wrong)   # support + predicted
                n_present = np.count_nonzero(both, axis=0)
                # F1 = 2PR / (P + R) = 2 tp / (support + predicted), 0 where tp = 0 (0/0 included: a
                # tiny addend, exact on the integer counts, spares a pass of max(·, 1))
                half_f1 = np.divide(tp, np.add(both, TINY, out=both), out=both)
                total["f1_macro"] += 2 * _sum_classes(half_f1) / n_present
                total["f1"] += 2 * _dot_classes(half_f1, support) / n
                total["balanced_accuracy"] += _dot_classes(tp, recall_scale) / n_true_classes
        return {name: total[name] / self.n_seeds for name in names}


def _sum_classes(values: np.ndarray) -> np.ndarray:
    """[classes, k] → [k] in float64: float32 sums over groups of classes, then float64 across."""
    return values.reshape(-1, CLASS_GROUP, values.shape[1]).sum(1).sum(0, dtype=np.float64)


def _dot_classes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`_sum_classes(a * b)` in one pass, without the product's array (einsum per group of classes)."""
    shape = (-1, CLASS_GROUP, a.shape[1])
    return np.einsum("gck,gck->gk", a.reshape(shape), b.reshape(shape)).sum(0, dtype=np.float64)


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        raise FgembedError(f"bootstrap metrics must be distinct names among {', '.join(METRICS)}; got "
                           f"{', '.join(metrics) or 'none'}")
    return metrics


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise FgembedError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _positions(rows: np.ndarray | None, n_rows: int) -> np.ndarray:
    """Table row positions from None (all), a boolean mask or positions."""
    if rows is None:
        return np.arange(n_rows)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n_rows,):
            raise ValueError(f"a row mask must have one entry per table row ({n_rows}), got shape {rows.shape}")
        return np.flatnonzero(rows)
    if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
        raise ValueError("rows must be a boolean mask or a 1-d array of row positions")
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"row positions must lie in [0, {n_rows})")
    if rows.size > 1 and not (np.diff(np.sort(rows)) > 0).all():
        raise ValueError("row positions must be distinct")
    return rows.astype(np.int64)


def _percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """Linear-interpolated quantiles at (1 ∓ confidence) / 2, as scipy.stats.bootstrap's
    method="percentile" takes them; resamples without a value (NaN) are left out."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return [float(lo), float(hi)]


def _p_value(delta: np.ndarray) -> float:
    """Two-sided: twice the smaller share of resampled differences at or beyond 0 on either side,
    (1 + count) / (1 + resamples), capped at 1."""
    delta = delta[~np.isnan(delta)]
    if delta.size == 0:
        return float("nan")
    beyond = min(int((delta <= 0).sum()), int((delta >= 0).sum()))
    return min(1.0, 2 * (1 + beyond) / (1 + delta.size))
