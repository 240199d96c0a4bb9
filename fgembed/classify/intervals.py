"""Bootstrap intervals of a run's test metrics: what `fit` writes into metrics.json.

Beside each point metric the run reports, metrics.json gets `<metric>_ci: [lo, hi]`, the 95 %
percentile bootstrap interval over the test images of the seed-averaged metric (`bootstrap`:
seeded resamples, 1,000 by default), for accuracy, weighted and macro F1 and balanced accuracy
(a run names it `mean_class_accuracy`: the mean recall over the classes in the truth), and a
`bootstrap` block saying how (resamples, seed, confidence, method, rows). A multi-level run gets
them per level too (`levels.<level>.<metric>_ci`); its top-level keys are the finest level's.

They are computed from each seed's predicted class per test row (the argmax of the stored float16
logits: what every reader of the logits sees), never from the logits themselves, so a run of any
size costs a few bytes per row. The run keeps those predictions (`logits.zarr/[<level>/]test_pred`,
`[seeds, rows]` int32, every test row); a run written before has its logits read back block by
block instead.

The bootstrap settings are not in the run key: they change no model and no point value, only how
the run is reported. A reused run whose metrics.json lacks intervals, or holds them for other
settings, gets them from its stored predictions, and its metrics.json is rewritten in place
(atomically: a reader sees the old file or the new one). `--bootstrap 0` computes none and leaves
a run's metrics.json as it is; runs written before intervals existed load and report as before.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from ..errors import FgembedError
from ..store import FeatureStore
from ._logits import FORWARD_ROWS, LOGIT_ROWS
from .bootstrap import CONFIDENCE, METRICS, N_RESAMPLES, Distribution, Resamples, distribution
from .rundir import Run
from .views import level_key

# the bootstrap engine's metric → the run's key for it (metrics.json, tables)
RUN_KEYS = {"accuracy": "accuracy", "f1": "f1", "f1_macro": "f1_macro", "balanced_accuracy": "mean_class_accuracy"}
PRED_DTYPE = np.int32


@dataclass(frozen=True)
class RowPredictions:
    """A table row's test predictions: sorted store `rows` and `preds` `[seeds, rows]` int32."""

    rows: np.ndarray
    preds: np.ndarray


@dataclass(frozen=True)
class BootstrapConfig:
    """How intervals are computed: resamples (0: none), the seed of their draw, the confidence."""

    n_resamples: int = N_RESAMPLES
    seed: int = 0
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        if int(self.n_resamples) < 0:
            raise FgembedError(f"--bootstrap takes a number of resamples (0: no intervals), got {self.n_resamples}")
        if int(self.seed) < 0:
            raise FgembedError(f"the bootstrap seed must be 0 or more, got {self.seed}")
        if not 0 < self.confidence < 1:
            raise FgembedError(f"the bootstrap confidence must lie strictly between 0 and 1, got {self.confidence}")

    @property
    def enabled(self) -> bool:
        return self.n_resamples > 0

    def resamples(self, n_rows: int) -> Resamples:
        return Resamples(n_rows, self.n_resamples, self.seed)

    def block(self, n_rows: int) -> dict:
        """The `bootstrap` block of metrics.json and of a table's records."""
        return {"n_resamples": self.n_resamples, "seed": self.seed, "confidence": self.confidence,
                "method": "percentile", "rows": int(n_rows)}

    def matches(self, block: dict | None) -> bool:
        """Whether a stored `bootstrap` block was computed with these settings."""
        return bool(block) and all(block.get(k) == getattr(self, k) for k in ("n_resamples", "seed", "confidence"))


def interval_keys(dist: Distribution, confidence: float) -> dict[str, list[float]]:
    """`<run key>_ci` of every metric of `dist` (the points stay the run's own)."""
    values = dist.interval(confidence)
    return {f"{RUN_KEYS[name]}_ci": values[f"{name}_ci"] for name in dist.point}


def delta_keys(fused: Distribution, members: dict[str, Distribution], confidence: float) -> dict:
    """A fused row against the best of its members, metric by metric (best by the point value on
    the same rows; the first listed wins a tie): `delta_<key>`, `delta_<key>_ci`, `delta_<key>_p`,
    and `delta_<key>_vs`, the member it is read against."""
    out: dict = {}
    paired: dict[str, dict] = {}
    for name in fused.point:
        best = max(members, key=lambda m: members[m].point[name])  # max keeps the first of equal values
        if best not in paired:
            paired[best] = fused.paired(members[best], confidence)
        key = RUN_KEYS[name]
        out |= {f"delta_{key}{suffix}": paired[best][f"delta_{name}{suffix}"] for suffix in ("", "_ci", "_p")}
        out[f"delta_{key}_vs"] = best
    return out


