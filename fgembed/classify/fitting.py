"""Training a run: the one skeleton single- and multi-level runs share (`fit_run`).

`fit_run` reuses the finished run of the same key, or builds the view, trains the head (a grid of
seeds × learning rates × weight decays in one pass) and writes the run directory: every seed's
val and test logits streamed block by block to the logits store while the test blocks are scored
(`_logits.write_logits`), each seed's test predictions, the weights, the history, config.json and
metrics.json last, with bootstrap intervals of the test metrics (`intervals`; a reused run gets
them from its stored predictions when it lacks them).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from .._version import __version__
from ..devices import release_freed_host_memory
from ..errors import FgembedError
from ..progress import Tick, progress_bar
from ..store import FeatureStore
from ._logits import write_run_logits
from .config import RunConfig, class_names, run_key, store_identity, store_location
from .intervals import BootstrapConfig, run_intervals, scored_intervals, write_predictions
from .level_runs import train_levels
from .metrics import summarise
from .rundir import FORMAT_VERSION, Run, finished, publish, save_weights, temp_dir
from .soft_targets import SoftTargets
from .trained import TestScores, Trained
from .train import selection
from .views import View, build_view, level_key


def run_path(store: FeatureStore, config: RunConfig, runs_dir: str | Path) -> tuple[Path, dict]:
    """Where a run of `config` lives, and the store identity in its key: its members', and a
    distilled run's teacher members' too (their embeddings made its targets)."""
    identity = store_identity(store, tuple(dict.fromkeys(config.view.features + config.head.teacher)))
    return Path(runs_dir) / f"{config.label}-{run_key(config, identity)}", identity


def check_levels(store: FeatureStore, config: RunConfig) -> None:
    """Refuse a taxonomy level the store lacks in one line, before any view is read or bar drawn."""
    has = store.samples_attrs["levels"]
    named = [config.head.level, *config.head.levels, config.view.holdout_level]
    missing = [lv for lv in named if level_key(lv) is not None and lv not in has]
    if missing:
        raise FgembedError(f"store {store.path} has no taxonomy level {missing[0]!r}; has: {', '.join(has) or 'none'}")


def fit_run(store: FeatureStore, config: RunConfig, runs_dir: str | Path, device: str = "auto",
            force: bool = False, progress: bool = False, *, view: View | None = None,
            tick: Tick | None = None, bootstrap: BootstrapConfig = BootstrapConfig(),
            soft_targets: SoftTargets | None = None) -> Run:
    """Train `config` on `store` (seeds × lr × weight decay in one pass) or reuse the finished
    run of the same key. `view` reuses an already built view of the same ViewConfig; `tick`
    reports epochs to a caller's progress bar instead of this run's own; `bootstrap` says how
    the test metrics' intervals are computed (not part of the key). A distilled run
    (`config.head.teacher`) trains only with its teacher's `soft_targets` (`distill.distill`
    makes them, over the rows of `view`'s training split)."""
    check_levels(store, config)
    path, identity = run_path(store, config, runs_dir)
    if not force and (run := finished(path)) is not None:
        return run_intervals(run, store, bootstrap)
    if view is not None and view.config != config.view:
        raise FgembedError("fit_run was given a view of another configuration")
    if bool(config.head.teacher) != (soft_targets is not None):
        raise FgembedError("a distilled run trains on its teacher's soft targets: train it with fgembed distill"
                           if config.head.teacher else "soft targets are for a run with a teacher")
    if tick is not None:
        view = view or build_view(store, config.view, progress=False, device=device)
        return _train(store, config, view, identity, path, device, tick, force, bootstrap, soft_targets)
    view = view or build_view(store, config.view, progress=progress, device=device)
    with progress_bar(config.head.total_epochs, config.label, enabled=progress, unit="epoch") as own:
        return _train(store, config, view, identity, path, device, own, force, bootstrap, soft_targets)


def fit_draws(store: FeatureStore, config: RunConfig, runs_dir: str | Path, draws: int = 1, **fit_options) -> list[Run]:
    """The run of `config` and of the next `draws - 1` seeded draws of its `--shots` training rows:
    a few-shot result is read over draws of the rows, not only over seeds of one draw."""
    if draws > 1 and config.view.shots is None:
        raise FgembedError("--draws repeats the --shots draw: give --shots K too")
    return [fit_run(store, dataclasses.replace(config, view=dataclasses.replace(config.view, draw=config.view.draw + k)),
                    runs_dir, **fit_options) for k in range(draws)]


def draws_summary(runs: list[Run]) -> dict:
    """Mean ± std over draws of accuracy and both F1s (each draw's own seeds averaged first)."""
    return summarise([{k: r.metrics[k] for k in ("accuracy", "f1", "f1_macro")} for r in runs])


