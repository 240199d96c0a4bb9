"""Bootstrap intervals of an ensemble table's rows, and each fused row's paired difference to the
best single member of its subset.

Every row of a table is resampled on one shared set of resamples over the table's test rows (the
union of the store rows any row scores; seeded, `BootstrapConfig`), so any two rows are paired: a
resample draws the same test images for both. A row scored on part of those rows (a late subset
where a member lacks an image) uses their counts alone (`bootstrap.distribution(rows=…)`).

A fused row (any strategy of two or more members: concat, PCA sum, late, a registered fusion) is
read against its members' single rows on the rows all of them have, metric by metric against the
member whose point value of that metric is best there: `delta_<metric>`, its paired interval
`delta_<metric>_ci`, its two-sided p-value `delta_<metric>_p` and the member `delta_<metric>_vs`.
A distilled student (`fgembed distill`, added with `--run`) is read so too, a one-backbone student
against that backbone's single row: its own plain head.

Rows scored on the same test rows are computed together (`bootstrap.distributions`: the counts
of a block of resamples, their support per class and what follows from it, once for all of them).
Predictions come from where the row's numbers came from: a run's stored test predictions (its
held-out classes' rows left out, as its metrics leave them out), or those the row's scorer kept
(`Entry.predictions`: late fusion keeps every subset's per seed). A row with neither gets no
interval.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..classify.bootstrap import METRICS, Distribution, distributions
from ..classify.intervals import BootstrapConfig, RowPredictions, delta_keys, interval_keys, stored_predictions
from ..classify.views import level_key

if TYPE_CHECKING:
    from ..classify.rundir import Run
    from ..store import FeatureStore
    from .ensemble import Entry


def run_predictions(run: Run, fine_labels: np.ndarray) -> RowPredictions:
    """A run's test predictions at its finest level on the rows its metrics score."""
    levels = run.config.head.levels
    rows, preds = stored_predictions(run, levels[-1] if levels else None)
    seen = ~np.isin(fine_labels[rows], run.meta.get("holdout_classes", []))
    return RowPredictions(rows[seen], preds[:, seen])


def table_intervals(entries: list[Entry], of_run: dict[int, Run], store: FeatureStore, level: str | None,
                    config: BootstrapConfig) -> None:
    """Add each row's intervals (and a fused row's paired differences) to its metrics, in place.
    `of_run` maps `id(entry)` to the run a row is; `level` is the level the rows score."""
    labels = store.labels(level=level_key(level)).astype(np.int64)
    fine = store.labels()
    found: dict[int, RowPredictions] = {}
    for i, entry in enumerate(entries):
        if entry.predictions is not None:
            found[i] = entry.predictions
        elif id(entry) in of_run:
            found[i] = run_predictions(of_run[id(entry)], fine)
    row_intervals(entries, found, labels, config)


def row_intervals(entries: list[Entry], found: dict[int, RowPredictions], labels: np.ndarray,
                  config: BootstrapConfig) -> None:
    """`table_intervals` once the rows' predictions are at hand: `found[i]`, entry i's (rows
    without one get nothing); `labels` by store row."""
    found = {i: p for i, p in found.items() if len(p.rows)}
    if not found:
        return
    union = np.unique(np.concatenate([p.rows for p in found.values()]))
    resamples = config.resamples(len(union))
    singles = {entries[i].combination.members[0]: i for i in found if entries[i].combination.strategy == "single"}
    # what each row is compared on: its own rows; a fused row's rows shared with all its members
    wanted: dict[bytes, tuple[np.ndarray, set[int]]] = {}

    def want(i: int, rows: np.ndarray) -> bytes:
        key = rows.tobytes()
        wanted.setdefault(key, (rows, set()))[1].add(i)
        return key

    own = {i: want(i, p.rows) for i, p in found.items()}
    pairs: dict[int, tuple[bytes, list[int]]] = {}
    for i, p in found.items():
        members = [singles.get(m) for m in entries[i].combination.members]
        fused = len(members) > 1 or entries[i].combination.strategy == "distilled"  # a student: vs its plain head
        if fused and None not in members:
            common = functools.reduce(lambda x, y: np.intersect1d(x, y, assume_unique=True),
                                      [p.rows, *(found[j].rows for j in members)])  # sorted, distinct rows
            if len(common):
                pairs[i] = (want(i, common), members)
                for j in members:
                    want(j, common)
    scored: dict[tuple[int, bytes], Distribution] = {}
    for key, (rows, who) in wanted.items():   # the rows on the same test rows share their counts
        who = sorted(who)
        preds = [found[i].preds[:, np.searchsorted(found[i].rows, rows)] for i in who]
        dists = distributions(labels[rows], preds, resamples, METRICS, rows=np.searchsorted(union, rows))
        scored.update({(i, key): d for i, d in zip(who, dists)})
    for i, p in found.items():
        entry = entries[i]
        extra = interval_keys(scored[i, own[i]], config.confidence) | {"bootstrap": config.block(len(p.rows))}
        if i in pairs:
            key, members = pairs[i]
            extra |= delta_keys(scored[i, key], {entries[j].combination.members[0]: scored[j, key] for j in members},
                                config.confidence)
        entry.metrics = entry.metrics | extra
