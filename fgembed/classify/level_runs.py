"""Multi-level runs: `HeadConfig.levels` trains one taxonomy-aware model per seed
(`hierarchy.fit_levels_grid`); the run skeleton (`fitting._write_run`) writes it like any run:
logits per level at `logits.zarr/<level>/{val,test}` `[seeds, rows, classes]` float16 (rows at
`logits.zarr/{val,test}_rows`), `head-seed<S>.safetensors`, a fusion's state, and metrics.json
whose top-level flat keys are the fine level's (so tables rank multi-level runs by fine F1 like
any other run), plus `levels.<level>.*`, `avg_accuracy`, `consistency`, `mistake_severity`, the
fine level's `by_frequency`, each with its `_std` over seeds, and:

- `decoder.<name>` (`hierarchy_metrics.DECODERS`: `top_down`, `path_product`): the same metrics of a
  consistent decoding of the logits (its `consistency` is 1 by construction);
- `selective.tau<NN>` (τ in hundredths, `hierarchy_metrics.SELECTIVE_TAUS`): the "deepest
  confident level" answer's accuracy, specificity and fine_fraction at each τ.

All of it is scored from the stored float16 test logits, block by block as they are written
(`hierarchy_metrics.HierarchyScores`): nothing is read back. An lr × weight-decay grid trains
every setting and keeps per seed the one with the best mean over levels of the weighted
validation F1 — the score that picks the epoch; `chosen` and `grid` record it per seed."""
from __future__ import annotations

import numpy as np

from ..store import FeatureStore
from .config import RunConfig
from .trained import Trained, frequency_metrics
from .hierarchy import fit_levels_grid
from .hierarchy_metrics import HierarchyScores, Taxonomy
from .train import selection
from .views import View


class LevelScores:
    """One seed's metrics of a multi-level run from its stored test blocks (`HierarchyScores` on
    the seen rows), with the fine level's `by_frequency`."""

    def __init__(self, taxonomy: Taxonomy, ys: list[np.ndarray], seen: np.ndarray, train_counts: np.ndarray,
                 bins: tuple[int, int]) -> None:
        self.scores, self.ys, self.seen = HierarchyScores(taxonomy), ys, seen
        self.train_counts, self.bins = train_counts, bins
        self.preds = [np.empty(len(seen), np.int32) for _ in ys]  # per level, every test row (intervals)

    def update(self, start: int, blocks: list[np.ndarray]) -> None:
        rows = slice(start, start + len(blocks[0]))
        for pred, block in zip(self.preds, blocks):
            pred[rows] = block.argmax(1)
        keep = self.seen[rows]
        self.scores.update([b[keep] for b in blocks], [y[rows][keep] for y in self.ys])

    def metrics(self) -> dict:
        fine = self.ys[-1][self.seen]
        return self.scores.metrics() | {"by_frequency": frequency_metrics(
            fine, self.preds[-1][self.seen], self.train_counts, self.bins)}


def train_levels(store: FeatureStore, config: RunConfig, view: View, device: str, on_epoch) -> Trained:
    """One multi-level model per seed (`fitting._train` calls this for a config with levels)."""
    h, levels = config.head, config.head.levels
    n_classes = [view.n_classes(lv) for lv in levels]
    fits = fit_levels_grid(h.hierarchy, view.X("train"), [view.labels("train", lv) for lv in levels], view.X("val"),
                           [view.labels("val", lv) for lv in levels], n_classes, seeds=h.seeds, lrs=h.lr,
                           weight_decays=h.weight_decay, epochs=h.epochs, batch_size=h.batch_size,
                           level_weights=h.level_weights, hidden=h.hidden, dropout=h.dropout, device=device,
                           on_epoch=lambda n=1: on_epoch(n / len(h.seeds)))  # fits train one after another
    excluded = [view.excluded_classes(lv) for lv in levels]
    taxonomy = Taxonomy.from_store(store, levels)
    ys, seen = [view.labels("test", lv) for lv in levels], ~view.novel
    train_counts = view.class_counts("train", levels[-1])
    return Trained([f.module for f in fits], [f.history for f in fits], [f.best_epoch for f in fits],
                   [f.best_val_f1 for f in fits], [f.chosen for f in fits], [f.grid for f in fits],
                   [(f"{lv}/", c, e) for lv, c, e in zip(levels, n_classes, excluded)],
                   [LevelScores(taxonomy, ys, seen, train_counts, h.shot_bins) for _ in fits], 0.0,
                   meta={"n_classes": n_classes[-1], "level_classes": dict(zip(levels, n_classes)),
                         "excluded_classes": excluded[-1].tolist(),
                         "selection": f"{selection(h.balance)} (mean over levels)"},
                   metrics={"hierarchy": h.hierarchy, "level_order": list(levels)})