def _train(store: FeatureStore, config: RunConfig, view: View, identity: dict, path: Path, device: str,
           on_epoch: Callable[..., None], force: bool = False,
           bootstrap: BootstrapConfig = BootstrapConfig(), soft_targets: SoftTargets | None = None) -> Run:
    """Train (one head per seed, or one multi-level model per seed) and write the run directory."""
    release_freed_host_memory()  # the view's reading scratch: each phase's peak starts from the rows alone
    started = time.perf_counter()
    if config.head.levels:
        trained = train_levels(store, config, view, device, on_epoch)
    else:
        trained = _train_head(config, view, device, on_epoch, soft_targets)
    trained.seconds = time.perf_counter() - started
    release_freed_host_memory()  # the training batches' scratch, before the logits' blocks
    return _write_run(store, config, view, identity, path, trained, force, bootstrap)


def _train_head(config: RunConfig, view: View, device: str, on_epoch: Callable[..., None],
                soft_targets: SoftTargets | None = None) -> Trained:
    h, level = config.head, config.head.level
    n_classes = view.n_classes(level)
    head = config.make_head(view.dims, device)
    if head.needs_text:  # the zero-shot head's weights are the stored text embeddings
        text, scale = view.text()
        head.set_params(text_embeddings=text, logit_scale=scale)
    grid = {"lrs": list(h.lr), "weight_decays": list(h.weight_decay), "balance": h.balance} if head.trained else {}
    if soft_targets is not None:
        grid["soft_targets"] = soft_targets
    heads = head.fit_grid(view.X("train"), view.labels("train", level), view.X("val"), view.labels("val", level),
                          seeds=list(h.seeds), n_classes=n_classes, on_epoch=on_epoch, **grid)
    excluded = view.excluded_classes(level)
    y_test, seen, train_counts = view.labels("test", level), ~view.novel, view.class_counts("train", level)
    return Trained([f.module_ for f in heads], [getattr(f, "history_", []) for f in heads],
                   [getattr(f, "best_epoch_", None) for f in heads], [getattr(f, "best_val_f1_", None) for f in heads],
                   [getattr(f, "chosen_", None) for f in heads], [getattr(f, "grid_", None) for f in heads],
                   [("", n_classes, excluded)],
                   [TestScores(y_test, seen, n_classes, train_counts, h.shot_bins) for _ in heads], 0.0,
                   meta={"n_classes": n_classes, "excluded_classes": excluded.tolist(),
                         "selection": selection(h.balance),
                         **({"distillation": soft_targets.record} if soft_targets is not None else {})})


def _write_run(store: FeatureStore, config: RunConfig, view: View, identity: dict, path: Path, trained: Trained,
               force: bool, bootstrap: BootstrapConfig) -> Run:
    """The run directory of any trained run: logits streamed to the store and scored as they are
    written, test predictions, weights and the fusion's state, history, config.json, and
    metrics.json last (with the test metrics' intervals)."""
    h = config.head
    tmp = temp_dir(path)
    group = zarr.open_group(tmp / "logits.zarr", mode="w")
    X = {split: view.X(split) for split in ("val", "test")}
    write_run_logits(group, trained.modules, X, view.rows, trained.outputs,
                     lambda k, start, blocks: trained.scorers[k].update(start, blocks))
    per_seed = [scorer.metrics() for scorer in trained.scorers]
    preds = [np.stack([scorer.preds[j] for scorer in trained.scorers]) for j in range(len(trained.outputs))]
    for (prefix, _, _), pred in zip(trained.outputs, preds):
        write_predictions(group, prefix, pred)
    save_weights(tmp, dict(zip(h.seeds, trained.modules)), view.fusion)
    (tmp / "history.json").write_text(json.dumps({str(s): hist for s, hist in zip(h.seeds, trained.history)}))
    meta = {"format_version": FORMAT_VERSION, "fgembed_version": __version__, "config": config.to_json(),
            "store": identity, "store_path": store_location(store), **class_names(store), "dims": view.dims,
            "holdout_classes": view.holdout_classes, **trained.meta}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    metrics = summarise(per_seed) | {
        "seeds": list(h.seeds), "per_seed": per_seed, **trained.metrics,
        "best_epoch": trained.best_epoch, "best_val_f1": trained.best_val_f1, "chosen": trained.chosen,
        **view_counts(view, ~view.novel), "train_seconds": trained.seconds,
    }
    if len(h.lr) * len(h.weight_decay) > 1:
        metrics["grid"] = trained.grid
    if bootstrap.enabled:
        metrics = scored_intervals(metrics, trained.scorers[0].ys, preds, ~view.novel,
                                   [classes for _, classes, _ in trained.outputs], h.levels, bootstrap)
    return publish(tmp, path, metrics, Run(path, config, metrics, identity, meta=meta), replace=force)


def view_counts(view: View, seen: np.ndarray) -> dict:
    """The rows a run saw, per split, and what the view left out or held out (metrics.json)."""
    counts = {"n_train": len(view.rows["train"]), "n_val": len(view.rows["val"]), "n_test": int(seen.sum()),
              "dropped": view.dropped, "test_rows_dropped": view.dropped["test"], "input_dim": view.input_dim}
    if view.holdout_classes:
        counts |= {"holdout_classes": view.holdout_classes, "n_novel": int(view.novel.sum())}
    return counts
