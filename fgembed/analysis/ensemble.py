"""Score combinations of backbones: single heads, embedding fusions (each a trained run) and late
fusion (averaging the single runs' logits, seed by seed), ranked by weighted F1.

`score` trains the runs the rows need (reusing finished ones, building each view once for the
runs that share it) and scores every row: a fused run's metrics are its own; late-fusion rows
come from one streamed pass over the single runs' stored logits (`late_stream`); `--late-weights
equal,val` scores each late row with equal and with validation-fitted weights (`late-val`), and a
gated row is a gated run of the same single runs (`classify/gated.py`: per-image weights from a
gate trained on validation rows), so all three stand in one table. A late row
carries what a trained run's metrics.json does, `by_frequency` included (binned by the training
rows its members share, as a concat run of them would train on). Multi-level runs
(`--levels order,family,species`) are fused level by level: besides `levels.<level>.*` and
`avg_accuracy`, the row gets `consistency` and `mistake_severity`; its top-level keys are the
finest level's. Members must share their levels; a mix of single-level members (e.g.
`member@knn`, which predicts the finest level only) and multi-level ones fuses that finest level
alone, with one warning. Every row gets bootstrap intervals on the table's shared resamples, and
every fused row its paired difference to the best single member of its subset (`intervals`).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classify.hierarchy_metrics import Taxonomy
from ..classify.intervals import BootstrapConfig, RowPredictions, run_intervals
from ..classify.late import LATE_MODES
from ..classify.longtail import shared_train_counts
from ..classify.config import RunConfig, same_rows
from ..classify.fitting import check_levels, fit_run, run_path
from ..classify.gated import fit_gated
from ..classify.metrics import summarise
from ..classify.rundir import finished, Run
from ..classify.views import build_view, level_key
from ..errors import FgembedError
from ..progress import progress_bar
from ..store import FeatureStore
from .table_intervals import table_intervals
from .late_stream import LogitSource, fit_subset_weights, stream_late_levels
from .plan import Combination, run_config

LATE_WEIGHTS = ("equal", "val")
LATE_STRATEGIES = ("late", "gated")  # rows fused from the members' single runs' logits


def late_weightings(late_weights: str) -> list[str]:
    """`--late-weights`: `equal`, `val`, or both (`equal,val`: each late row twice, the weighted
    one named `late-val`, so the two stand side by side in one table)."""
    chosen = [w.strip() for w in late_weights.split(",") if w.strip()]
    if not chosen or len(set(chosen)) != len(chosen) or any(w not in LATE_WEIGHTS for w in chosen):
        raise FgembedError(f"late weights must be {', '.join(LATE_WEIGHTS)} or both ({','.join(LATE_WEIGHTS)}), "
                           f"got {late_weights!r}")
    return chosen


@dataclass
class Entry:
    """One scored row of the table: the combination, its metrics (mean, `_std`) and its runs;
    `predictions`, where the row is not one run's, its test predictions (the intervals')."""

    combination: Combination
    metrics: dict
    runs: list[Path]
    weights: list[float] | None = None
    predictions: RowPredictions | None = None


def score(store: FeatureStore, runs_dir: str | Path, combinations: list[Combination], base: RunConfig,
          device: str = "auto", force: bool = False, late_mode: str = "logits", late_weights: str = "equal",
          progress: bool = False, bootstrap: BootstrapConfig = BootstrapConfig(),
          added: Sequence[Run] = ()) -> list[Entry]:
    """Train the runs the combinations need (reusing finished ones) and score them all.

    `base` gives the head and the view settings of every run (build its view with fusion `sum`
    to carry l2 / projection settings); its features are replaced per combination. `bootstrap`
    says how the rows' intervals are computed (0 resamples: none). `added`: finished runs of the
    same rows (`--run`: a distilled student, …), a row each, as they are."""
    added = [_added_row(store, run) for run in added]  # another store's run: one line before any work
    weightings = late_weightings(late_weights)
    if late_mode not in LATE_MODES:
        raise FgembedError(f"late fusion mode must be one of {', '.join(LATE_MODES)}, got {late_mode!r}")
    check_levels(store, base)
    needed: dict[tuple[str, tuple[str, ...]], RunConfig] = {}
    for combo in combinations:
        if combo.strategy in LATE_STRATEGIES:  # fused from the members' single runs
            needed.update({("single", (m,)): run_config(base, "single", (m,)) for m in combo.members})
        else:
            needed[combo.strategy, combo.members] = run_config(base, combo.strategy, combo.members)
    runs = _train_all(store, runs_dir, needed, device, force, progress, bootstrap)
    entries, late, gated, of_run = [], [], [], {}
    for combo in combinations:
        if combo.strategy in LATE_STRATEGIES:
            (late if combo.strategy == "late" else gated).append(combo)
        else:
            run = runs[combo.strategy, combo.members]
            entries.append(Entry(combo, run.metrics, [run.path]))
            of_run[id(entries[-1])] = run
    if late or gated:
        singles = {m: runs["single", (m,)] for combo in late + gated for m in combo.members}
        if len({run.config.head.head for run in singles.values()}) > 1 and late_mode != "proba":
            late_mode = "proba"  # heads whose scores differ in scale (CONVENTIONS): average probabilities
            warnings.warn("late fusion of different heads averages probabilities (--late-mode proba)")
    for weighting in weightings if late else ():
        rows = late_entries(store, singles, late, base.head.level, late_mode, weighting)
        if weighting != "equal" and len(weightings) > 1:  # both in one table: the weighted rows are late-val
            for entry in rows:
                entry.combination = Combination(f"late-{weighting}", entry.combination.members)
        entries += rows
    for combo in gated:  # a gated run per subset, trained on validation rows (classify/gated.py)
        run = run_intervals(fit_gated(store, [singles[m] for m in combo.members], runs_dir, mode=late_mode,
                                      device=device, force=force, progress=progress), store, bootstrap)
        entries.append(Entry(combo, run.metrics, [run.path], np.mean(run.metrics["gate_weights"], 0).round(4).tolist()))
        of_run[id(entries[-1])] = run
    for run in added:
        entries.append(Entry(Combination(added_strategy(run), run.config.view.features),
                             run_intervals(run, store, bootstrap).metrics, [run.path]))
        of_run[id(entries[-1])] = run
    if bootstrap.enabled:
        table_intervals(entries, of_run, store, base.head.levels[-1] if base.head.levels else base.head.level,
                        bootstrap)
    return sorted(entries, key=lambda e: -e.metrics["f1"])


def added_strategy(run: Run) -> str:
    """The strategy a finished run stands under in a table: `distilled` for a student, else its
    view's fusion (`single` for one member)."""
    return "distilled" if run.config.head.teacher else run.config.view.fusion