def scored_intervals(metrics: dict, ys: Sequence[np.ndarray], preds: Sequence[np.ndarray], seen: np.ndarray,
                     widths: Sequence[int], levels: Sequence[str], config: BootstrapConfig) -> dict:
    """`metrics` with the intervals of every level (`ys[j]`: labels of every test row; `preds[j]`:
    `[seeds, rows]` predictions; `seen`: the rows the metrics score, novel ones left out;
    `levels`: the level names, coarse → fine, of a multi-level run, else empty)."""
    n_rows = int(seen.sum())
    if n_rows == 0:   # every test row novel: nothing scored, nothing to resample
        return metrics
    resamples = config.resamples(n_rows)   # shared by the levels: their counts are drawn once
    per_level = [interval_keys(distribution(y[seen], p[:, seen], resamples, METRICS, n_classes=w), config.confidence)
                 for y, p, w in zip(ys, preds, widths)]
    out = metrics | per_level[-1] | {"bootstrap": config.block(n_rows)}
    if levels:
        out["levels"] = {lv: metrics["levels"][lv] | keys for lv, keys in zip(levels, per_level)}
    return out


def write_predictions(group: zarr.Group, prefix: str, preds: np.ndarray) -> None:
    """A run's `[seeds, rows]` test predictions beside its logits (`<prefix>test_pred`)."""
    group.create_array(f"{prefix}test_pred", data=np.asarray(preds, PRED_DTYPE))


def stored_predictions(run: Run, level: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, `[seeds, rows]` int32 predictions) of a run's test split at `level` (a level
    of a multi-level run; None: the root) — its `test_pred`, or the argmax of its logits read
    block by block (numpy's: the first of tied maxima, as scoring took it) for an older run."""
    group = zarr.open_group(run.path / "logits.zarr", mode="r")
    prefix = f"{level}/" if level else ""
    rows = group["test_rows"][:]
    if f"{prefix}test_pred" in group:
        return rows, group[f"{prefix}test_pred"][:].astype(PRED_DTYPE, copy=False)
    logits = group[f"{prefix}test"]
    preds = np.empty(logits.shape[:2], PRED_DTYPE)
    for start in range(0, logits.shape[1], LOGIT_ROWS):
        block = logits[:, start:start + LOGIT_ROWS]
        for i in range(0, block.shape[1], FORWARD_ROWS):   # a float32 copy of a whole block is 164 MB at iNat
            piece = torch.from_numpy(np.ascontiguousarray(block[:, i:i + FORWARD_ROWS])).float().numpy()
            preds[:, start + i:start + i + piece.shape[1]] = piece.argmax(2)
    return rows, preds


def run_intervals(run: Run, store: FeatureStore, config: BootstrapConfig) -> Run:
    """A finished run with intervals for `config`: as it is when it has them (or `config` computes
    none); else computed from its stored predictions and written into its metrics.json."""
    if not config.enabled or config.matches(run.metrics.get("bootstrap")):
        return run
    levels = list(run.config.head.levels)
    names = levels or [run.config.head.level]
    found = [stored_predictions(run, lv if levels else None) for lv in names]
    rows = found[0][0]
    seen = ~np.isin(store.labels()[rows], run.meta.get("holdout_classes", []))
    ys = [store.labels(level=level_key(lv)).astype(np.int64)[rows] for lv in names]
    widths = [int(zarr.open_group(run.path / "logits.zarr", mode="r")[f"{lv}/test" if levels else "test"].shape[2])
              for lv in names]
    metrics = scored_intervals(run.metrics, ys, [p for _, p in found], seen, widths, levels, config)
    part = run.path / "metrics.json.part"
    try:
        part.write_text(json.dumps(metrics, indent=2))
        os.replace(part, run.path / "metrics.json")
    except OSError as exc:   # a run folder one may read, not write: the intervals stay in memory
        warnings.warn(f"{run.path}: intervals computed but not saved ({exc.strerror or exc})")
    return dataclasses.replace(run, metrics=metrics)
