"""The contract every head keeps: a scikit-learn classifier over cached embeddings.

`__init__` stores parameters; `fit(X, y)` validates them and returns self, with any labels
(`classes_` maps them back); fitted attributes end in `_`; randomness comes from `random_state`.
So `clone`, `cross_val_score` and scikit-learn's estimator checks work on every registered head.

What fgembed's runs use on top is one more method, `fit_grid`: integer class codes 0..C-1 over a
store's classes (`n_classes` fixed, absent classes included), a validation split given, several
seeds (and for a trained head a learning-rate × weight-decay grid) at once; it returns one fitted
head per seed. Its `module_` (a torch module whose forward gives class scores) is what runs save,
reload (`from_state`), write logits with, and what `predict_logits` forwards in row blocks.

A head declares what it takes, so that configs and the CLI never probe it:
`trained` (gradient-trained: epochs, learning rate, weight decay, batch size, re-balancing; seeds
give different heads), `architecture` (network settings it takes: hidden widths, dropout),
`learned_projection` (it can learn a sum fusion's per-member projection), `needs_text` (it takes
the member's class-name text embeddings), `exportable` (its `module_` can ship in one file with
the backbones, `fgembed export-model`: a fixed network, not a search of stored training rows).
"""
from __future__ import annotations

import itertools
from typing import Callable, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
from torch import nn

from ..errors import FgembedError
from .blocks import blocks

FLOATS = (np.float32, np.float64, np.float16)  # kept as they are (the views' float16 stays float16)
FINITE_ELEMENTS = 1 << 24  # values per finiteness check: a float16 block may be widened to float32 (64 MiB)


def as_rows(X, device: torch.device) -> torch.Tensor:
    """Rows on the device in their own floating dtype: float16 stays float16 (never a float32 copy
    of the whole matrix); only float64 is narrowed, because the heads compute in float32."""
    if not isinstance(X, torch.Tensor):
        X = np.ascontiguousarray(X)
        X = torch.from_numpy(X) if X.flags.writeable else torch.tensor(X)  # read-only (a memmap): copied
    if X.ndim != 2:
        raise FgembedError(f"X must be [n, d]; got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        X = X.float()
    return X.to(device, torch.float32 if X.dtype == torch.float64 else X.dtype)


def all_finite(X: torch.Tensor) -> bool:
    """Blockwise, so the check adds tens of MiB, not an [n, d] matrix, to a fit's peak memory."""
    ok = torch.ones((), dtype=torch.bool, device=X.device)
    for rows in blocks(len(X), max(1, FINITE_ELEMENTS // max(X.shape[1], 1))):
        ok &= torch.isfinite(X[rows]).all()
    return bool(ok)


def module_device(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class Head(ClassifierMixin, BaseEstimator):
    """Base of every registered head (see the module docstring)."""

    trained: ClassVar[bool] = False
    architecture: ClassVar[tuple[str, ...]] = ()
    learned_projection: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    exportable: ClassVar[bool] = True
    registered_name: ClassVar[str] = ""

    # ---- what a head implements --------------------------------------------------------------
    def fit_grid(self, X, y, X_val, y_val, *, seeds, lrs=None, weight_decays=None, n_classes: int | None = None,
                 on_epoch: Callable[[int], None] | None = None, balance: str = "none") -> list[Head]:
        """Fit on class codes 0..n_classes-1 with a given validation split; one head per seed (self
        first). Heads that are not `trained` take no lrs, weight decays or balance."""
        raise NotImplementedError

    def _empty_module(self, d: int, n_classes: int, state: dict) -> nn.Module:
        """A module of the fitted shape for `state` to be loaded into (`from_state`)."""
        raise NotImplementedError

    # ---- the scikit-learn face ---------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None) -> Head:
        """Fit on any labels; without a validation split, a stratified `validation_fraction` of
        the rows (a random one when some class has a single row) picks the epoch or the grid."""
        X, y = validate_data(self, X, y, dtype=FLOATS)
        check_classification_targets(y)
        classes, codes = np.unique(y, return_inverse=True)
        if X_val is None:
            X, X_val, codes, val_codes = self._carve(X, codes)
        else:
            X_val = validate_data(self, X_val, dtype=FLOATS, reset=False)
            val_codes = self._codes(classes, column_or_1d(y_val))
        self.fit_grid(X, codes, X_val, val_codes, seeds=[getattr(self, "random_state", 0)], n_classes=len(classes))
        self.classes_ = classes
        return self

    def _carve(self, X: np.ndarray, codes: np.ndarray) -> tuple:
        fraction = getattr(self, "validation_fraction", 0.2)
        if len(X) < 4:  # too few rows to hold any out: validate on the training rows
            return X, X, codes, codes
        stratify = codes if np.bincount(codes).min() >= 2 and round(fraction * len(X)) >= codes.max() + 1 else None
        return train_test_split(X, codes, test_size=fraction, stratify=stratify,
                                random_state=getattr(self, "random_state", 0))

    @staticmethod
    def _codes(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
        codes = np.searchsorted(classes, y)
        if (codes >= len(classes)).any() or (classes[np.minimum(codes, len(classes) - 1)] != y).any():
            raise FgembedError("y_val holds labels that y does not")
        return codes

    def _fitted(self, d: int, n_classes: int) -> None:
        self.classes_, self.n_features_in_ = np.arange(n_classes), d

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")

    def predict_logits(self, X) -> np.ndarray:
        """Class scores [n, C] float32 in `classes_` order; float16 or float32 input, numpy or
        torch, forwarded in row blocks (100k rows × 10k classes would not fit at once)."""
        check_is_fitted(self)
        if not isinstance(X, torch.Tensor):
            X = validate_data(self, X, dtype=FLOATS, reset=False)
        elif X.shape[1] != self.n_features_in_:
            raise FgembedError(f"X has {X.shape[1]} features; this head was fitted on {self.n_features_in_}")
        X = as_rows(X, module_device(self.module_))
        self.module_.eval()
        with torch.no_grad():
            out = [self.module_(X[rows].float()).float().cpu() for rows in blocks(len(X))]
        return (torch.cat(out) if out else torch.zeros(0, len(self.classes_))).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.predict_logits(X)), 1).numpy()

    def predict(self, X) -> np.ndarray:
        best = self.predict_logits(X).argmax(1)  # first: an unfitted head raises NotFittedError here
        return self.classes_[best]

    @classmethod
    def from_state(cls, params: dict, d: int, n_classes: int, state_dict: dict) -> Head:
        """Rebuild a saved head from its constructor parameters and `module_.state_dict()` (as
        `fgembed predict` does from a run directory)."""
        head = cls(**params)
        head.module_ = head._empty_module(d, n_classes, state_dict)
        head.module_.load_state_dict(state_dict)
        head.module_.eval()
        head._fitted(d, n_classes)
        return head
