"""Classification heads as scikit-learn estimators over cached embeddings.

`__init__` stores parameters; `fit(X, y)` validates them and returns self; fitted attributes end
in `_`; randomness comes from `random_state`. Labels are integer class codes 0..C-1.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from torch import nn

from .devices import resolve_device
from .errors import FgembedError
from .fusion import SumProjection
from .train import TrainResult, train_heads


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

    def _check_params(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise FgembedError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise FgembedError(f"lr must be > 0, got {self.lr}")

    def fit(self, X, y, X_val=None, y_val=None, n_classes: int | None = None) -> "_TorchHead":
        """Train; validation data picks the best epoch (carved from X by `validation_fraction`
        when not given)."""
        self.fit_seeds(X, y, [self.random_state], X_val, y_val, n_classes)
        return self

    def fit_seeds(self, X, y, seeds: list[int], X_val=None, y_val=None, n_classes: int | None = None,
                  on_epoch: Callable[[int], None] | None = None) -> list["_TorchHead"]:
        """Train one head per seed in one pass; returns fitted copies (self becomes the first).
        `on_epoch(n)` is called after every epoch (for a progress bar)."""
        self._check_params()
        X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
        if X.ndim != 2 or len(X) != len(y):
            raise FgembedError(f"X must be [n, d] with one label per row; got X {X.shape}, y {y.shape}")
        if not np.isfinite(X).all():
            raise FgembedError("X has NaN or infinite rows (failed images?); drop them before fitting")
        if X_val is None:
            X, X_val, y, y_val = train_test_split(X, y, test_size=self.validation_fraction, stratify=y,
                                                  random_state=self.random_state)
        n_classes = int(n_classes or max(y.max(), np.max(y_val)) + 1)
        device = resolve_device(self.device)
        t = lambda a, dt: torch.as_tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
        d = X.shape[1]
        results = train_heads(lambda: self._network(d, n_classes), t(X, torch.float32), t(y, torch.long),
                              t(X_val, torch.float32), t(y_val, torch.long), n_classes, list(seeds),
                              epochs=int(self.epochs), lr=float(self.lr), weight_decay=float(self.weight_decay),
                              batch_size=int(self.batch_size), on_epoch=on_epoch)
        heads = []
        for k, (seed, result) in enumerate(zip(seeds, results)):
            head = self if k == 0 else self.__class__(**{**self.get_params(), "random_state": seed})
            head._set_fitted(d, n_classes, result)
            heads.append(head)
        return heads

    def _set_fitted(self, d: int, n_classes: int, result: TrainResult) -> None:
        self.module_ = self._network(d, n_classes)
        self.module_.load_state_dict(result.state_dict)
        self.module_.eval()
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = d
        self.best_epoch_, self.best_val_f1_, self.history_ = result.best_epoch, result.best_val_f1, result.history

    def predict_logits(self, X) -> np.ndarray:
        X = np.asarray(X, np.float32)
        if X.shape[1] != self.n_features_in_:
            raise FgembedError(f"X has {X.shape[1]} features; this head was fitted on {self.n_features_in_}")
        device = next(self.module_.parameters()).device
        with torch.no_grad():  # in blocks: 100k rows × 10k classes (iNat) would not fit at once
            return np.concatenate([self.module_(torch.as_tensor(X[i:i + 16384], device=device)).float().cpu().numpy()
                                   for i in range(0, max(len(X), 1), 16384)])

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.predict_logits(X)), 1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_logits(X).argmax(1)


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
