"""Long-tail analysis and re-balancing (Cui et al.'s iNat long-tail study).

- Shot bins: classes with > 100 training rows are "many", 20–100 "medium", < 20 "few" (the
  usual long-tail split; `--shot-bins 20,100` changes the edges). `by_frequency` reports each
  bin's accuracy over its test rows and its number of classes, so a head that only serves the
  head classes cannot hide behind the overall number.
- Re-balancing for any trained head (`BALANCES`): `loss` weights the cross-entropy by the
  inverse effective number of samples (Cui et al., CVPR 2019: E_n = (1 − βⁿ)/(1 − β)); `sampler`
  draws class-balanced batches; `logit-adjust` trains on logits + τ·log prior (Menon et al.,
  ICLR 2021), so the raw logits used at test time are balanced; `second-stage` trains normally,
  then a few epochs on class-balanced batches at a lower learning rate (Cui et al.'s second stage).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..datasets.table import SPLIT_NAMES
from ..errors import FgembedError
from ..images import FAILED
from .views import level_key

if TYPE_CHECKING:
    from ..store import FeatureStore
    from .rundir import Run

SHOT_BINS = (20, 100)
BIN_NAMES = ("many", "medium", "few")
CB_BETA = 0.9999
LOGIT_TAU = 1.0
SECOND_STAGE_EPOCHS = 10
SECOND_STAGE_LR_FACTOR = 0.1


def parse_shot_bins(text: str) -> tuple[int, int]:
    """`--shot-bins 20,100` → (20, 100): few < 20 ≤ medium ≤ 100 < many."""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise FgembedError(f"--shot-bins takes two integers LOW,HIGH (e.g. 20,100); got {text!r}") from None
    if not 0 < low <= high:
        raise FgembedError(f"--shot-bins needs 0 < LOW ≤ HIGH; got {low},{high}")
    return low, high


def frequency_bins(train_counts: np.ndarray, bins: tuple[int, int] = SHOT_BINS) -> dict[str, np.ndarray]:
    """Class masks per bin; classes with no training rows belong to none (they are held out or
    unselected, and are novel rather than rare)."""
    low, high = bins
    counts = np.asarray(train_counts)
    return {"many": counts > high, "medium": (counts >= low) & (counts <= high), "few": (counts > 0) & (counts < low)}


def by_frequency(y_true: np.ndarray, y_pred: np.ndarray, train_counts: np.ndarray,
                 bins: tuple[int, int] = SHOT_BINS) -> dict[str, dict[str, float]]:
    """Per bin: accuracy over the test rows whose true class is in the bin, how many classes the
    bin has, and how many test rows (accuracy is NaN for an empty bin, never a made-up 0)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {}
    for name, mask in frequency_bins(train_counts, bins).items():
        rows = mask[y_true]
        accuracy = float((y_pred[rows] == y_true[rows]).mean()) if rows.any() else float("nan")
        out[name] = {"accuracy": accuracy, "n_classes": int(mask.sum()), "n_test": int(rows.sum())}
    return out


def class_balanced_weights(train_counts: np.ndarray, beta: float = CB_BETA) -> torch.Tensor:
    """Cross-entropy weights ∝ 1 / effective number of samples, normalised to average 1 over the
    classes that have training rows (classes without rows get 0: they never appear as targets)."""
    counts = torch.as_tensor(np.asarray(train_counts), dtype=torch.float64)
    present = counts > 0
    effective = (1 - beta ** counts) / (1 - beta)
    weights = torch.where(present, 1 / effective.clamp_min(1e-12), torch.zeros_like(counts))
    return (weights * present.sum() / weights.sum()).float()


def log_prior(train_counts: np.ndarray, tau: float = LOGIT_TAU) -> torch.Tensor:
    """τ · log π_c, the offset logit adjustment adds during training (absent classes: −1e4, so
    they never win a softmax they cannot be trained for)."""
    counts = torch.as_tensor(np.asarray(train_counts), dtype=torch.float64)
    prior = counts / counts.sum()
    return torch.where(counts > 0, tau * prior.clamp_min(1e-12).log(), torch.full_like(prior, -1e4)).float()


def balanced_order(labels: torch.Tensor, n_classes: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch of row indices drawn with replacement so every class is equally likely:
    P(row i) ∝ 1 / n_{y_i}. Same length as the data, so an epoch costs what a normal one does."""
    counts = torch.bincount(labels, minlength=n_classes).double()
    weights = 1.0 / counts[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def shared_train_counts(store: FeatureStore, runs: list[Run], subsets: list[tuple[int, ...]], level: str,
                        n_classes: int) -> list[np.ndarray]:
    """Per subset (indices into `runs`): training rows per class at `level` that a fused view of
    its members trains on — the runs' class selection less their held-out classes, rows whose image
    failed in any of its members left out, K per fine class with `--shots K` (a view draws
    min(K, n) rows of each class). What bins the classes for `by_frequency`, as a single or concat
    run of those members bins them."""
    view = runs[0].config.view
    fine = store.labels().astype(np.int64)
    kept = np.ones(len(store.class_names), bool)
    if view.classes is not None:
        kept[:] = False
        kept[list(view.classes)] = True
    codes = store.labels(level=level_key(level)).astype(np.int64)
    train = store.split_codes() == SPLIT_NAMES["train"]
    # per member: a concat or sum member loses a row when any of its backbones failed on it
    failed = [np.logical_or.reduce([np.isin(store.status(name), FAILED) for name in run.config.view.features])
              for run in runs]
    out = []
    for subset in subsets:
        held = np.zeros(len(kept), bool)  # the members' held-out classes, together (as late fusion masks them)
        for m in subset:
            held[runs[m].meta.get("holdout_classes", [])] = True
        ok = train & (kept & ~held)[fine] & ~np.logical_or.reduce([failed[m] for m in subset])
        if view.shots is None:
            out.append(np.bincount(codes[ok], minlength=n_classes))
            continue
        group = np.zeros(len(kept), np.int64)
        group[fine[ok]] = codes[ok]  # levels nest: all of a fine class's rows share its group
        shots = np.minimum(np.bincount(fine[ok], minlength=len(kept)), view.shots)
        out.append(np.bincount(group, weights=shots, minlength=n_classes).astype(np.int64))
    return out
