"""What training hands the run skeleton (`Trained`), and the test scorer of a single-level run.

Both kinds of run — a head per seed, a multi-level model per seed (`level_runs`) — train into a
`Trained`; `fitting._write_run` then writes any of them alike, scoring each seed's test logits
block by block as they are stored (its `scorers`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._logits import FORWARD_ROWS
from .longtail import by_frequency
from .metrics import MetricCounts


@dataclass
class Trained:
    """What training hands the run skeleton, per seed in `config.head.seeds` order: the kept
    module, its history, how it was chosen (best epoch and validation F1, the chosen setting, the
    whole lr × weight-decay grid), the logits it writes (`outputs`: `(prefix, classes, excluded)`
    per output of the module), and a scorer per seed that sees its test blocks as they are stored
    (`update(start, blocks)`, `metrics()`)."""

    modules: list[nn.Module]
    history: list[list[dict]]
    best_epoch: list
    best_val_f1: list
    chosen: list
    grid: list
    outputs: list[tuple[str, int, np.ndarray]]
    scorers: list
    seconds: float
    meta: dict = field(default_factory=dict)  # what config.json records beyond the common keys
    metrics: dict = field(default_factory=dict)  # what metrics.json records beyond the common keys


class TestScores:
    """One seed's test metrics from its stored float16 logits, block by block: per-class counts of
    the seen rows and every row's prediction (for `by_frequency` and the intervals)."""

    def __init__(self, y: np.ndarray, seen: np.ndarray, n_classes: int, train_counts: np.ndarray,
                 bins: tuple[int, int]) -> None:
        self.y, self.seen, self.train_counts, self.bins = y, seen, train_counts, bins
        self.counts, self.pred = MetricCounts(n_classes), np.empty(len(y), np.int32)

    @property
    def ys(self) -> list[np.ndarray]:
        """Labels of every test row, per output (one: a single-level run)."""
        return [self.y]

    @property
    def preds(self) -> list[np.ndarray]:
        """This seed's predicted class of every test row, per output (what intervals resample)."""
        return [self.pred]

    def update(self, start: int, blocks: list[np.ndarray]) -> None:
        for i in range(0, len(blocks[0]), FORWARD_ROWS):  # in pieces: a float32 copy of a whole block is 164 MB
            z = torch.from_numpy(blocks[0][i:i + FORWARD_ROWS]).float()
            first, stop = start + i, start + i + len(z)
            keep = self.seen[first:stop]
            if keep.all():  # the counts' argmax is every row's prediction: no second pass
                self.pred[first:stop] = self.counts.update(z, self.y[first:stop]).numpy()
                continue
            self.pred[first:stop] = z.numpy().argmax(1)  # numpy's, as the counts': the first of tied maxima
            self.counts.update(z[torch.from_numpy(keep)], self.y[first:stop][keep])

    def metrics(self) -> dict:
        return self.counts.metrics() | {"by_frequency": frequency_metrics(
            self.y[self.seen], self.pred[self.seen], self.train_counts, self.bins)}


def frequency_metrics(y_true: np.ndarray, y_pred: np.ndarray, train_counts: np.ndarray,
                      bins: tuple[int, int]) -> dict[str, dict]:
    """`longtail.by_frequency` as metrics.json holds it: an empty bin's accuracy is null (NaN is
    not JSON, and never equals itself)."""
    return {name: {k: None if np.isnan(v) else v for k, v in b.items()}
            for name, b in by_frequency(y_true, y_pred, train_counts, bins).items()}
