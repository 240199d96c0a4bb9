"""Classification heads as scikit-learn estimators over cached embeddings, and their registry.

`__init__` stores parameters; `fit(X, y)` validates them and returns self; fitted attributes end
in `_`; randomness comes from `random_state`. Labels are integer class codes 0..C-1.

Registry (timm-style): `HEADS` maps a name to its class and is both the list of choices and the
dispatch; `register_head(name)` lets other modules (baselines, zero-shot) add theirs.

`fit_grid` trains seeds × learning rates × weight decays of one view as one batched model
(`train.train_grid`) and keeps, per seed, the setting with the best validation F1 (weighted,
the paper's rule), as dinov2's linear evaluation does. Inputs may be float16 (the view's rows):
they go to the device as they are and each batch / block is cast to float32 there.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from torch import nn

from ..devices import resolve_device
from ..errors import FgembedError
from .fusion import SumProjection
from .train import BLOCK_ROWS, TrainResult, train_grid

HEADS: dict[str, type] = {}


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: make a head available to `create_head(name)` and `list_heads()`."""
    def add(cls: type) -> type:
        HEADS[name] = cls
        return cls
    return add


def list_heads(pattern: str = "*") -> list[str]:
    return sorted(fnmatch.filter(HEADS, pattern))


def create_head(name: str, **params) -> "ClassifierMixin":
    if name not in HEADS:
        close = difflib.get_close_matches(name, list(HEADS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FgembedError(f"unknown head {name!r}; {hint}choose from {', '.join(list_heads())}")
    return HEADS[name](**params)


def as_rows(X, device: torch.device) -> torch.Tensor:
    """Rows on the device in their own floating dtype: float16 stays float16 (never a float32 copy
    of the whole matrix); only float64 is narrowed, because the heads compute in float32."""
    X = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X))
    if X.ndim != 2:
        raise FgembedError(f"X must be [n, d]; got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise FgembedError(f"X must hold floating-point features; got {X.dtype}")
    return X.to(device, torch.float32 if X.dtype == torch.float64 else X.dtype)


FINITE_ELEMENTS = 1 << 24  # values per finiteness check: a float16 block may be widened to float32 (64 MiB)


def _all_finite(X: torch.Tensor) -> bool:
    """Blockwise, so the check adds tens of MiB, not an [n, d] matrix, to a fit's peak memory."""
    ok = torch.ones((), dtype=torch.bool, device=X.device)
    rows = max(1, FINITE_ELEMENTS // max(X.shape[1], 1))
    for start in range(0, len(X), rows):
        ok &= torch.isfinite(X[start:start + rows]).all()
    return bool(ok)


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Shared fit/predict over a torch module built by `_build(d, n_classes)`.

    `sum_blocks` (member dims) and `sum_dim` turn on the learned-projection `sum` fusion: the
    input is the members' concatenated embeddings, each block gets its own Linear(d_i, sum_dim),
    and the projections are summed before the head — trained end to end with it.
    """

    def _build(self, d: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def _network(self, d: int, n_classes: int) -> nn.Module:
        if not self.sum_blocks:
            return self._build(d, n_classes)
        if sum(self.sum_blocks) != d:
            raise FgembedError(f"sum_blocks {self.sum_blocks} do not add up to the {d} input features")
        dim = int(self.sum_dim or min(self.sum_blocks))
        return nn.Sequential(SumProjection(tuple(self.sum_blocks), dim), self._build(dim, n_classes))

    def _check_params(self, lrs: list[float], weight_decays: list[float]) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise FgembedError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not lrs or not all(lr > 0 for lr in lrs):
            raise FgembedError(f"learning rates must be > 0, got {lrs}")
        if not weight_decays or not all(wd >= 0 for wd in weight_decays):
            raise FgembedError(f"weight decays must be ≥ 0, got {weight_decays}")

    def fit(self, X, y, X_val=None, y_val=None, n_classes: int | None = None) -> "_TorchHead":
        """Train; validation data picks the best epoch (carved from X by `validation_fraction`
        when not given)."""
        self.fit_seeds(X, y, [self.random_state], X_val, y_val, n_classes)
        return self

    def fit_seeds(self, X, y, seeds: list[int], X_val=None, y_val=None, n_classes: int | None = None,
                  on_epoch: Callable[[int], None] | None = None) -> list["_TorchHead"]:
        """One head per seed at this head's own lr and weight decay (a 1 × 1 grid)."""
        return self.fit_grid(X, y, X_val, y_val, seeds=seeds, n_classes=n_classes, on_epoch=on_epoch)

    def fit_grid(self, X, y, X_val=None, y_val=None, *, seeds, lrs=None, weight_decays=None,
                 n_classes: int | None = None, on_epoch: Callable[[int], None] | None = None,
                 balance: str = "none") -> list["_TorchHead"]:
        """Train every (seed, lr, weight decay) in one pass; return one fitted head per seed (self
        is the first), each the setting with the best validation F1 over the lr × wd grid (macro F1
        under a `balance`, see `train.BALANCES`).

        `chosen_` holds that setting, `grid_` every setting's best validation F1 and epoch.
        `on_epoch(n)` is called after every epoch (a progress bar's tick)."""
        seeds = [int(s) for s in seeds]
        lrs = [float(v) for v in (lrs if lrs is not None else [self.lr])]
        weight_decays = [float(v) for v in (weight_decays if weight_decays is not None else [self.weight_decay])]
        self._check_params(lrs, weight_decays)
        if not seeds or len(set(seeds)) != len(seeds):
            raise FgembedError(f"seeds must be distinct and at least one; got {seeds}")
        device = resolve_device(self.device)
        y = np.asarray(y, np.int64)
        if X_val is None:
            X, X_val, y, y_val = train_test_split(np.asarray(X), y, test_size=self.validation_fraction, stratify=y,
                                                  random_state=self.random_state)
        X, X_val = as_rows(X, device), as_rows(X_val, device)
        y_val = np.asarray(y_val, np.int64)
        if len(X) != len(y) or len(X_val) != len(y_val) or X.shape[1] != X_val.shape[1]:
            raise FgembedError(f"X must be [n, d] with one label per row; got X {tuple(X.shape)}, y {y.shape}, "
                               f"X_val {tuple(X_val.shape)}, y_val {y_val.shape}")
        if not (_all_finite(X) and _all_finite(X_val)):
            raise FgembedError("X has NaN or infinite rows (failed images?); drop them before fitting")
        n_classes = int(n_classes or max(y.max(), y_val.max()) + 1)
        d = X.shape[1]
        results = train_grid(lambda: self._network(d, n_classes), X, torch.as_tensor(y, device=device), X_val,
                             torch.as_tensor(y_val, device=device), n_classes, seeds, lrs, weight_decays,
                             epochs=int(self.epochs), batch_size=int(self.batch_size), on_epoch=on_epoch,
                             balance=balance)
        heads = []
        for k, (seed, per_setting) in enumerate(zip(seeds, results)):
            head = self if k == 0 else self.__class__(**{**self.get_params(), "random_state": seed})
            best = max(per_setting, key=lambda r: r.best_val_f1)  # ties: the first in lr × wd order
            head._set_fitted(d, n_classes, best)
            head.chosen_ = {"lr": best.lr, "weight_decay": best.weight_decay}
            head.grid_ = [{"lr": r.lr, "weight_decay": r.weight_decay, "best_val_f1": r.best_val_f1,
                           "best_epoch": r.best_epoch} for r in per_setting]
            heads.append(head)
        return heads

    def _set_fitted(self, d: int, n_classes: int, result: TrainResult) -> None:
        self.module_ = self._network(d, n_classes)
        self.module_.load_state_dict(result.state_dict)
        self.module_.to(next(iter(result.state_dict.values())).device).eval()
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = d
        self.best_epoch_, self.best_val_f1_, self.history_ = result.best_epoch, result.best_val_f1, result.history

    @classmethod
    def from_state(cls, params: dict, d: int, n_classes: int, state_dict: dict) -> "_TorchHead":
        """Rebuild a saved head from its constructor parameters and `module_.state_dict()`
        (as `fgembed predict` does from a run directory)."""
        head = cls(**params)
        head.module_ = head._network(d, n_classes)
        head.module_.load_state_dict(state_dict)
        head.module_.eval()
        head.classes_, head.n_features_in_ = np.arange(n_classes), d
        return head

    def predict_logits(self, X) -> np.ndarray:
        """Class scores [n, C] float32; float16 or float32 input, numpy or torch, in row blocks
        (100k rows × 10k classes would not fit at once)."""
        X = as_rows(X, next(self.module_.parameters()).device)
        if X.shape[1] != self.n_features_in_:
            raise FgembedError(f"X has {X.shape[1]} features; this head was fitted on {self.n_features_in_}")
        self.module_.eval()
        with torch.no_grad():
            return torch.cat([self.module_(X[i:i + BLOCK_ROWS].float()).float().cpu()
                              for i in range(0, max(len(X), 1), BLOCK_ROWS)]).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.predict_logits(X)), 1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_logits(X).argmax(1)


@register_head("mlp")
class MLPHead(_TorchHead):
    """The reference recipe: d→512→256→C, each hidden layer Linear → ReLU → BatchNorm → Dropout;
    AdamW (lr 1e-3), batch 128, 150 epochs, best validation F1."""

    def __init__(self, hidden: tuple[int, ...] = (512, 256), dropout: float = 0.5, lr: float = 1e-3,
                 weight_decay: float = 0.01, batch_size: int = 128, epochs: int = 150,
                 validation_fraction: float = 0.2, random_state: int = 0, device: str = "auto",
                 sum_blocks: tuple[int, ...] | None = None, sum_dim: int | None = None) -> None:
        self.sum_blocks, self.sum_dim = sum_blocks, sum_dim
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.batch_size, self.epochs, self.validation_fraction = batch_size, epochs, validation_fraction
        self.random_state, self.device = random_state, device

    def _build(self, d: int, n_classes: int) -> nn.Module:
        layers: list[nn.Module] = []
        for width in self.hidden:
            layers += [nn.Linear(d, width), nn.ReLU(), nn.BatchNorm1d(width), nn.Dropout(self.dropout)]
            d = width
        return nn.Sequential(*layers, nn.Linear(d, n_classes))


@register_head("linear")
class LinearHead(_TorchHead):
    """A linear probe: one Linear(d, C) layer, trained by the same loop."""

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 128, epochs: int = 150,
                 validation_fraction: float = 0.2, random_state: int = 0, device: str = "auto",
                 sum_blocks: tuple[int, ...] | None = None, sum_dim: int | None = None) -> None:
        self.sum_blocks, self.sum_dim = sum_blocks, sum_dim
        self.lr, self.weight_decay, self.batch_size, self.epochs = lr, weight_decay, batch_size, epochs
        self.validation_fraction, self.random_state, self.device = validation_fraction, random_state, device

    def _build(self, d: int, n_classes: int) -> nn.Module:
        return nn.Linear(d, n_classes)


# The baseline heads (knn, logreg, zeroshot) register themselves here; imported last because
# they build on `register_head` above, so every `create_head` caller sees the whole registry.
from . import baselines  # noqa: E402,F401
