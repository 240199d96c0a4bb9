"""Bootstrap intervals at iNat shape: what `fgembed.classify.bootstrap` costs next to scoring.

Generated labels: 40,000 test rows, 10,000 classes, predictions right ~75 % of the time, 1,000
resamples (all by default; see the flags). Every candidate is warmed up once, then each repeat
runs all of them in turn (so load on a shared machine hits them alike); reported: seconds min /
median, the ratio of medians to `point`, and the peak memory of one more, untimed run
(tracemalloc: what numpy and scipy allocate during the call, inputs excluded).

  draw           `Resamples(rows, 1000)` drawn in full and kept (once per table, shared by all its rows)
  point          the point metrics alone, by scikit-learn — accuracy_score, f1_score (weighted and
                 macro) and, for balanced accuracy, recall_score(labels=classes in the truth,
                 average="macro"), its very definition: balanced_accuracy_score builds the C × C
                 confusion matrix (800 MB and 5–7 s at 10,000 classes) — per seed
  interval       `bootstrap.interval` of one table row (one seed, then three: the seed-averaged metric)
  paired         `bootstrap.paired` of two rows on the same resamples (one seed, then three)
  table          what a late-fusion table of five members needs, through the code `fgembed ensemble`
                 runs (`table_intervals.row_intervals`): the five singles and the 26 subsets of two
                 or more, three seeds each, every row's interval and every subset's paired
                 difference to its best single member on the subset's rows. One member lacks 0.5 %
                 of the rows, so the 15 subsets holding it are scored on fewer rows, as late fusion
                 does: 36 distributions of three seeds in all, in two groups of rows computed
                 together (`bootstrap.distributions`). The resamples are drawn once, inside.

The target the scoring pass must meet: intervals for all 26 subsets add ≤ 0.5 × to a 40-second
scoring pass, i.e. `table` ≤ 20 s.

Usage: python benchmarks/bootstrap.py [--quick] [--repeats N] [--rows N] [--classes C] [--resamples B] [--seeds S]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import statistics
import time
import tracemalloc
import warnings

import numpy as np
import scipy
import sklearn
from sklearn.metrics import accuracy_score, f1_score, recall_score

from fgembed.analysis.ensemble import Entry
from fgembed.analysis.plan import Combination
from fgembed.analysis.table_intervals import row_intervals
from fgembed.classify import bootstrap
from fgembed.classify.bootstrap import Resamples
from fgembed.classify.intervals import BootstrapConfig, RowPredictions

MEMBERS = 5
SEEDS = 3   # per row (--seeds)


def predictions(rng: np.random.Generator, y: np.ndarray, accuracy: float, n_classes: int,
                seeds: int = SEEDS) -> np.ndarray:
    """[seeds, rows]: right with probability `accuracy` (a little different per seed), else a random class."""
    right = rng.random((seeds, len(y))) < accuracy + rng.normal(0, 0.005, (seeds, 1))
    return np.where(right, y, rng.integers(0, n_classes, (seeds, len(y))))


def sklearn_point(y: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    values = []
    present = np.unique(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pred in preds:
            values.append([accuracy_score(y, pred), f1_score(y, pred, average="weighted", zero_division=0),
                           f1_score(y, pred, average="macro", zero_division=0),
                           recall_score(y, pred, labels=present, average="macro", zero_division=0)])
    return dict(zip(bootstrap.METRICS, np.mean(values, axis=0)))


def table(y: np.ndarray, members: list[np.ndarray], fused: dict, has_row: np.ndarray, n_resamples: int) -> list:
    """What `fgembed ensemble` computes (`table_intervals.row_intervals`): every row's interval and
    every subset's paired difference to its best member, rows on the same test rows together."""
    entries, found = [], {}
    for m, preds in enumerate(members):
        rows = np.flatnonzero(has_row[m])
        entries.append(Entry(Combination("single", (f"m{m}",)), {}, []))
        found[len(entries) - 1] = RowPredictions(rows, preds[:, rows])
    for subset, preds in fused.items():
        rows = np.flatnonzero(np.all(has_row[list(subset)], axis=0))
        entries.append(Entry(Combination("late", tuple(f"m{m}" for m in subset)), {}, []))
        found[len(entries) - 1] = RowPredictions(rows, preds[:, rows])
    row_intervals(entries, found, y, BootstrapConfig(n_resamples))
    return entries


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,000 rows, 1,000 classes, 200 resamples, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds per row (scale.py's singles have one)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.classes, args.resamples, args.repeats = 4000, 1000, 200, 2

    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, args.rows)
    members = [predictions(rng, y, acc, args.classes, args.seeds) for acc in (0.62, 0.66, 0.70, 0.72, 0.75)]
    has_row = np.ones((MEMBERS, args.rows), bool)
    has_row[0, rng.choice(args.rows, args.rows // 200, replace=False)] = False
    subsets = [s for k in range(2, MEMBERS + 1) for s in itertools.combinations(range(MEMBERS), k)]
    fused = {s: predictions(rng, y, 0.72 + 0.02 * len(s), args.classes, args.seeds) for s in subsets}
    a, b = fused[subsets[-1]], members[-1]
    plan = Resamples(args.rows, args.resamples, seed=0)

    cases = {
        "draw": lambda: list(Resamples(args.rows, args.resamples, seed=0).chunks()),
        "point, 1 seed": lambda: sklearn_point(y, a[:1]),
        f"point, {args.seeds} seeds": lambda: sklearn_point(y, a),
        "interval, 1 seed": lambda: bootstrap.interval(y, a[0], plan),
        f"interval, {args.seeds} seeds": lambda: bootstrap.interval(y, a, plan),
        "paired, 1 seed": lambda: bootstrap.paired(y, a[0], b[0], plan),
        f"paired, {args.seeds} seeds": lambda: bootstrap.paired(y, a, b, plan),
        f"table: {len(subsets)} subsets × {args.seeds} seeds": lambda: table(y, members, fused, has_row, args.resamples),
    }
    print(f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"scikit-learn {sklearn.__version__}; {args.rows:,} rows, {args.classes:,} classes, "
          f"{args.resamples:,} resamples; load average {os.getloadavg()[0]:.1f}", flush=True)
    for fn in cases.values():   # warm-up (and the plan's counts drawn and kept)
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name, fn in cases.items():
            seconds[name].append(timed(fn))
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{s[-1]:.2f}" for s in seconds.values()), flush=True)
    peaks = {name: peak_mib(fn) for name, fn in cases.items()}

    print(f"\nload average after: {os.getloadavg()[0]:.1f}; peak RSS of the process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("\n| candidate | seconds, min / median | × point (medians, same seeds) | peak MiB (tracemalloc) |")
    print("|---|---|---|---|")
    for name, secs in seconds.items():
        base = f"point, {args.seeds} seeds" if f"{args.seeds} seeds" in name or "table" in name else "point, 1 seed"
        ratio = "" if name.startswith(("point", "draw", "table")) else \
            f"{statistics.median(secs) / statistics.median(seconds[base]):.1f}×"
        print(f"| {name} | {min(secs):.3f} / {statistics.median(secs):.3f} | {ratio} | {peaks[name]:.0f} |")
    table_s = statistics.median(seconds[f"table: {len(subsets)} subsets × {args.seeds} seeds"])
    print(f"\ntable: {table_s:.1f} s = {table_s / 40:.2f} × a 40-second scoring pass (target ≤ 0.5 ×)")


if __name__ == "__main__":
    main()
