"""Novelty scores of finished runs (`fgembed novelty RUN_DIR …`): the runs → analysis step.

Logit scores read the runs' stored val/test logits (seeds averaged, several runs late-fused by
averaged logits); embedding scores are fitted on the rebuilt view's training rows (the first
run's view; several runs: each run's own view, scores standardised on its seen validation rows
and averaged). Novel rows are the view's held-out classes' test rows; a run without held-out
classes is refused. The fine level is scored (a multi-level run's finest level)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classify.rundir import Run
from ..classify.views import build_view
from ..errors import FgembedError
from .novelty import (
    create_scorer,
    default_tau,
    ensemble_logits,
    fuse_scores,
    level_rows,
    list_scores,
    novel_at_level,
    write_scores,
)


@dataclass
class NoveltyResult:
    records: list[dict]                 # table rows (`novelty.score_row`)
    scores: dict[str, np.ndarray]       # per test row, higher = more novel
    novel: np.ndarray                   # [test rows] bool
    rows: np.ndarray                    # store row ids of the test rows
    path: Path                          # novelty.zarr written


def _logits(runs: list[Run], split: str, level: str | None = None) -> np.ndarray:
    """The runs' logits at `level` (default: each run's finest), seeds averaged, runs late-fused."""
    def one(run: Run) -> np.ndarray:
        levels = run.config.head.levels
        _, z = run.logits(split, level or (levels[-1] if levels else None))
        return z.astype(np.float32).mean(0)
    return ensemble_logits([one(r) for r in runs])


def score_runs(run_dirs: list[str | Path], scores: list[str], *, tau: float | None = None, k: int = 10,
               target_tpr: float = 0.95, storage_options: dict | None = None) -> NoveltyResult:
    """Score, tabulate and write (into the first run dir) the novelty of the runs' test rows
    (`storage_options`: for runs trained on a store at a URL)."""
    unknown = [s for s in scores if s not in list_scores()]
    if unknown or not scores:
        raise FgembedError(f"unknown novelty score {','.join(unknown) or '(none)'}; "
                           f"choose from {', '.join(list_scores())}")
    runs = [Run.load(d) for d in run_dirs]
    for run in runs:
        if not run.meta.get("holdout_classes"):
            raise FgembedError(f"{run.path} held no classes out: refit it with --holdout FRACTION "
                               "[--holdout-level family] to have novel test rows")
    views = [build_view(r.open_store(storage_options), r.config.view) for r in runs]
    rows = views[0].rows["test"]
    for run, view in zip(runs, views):
        if not np.array_equal(run.rows("test"), rows) or not np.array_equal(view.rows["test"], rows):
            raise FgembedError(f"{run.path} has other test rows than {runs[0].path}: fuse runs of one view protocol")
    novel, y = views[0].novel, views[0].labels("test")
    test_logits, val_logits = _logits(runs, "test"), _logits(runs, "val")
    logit_scores = [n for n in scores if create_scorer(n).needs == "logits"]
    test_scores, val_scores = {}, {}
    for name in scores:
        if name in logit_scores:
            scorer = create_scorer(name)
            test_scores[name], val_scores[name] = scorer.score(logits=test_logits), scorer.score(logits=val_logits)
            continue
        per_test, per_val = [], []
        for view in views:
            fitted = create_scorer(name, **({"k": k} if name == "knn" else {})).fit(
                view.X("train").astype(np.float32), view.labels("train"))
            per_test.append(fitted.score(embeddings=view.X("test").astype(np.float32)))
            per_val.append(fitted.score(embeddings=view.X("val").astype(np.float32)))
        if len(views) == 1:
            test_scores[name], val_scores[name] = per_test[0], per_val[0]
        else:
            test_scores[name], val_scores[name] = fuse_scores(per_test, per_val), fuse_scores(per_val, per_val)
    # val rows are all seen (held-out classes leave train and val): thresholds calibrate on them
    levels = runs[0].config.head.levels
    records = level_rows(levels[-1] if levels else "label", test_scores, val_scores, novel, test_logits.argmax(1), y,
                         default_tau(0, 1) if tau is None else tau, target_tpr)
    path = write_scores(runs[0].path, test_scores, rows, novel)
    if all(r.config.head.levels == levels for r in runs):  # multi-level runs: Zusin's table at coarser levels
        for i, level in enumerate(levels[:-1]):
            records += _coarse_rows(runs, views[0], level, default_tau(i, len(levels)) if tau is None else tau,
                                    target_tpr, logit_scores, test_scores, val_scores)
    return NoveltyResult(records, test_scores, novel, rows, path)


def _coarse_rows(runs: list[Run], view, level: str, tau: float, target_tpr: float, logit_scores: list[str],
                 test_scores: dict, val_scores: dict) -> list[dict]:
    """A coarser level's rows: logit scores from that level's head; a row is novel there when its
    group has no training row (with families held out, every order may still be seen: no rows)."""
    y = view.labels("test", level)
    novel = novel_at_level(y, view.labels("train", level))
    if not novel.any():
        return []
    test_logits, val_logits = _logits(runs, "test", level), _logits(runs, "val", level)
    test = {n: create_scorer(n).score(logits=test_logits) if n in logit_scores else v for n, v in test_scores.items()}
    val = {n: create_scorer(n).score(logits=val_logits) if n in logit_scores else v for n, v in val_scores.items()}
    write_scores(runs[0].path, test, view.rows["test"], novel, level=level)
    return level_rows(level, test, val, novel, test_logits.argmax(1), y, tau, target_tpr)