def _added_row(store: FeatureStore, run: Run) -> Run:
    identity = {"manifest_sha256": store.samples_attrs["manifest_sha256"], "content_sha256": store.content_sha256()}
    if not same_rows(run.store, identity):
        raise FgembedError(f"--run {run.path} was trained on another store (other rows) than {store.path}")
    return run


def _train_all(store: FeatureStore, runs_dir: str | Path, needed: dict, device: str, force: bool,
               progress: bool, bootstrap: BootstrapConfig) -> dict:
    """Reuse finished runs; train the rest under one progress bar (epochs of every run to train),
    building each view once for the runs that share it."""
    runs, todo = {}, []
    for key, config in needed.items():
        path, _ = run_path(store, config, runs_dir)
        run = None if force else finished(path)
        if run is None:
            todo.append((key, config))
        else:
            runs[key] = run_intervals(run, store, bootstrap)
    todo.sort(key=lambda item: repr(item[1].view))
    total = sum(config.head.total_epochs for _, config in todo)
    with progress_bar(total, f"training {len(todo)} runs", enabled=progress, unit="epoch") as tick:
        view = None
        for i, (key, config) in enumerate(todo, 1):
            what = f"run {i}/{len(todo)} {config.label}"  # the bar counts every run's epochs: say which
            tick(0, description=f"{what} (reading)")
            if view is None or view.config != config.view:
                view = None  # free the previous view before reading the next
                view = build_view(store, config.view, device=device)
            tick(0, description=what)
            runs[key] = fit_run(store, config, runs_dir, device=device, force=True, view=view,
                                tick=lambda n=1, description=None: tick(n), bootstrap=bootstrap)
        tick(0, description=f"trained {len(todo)} run{'s' * (len(todo) != 1)}")
    return runs


# ---- streamed late fusion ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedLevel:
    """A level late fusion scores: its name (a taxonomy level, `label` for the fine one) and, per
    member, the `logits.zarr` group that holds its logits (None: the root, a single-level run)."""

    name: str
    groups: tuple[str | None, ...]


