"""The gradient-trained heads: the reference MLP and a linear probe (`base.Head` subclasses,
registered in `registry.HEADS`).

`fit_grid` trains seeds × learning rates × weight decays of one view as one batched model
(`train.train_grid`) and keeps, per seed, the setting with the best validation F1 (weighted,
the paper's rule), as dinov2's linear evaluation does. Inputs may be float16 (the view's rows):
they go to the device as they are and each batch / block is cast to float32 there.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..devices import resolve_device
from ..errors import FgembedError
from .base import Head, all_finite, as_rows
from .fusion import SumProjection
from .registry import register_head
from .soft_targets import SoftTargets
from .train import TrainResult, train_grid


class TrainedHead(Head):
    """A head trained by `train.train_grid`: a torch module built by `_build(d, n_classes)`.

    `sum_blocks` (member dims) and `sum_dim` turn on the learned-projection `sum` fusion: the
    input is the members' concatenated embeddings, each block gets its own Linear(d_i, sum_dim),
    and the projections are summed before the head — trained end to end with it.
    """

    trained = True
    learned_projection = True

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

    def fit_grid(self, X, y, X_val, y_val, *, seeds, lrs=None, weight_decays=None, n_classes: int | None = None,
                 on_epoch: Callable[[int], None] | None = None, balance: str = "none",
                 soft_targets: SoftTargets | None = None) -> list[TrainedHead]:
        """Train every (seed, lr, weight decay) in one pass; return one fitted head per seed (self
        is the first), each the setting with the best validation F1 over the lr × wd grid (macro F1
        under a `balance`, see `train.BALANCES`). `soft_targets`: a teacher's, per seed, over the
        rows of X (knowledge distillation, `train.train_grid`).

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
        X, X_val = as_rows(X, device), as_rows(X_val, device)
        y_val = np.asarray(y_val, np.int64)
        if len(X) != len(y) or len(X_val) != len(y_val) or X.shape[1] != X_val.shape[1]:
            raise FgembedError(f"X must be [n, d] with one label per row; got X {tuple(X.shape)}, y {y.shape}, "
                               f"X_val {tuple(X_val.shape)}, y_val {y_val.shape}")
        if not (all_finite(X) and all_finite(X_val)):
            raise FgembedError("X has NaN or infinite rows (failed images?); drop them before fitting")
        n_classes, d = int(n_classes or max(y.max(), y_val.max()) + 1), X.shape[1]
        results = train_grid(lambda: self._network(d, n_classes), X, torch.as_tensor(y, device=device), X_val,
                             torch.as_tensor(y_val, device=device), n_classes, seeds, lrs, weight_decays,
                             epochs=int(self.epochs), batch_size=int(self.batch_size), on_epoch=on_epoch,
                             balance=balance, soft_targets=soft_targets)
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
        self._fitted(d, n_classes)
        self.best_epoch_, self.best_val_f1_, self.history_ = result.best_epoch, result.best_val_f1, result.history

    def _empty_module(self, d: int, n_classes: int, state: dict) -> nn.Module:
        return self._network(d, n_classes)


@register_head("mlp")
class MLPHead(TrainedHead):
    """The reference recipe: d→512→256→C, each hidden layer Linear → ReLU → BatchNorm → Dropout;
    AdamW (lr 1e-3), batch 128, 150 epochs, best validation F1."""

    architecture = ("hidden", "dropout")

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
class LinearHead(TrainedHead):
    """A linear probe: one Linear(d, C) layer, trained by the same loop."""

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 128, epochs: int = 150,
                 validation_fraction: float = 0.2, random_state: int = 0, device: str = "auto",
                 sum_blocks: tuple[int, ...] | None = None, sum_dim: int | None = None) -> None:
        self.sum_blocks, self.sum_dim = sum_blocks, sum_dim
        self.lr, self.weight_decay, self.batch_size, self.epochs = lr, weight_decay, batch_size, epochs
        self.validation_fraction, self.random_state, self.device = validation_fraction, random_state, device

    def _build(self, d: int, n_classes: int) -> nn.Module:
        return nn.Linear(d, n_classes)
