"""Multi-level runs: `HeadConfig.levels` trains one taxonomy-aware model per seed
(`hierarchy.fit_levels`) and writes a run directory in the same layout as a single-level run:
logits per level at `logits.zarr/<level>/{val,test}` `[seeds, rows, classes]` float16 (rows at
`logits.zarr/{val,test}_rows`), `head-seed<S>.safetensors`, and metrics.json whose top-level
flat keys are the fine level's (so tables rank multi-level runs by fine F1 like any other run),
plus `levels.<level>.*`, `avg_accuracy`, `consistency`, `mistake_severity` and the fine level's
`by_frequency` (from the argmax of its float16 test logits, gathered as they are written), each
with its `_std` over seeds. A `sum` view's PCA projection is saved as a single-level run's is
(`projection.safetensors`), so `fgembed predict` rebuilds the design rows. Metrics are computed
from the stored float16 logits on seen test rows:

- `decoder.<name>` (`hierarchy_metrics.DECODERS`: `top_down`, `path_product`): the same metrics of a
  consistent decoding of those logits (its `consistency` is 1 by construction);
- `selective.tau<NN>` (τ in hundredths: "tau70" …, `hierarchy_metrics.SELECTIVE_TAUS`): the "deepest
  confident level" answer's accuracy, specificity and fine_fraction at each τ (004's "flamingo or
  bird" curve, as points).

An lr × weight-decay grid trains every setting (`hierarchy.fit_levels_grid`) and keeps per seed
the one with the best mean over levels of the weighted validation F1 — the score that picks the
epoch; `chosen` and `grid` record it per seed as in a single-level run."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from safetensors.torch import load_file as load_torch

from .._version import __version__
from ..devices import resolve_device
from ..store import FeatureStore
from ._logits import create_logits, write_logits
from .hierarchy import create_hierarchy, fit_levels_grid
from .hierarchy_metrics import (
    DECODERS,
    Taxonomy,
    decoded_metrics,
    level_metrics,
    selective_points,
)
from .metrics import classification_metrics
from .train import selection
from .views import View


def train_levels(store: FeatureStore, config, view: View, identity: dict, path: Path, device: str,
                 on_epoch: Callable[..., None], force: bool = False):
    """Train, write and return the multi-level `Run` of `config` (called by `runs._train`)."""
    from .runs import (
        FORMAT_VERSION,
        Run,
        frequency_metrics,
        publish,
        save_weights,
        summarise,
        temp_dir,
        view_counts,
    )
    h, levels = config.head, config.head.levels
    ys = {s: [view.labels(s, lv) for lv in levels] for s in ("train", "val", "test")}
    n_classes = [view.n_classes(lv) for lv in levels]
    started = time.perf_counter()
    fits = fit_levels_grid(h.hierarchy, view.X("train"), ys["train"], view.X("val"), ys["val"], n_classes,
                           seeds=h.seeds, lrs=h.lr, weight_decays=h.weight_decay, epochs=h.epochs,
                           batch_size=h.batch_size, level_weights=h.level_weights, hidden=h.hidden,
                           dropout=h.dropout, device=device,  # fits train one after another: one bar of `epochs`
                           on_epoch=lambda n=1: on_epoch(n / len(h.seeds)))
    seconds = time.perf_counter() - started
    excluded = {lv: view.excluded_classes(lv) for lv in levels}

    tmp = temp_dir(path)
    group = zarr.open_group(tmp / "logits.zarr", mode="w")
    fine_preds = [np.empty(len(view.rows["test"]), np.int64) for _ in fits]

    def gather(k: int, start: int, blocks: list[np.ndarray]) -> None:  # the fine level's stored float16 argmax
        fine_preds[k][start:start + len(blocks[-1])] = blocks[-1].argmax(1)

    for split in ("val", "test"):  # the same writer as a single-level run's, one array per level
        group.create_array(f"{split}_rows", data=view.rows[split].astype(np.int64))
        X = view.X(split)
        arrays = [create_logits(group, f"{lv}/{split}", len(fits), len(X), c) for lv, c in zip(levels, n_classes)]
        write_logits(arrays, [fit.module for fit in fits], X, [excluded[lv] for lv in levels],
                     gather if split == "test" else None)
    seen = ~view.novel
    train_counts = view.class_counts("train", levels[-1])
    taxonomy = Taxonomy.from_store(store, levels)
    per_seed = []
    for k in range(len(fits)):  # scored from the stored float16 logits: what every reader sees
        z = [np.asarray(group[f"{lv}/test"][k]).astype(np.float32)[seen] for lv in levels]
        y = [t[seen] for t in ys["test"]]
        argmax = decoded_metrics([zk.argmax(1) for zk in z], y, taxonomy)
        per_seed.append(classification_metrics(z[-1], y[-1]) | level_metrics(z, y, levels) | {
            "consistency": argmax["consistency"], "mistake_severity": argmax["mistake_severity"],
            "decoder": {name: decoded_metrics(decode(z, taxonomy), y, taxonomy) for name, decode in DECODERS.items()},
            "selective": selective_points(z, y),
            "by_frequency": frequency_metrics(y[-1], fine_preds[k][seen], train_counts, h.shot_bins)})
    save_weights(tmp, {fit.seed: fit.module for fit in fits}, view.fusion)
    (tmp / "history.json").write_text(json.dumps({str(f.seed): f.history for f in fits}))
    meta = {"format_version": FORMAT_VERSION, "fgembed_version": __version__, "config": config.to_json(),
            "store": identity, "store_path": str(store.path), "dims": view.dims,
            "n_classes": n_classes[-1], "level_classes": dict(zip(levels, n_classes)),
            "holdout_classes": view.holdout_classes, "excluded_classes": excluded[levels[-1]].tolist(),
            "selection": f"{selection(h.balance)} (mean over levels)"}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    metrics = summarise(per_seed) | {
        "seeds": list(h.seeds), "per_seed": per_seed, "hierarchy": h.hierarchy, "level_order": list(levels),
        "best_epoch": [f.best_epoch for f in fits], "best_val_f1": [f.best_val_f1 for f in fits],
        "chosen": [f.chosen for f in fits], **view_counts(view, seen), "train_seconds": seconds,
    }
    if len(h.lr) * len(h.weight_decay) > 1:
        metrics["grid"] = [f.grid for f in fits]
    return publish(tmp, path, metrics, Run(path, config, metrics, identity, meta=meta), replace=force)


def load_modules(run, device: str = "cpu") -> list:
    """Each seed's multi-level module (eval mode), rebuilt from `head-seed<S>.safetensors`."""
    h = run.config.head
    n_classes = [run.meta["level_classes"][lv] for lv in h.levels]
    modules = []
    for seed in h.seeds:
        module = create_hierarchy(h.hierarchy, run.metrics["input_dim"], n_classes, hidden=h.hidden, dropout=h.dropout)
        module.load_state_dict(load_torch(str(run.path / f"head-seed{seed}.safetensors"), device="cpu"))
        modules.append(module.to(resolve_device(device)).eval())
    return modules