def fused_levels(singles: dict[str, Run], level: str | None) -> tuple[list[FusedLevel], bool]:
    """The levels to fuse, coarse → fine, and whether rows get per-level metrics.

    Single-level members: their one level (`level`, None = fine). Multi-level members must share
    --levels: every level is fused. A mix fuses the multi-level members' finest level only, with a
    warning (a single-level member predicts no coarser level); it must be the level the
    single-level members were trained on."""
    names = list(singles)
    levels = {m: singles[m].config.head.levels for m in names}
    distinct = list(dict.fromkeys(lv for lv in levels.values() if lv))
    if not distinct:
        return [FusedLevel(level or "label", (None,) * len(names))], False
    if len(distinct) > 1:
        raise FgembedError("late fusion members must share their --levels: " + "; ".join(
            f"{m} {','.join(lv)}" for m, lv in levels.items() if lv))
    shared = distinct[0]
    plain = [m for m in names if not levels[m]]
    if not plain:
        return [FusedLevel(lv, (lv,) * len(names)) for lv in shared], True
    finest = shared[-1]
    other = [m for m in plain if level_key(singles[m].config.head.level) != level_key(finest)]
    if other:
        raise FgembedError(f"late fusion of single- and multi-level members needs the single-level ones trained on "
                           f"the finest level {finest!r}; {', '.join(other)} is not")
    warnings.warn(f"late fusion of single-level ({', '.join(plain)}) and multi-level members scores the finest "
                  f"level ({finest}) only")
    return [FusedLevel(finest, tuple(finest if levels[m] else None for m in names))], False


def late_entries(store: FeatureStore, singles: dict[str, Run], combos: list[Combination], level: str | None,
                 mode: str, weights_from: str) -> list[Entry]:
    """Late fusion of every combination in `combos` from the single runs, all levels
    (`fused_levels`) in one streamed pass: metrics of the finest level at the top, with
    `by_frequency`; per-level ones under `levels`, `consistency` and `mistake_severity` when the
    members are multi-level."""
    first = next(iter(singles.values())).store
    if not all(same_rows(r.store, first) for r in singles.values()):
        raise FgembedError("late fusion members were trained on different stores (different rows): "
                           + ", ".join(str(r.path) for r in singles.values()))
    names = list(singles)
    subsets = [tuple(names.index(m) for m in c.members) for c in combos]
    held = sorted({c for r in singles.values() for c in r.meta.get("holdout_classes", [])})
    novel = np.isin(store.labels(), held) if held else None  # novel test rows are not scored
    levels, per_level = fused_levels(singles, level)
    taxonomy = Taxonomy.from_store(store, [lv.name for lv in levels]) if per_level else None
    labels = [store.labels(level=level_key(lv.name)).astype(np.int64) for lv in levels]
    weights, sample_rows = None, []
    if weights_from == "val":  # per level; the finest level's are the ones reported
        fitted = [fit_subset_weights([LogitSource.of(singles[m], "val", g) for m, g in zip(names, lv.groups)],
                                     subsets, y, mode) for lv, y in zip(levels, labels)]
        weights, sample_rows = [w for w, _ in fitted], fitted[-1][1]
    test = [[LogitSource.of(singles[m], "test", g) for m, g in zip(names, lv.groups)] for lv in levels]
    counts = shared_train_counts(store, list(singles.values()), subsets, levels[-1].name,
                                 int(test[-1][0].array.shape[2]))
    results = stream_late_levels(test, subsets, labels, mode, weights, skip=novel, taxonomy=taxonomy,
                                 train_counts=counts, bins=singles[names[0]].config.head.shot_bins)
    entries = []
    for i, combo in enumerate(combos):
        per_seed, n_rows, preds = results[i]
        seeds = singles[combo.members[0]].metrics["seeds"][:len(per_seed)]
        metrics = summarise(per_seed) | {"per_seed": per_seed, "n_test": n_rows, "seeds": seeds}
        if per_level:
            metrics["level_order"] = [lv.name for lv in levels]
        mean_weights = None
        if weights is not None:
            metrics["late_weight_rows"] = sample_rows[i]
            mean_weights = np.mean(weights[-1][i], axis=0).round(4).tolist()
        rows = functools.reduce(lambda x, y: np.intersect1d(x, y, assume_unique=True),
                                [test[-1][names.index(m)].rows for m in combo.members])
        rows = rows if novel is None else rows[~novel[rows]]   # the rows the stream scored, in its order
        entries.append(Entry(combo, metrics, [singles[m].path for m in combo.members], mean_weights,
                             RowPredictions(rows, preds)))
    return entries

