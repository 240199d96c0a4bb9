"""Fusion of several backbones' embeddings of the same rows.

- `concat`: members end to end, each optionally L2-normalised first (their scales differ).
- `sum`: every member projected to one dimension and summed — by PCA fitted on the training
  rows only (then reused unchanged on val/test, so nothing leaks), or by a learned linear
  projection trained with the head (`SumProjection`, used by the heads' `sum_blocks`).
- `late`: the members' logits (or probabilities) from independently trained heads, averaged,
  optionally with weights chosen on the validation split.

Members always come from one store, so row i of every member is the same image; `Members`
keeps only rows every member could embed (a failed image is NaN in its backbone).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn

from .datasets.table import SPLIT_NAMES
from .errors import FgembedError
from .store import FeatureStore

STRATEGIES = ("concat", "sum", "late")
PROJECTIONS = ("pca", "linear")


@dataclass
class Members:
    """The embeddings of several backbones over all rows of one store, plus labels and splits."""

    names: list[str]
    features: list[np.ndarray]  # one [N, d_i] float32 array per member
    labels: np.ndarray          # [N] target codes (fine label or a taxonomy level)
    split: np.ndarray           # [N] 0 train, 1 val, 2 test
    usable: np.ndarray          # [N] every member embedded this row

    @classmethod
    def load(cls, store: FeatureStore, names: list[str], level: str | None = None) -> "Members":
        if not names:
            raise FgembedError("no features named; pass at least one backbone")
        if len(set(names)) != len(names):
            raise FgembedError(f"a member is named twice: {'+'.join(names)}")
        features = [store.features(name) for name in names]
        usable = np.logical_and.reduce([np.isfinite(f).all(1) for f in features])
        return cls(list(names), features, store.labels(level=level), store.group["samples/split"][:], usable)

    @property
    def dims(self) -> list[int]:
        return [f.shape[1] for f in self.features]

    def rows(self, split: str) -> np.ndarray:
        """Store row indices of a split that every member embedded."""
        return np.flatnonzero((self.split == SPLIT_NAMES[split]) & self.usable)

    def dropped(self, split: str) -> int:
        return int(((self.split == SPLIT_NAMES[split]) & ~self.usable).sum())


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concat(features: list[np.ndarray], l2: bool = False) -> np.ndarray:
    return np.concatenate([l2_normalise(f) if l2 else f for f in features], axis=1)


class PCASum:
    """Project each member to `n_components` by its own PCA (fitted on training rows) and sum.

    The default dimension is the smallest member's, capped by the number of training rows
    (PCA cannot find more components than samples).
    """

    def __init__(self, n_components: int | None = None, random_state: int = 0) -> None:
        self.n_components, self.random_state = n_components, random_state

    def fit(self, train_features: list[np.ndarray]) -> "PCASum":
        n_train = train_features[0].shape[0]
        k = self.n_components or min(f.shape[1] for f in train_features)
        limit = min(n_train, *(f.shape[1] for f in train_features))
        if k > limit:
            if self.n_components:
                raise FgembedError(f"--project-dim {k} exceeds what PCA can give here ({limit}: the smallest "
                                   f"member dim or the number of training rows)")
            k = limit
        self.pcas_ = [PCA(n_components=k, random_state=self.random_state).fit(f) for f in train_features]
        self.n_components_ = k
        return self

    def transform(self, features: list[np.ndarray]) -> np.ndarray:
        return np.sum([pca.transform(f) for pca, f in zip(self.pcas_, features)], axis=0).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to redo the projection, for saving beside the head's weights."""
        out = {}
        for i, pca in enumerate(self.pcas_):
            out[f"member{i}.mean"] = pca.mean_.astype(np.float32)
            out[f"member{i}.components"] = pca.components_.astype(np.float32)
        return out


class SumProjection(nn.Module):
    """Learned `sum` fusion: input is the members' concatenation; each block gets its own
    Linear(d_i, dim) and the projections are summed."""

    def __init__(self, blocks: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.projections = nn.ModuleList(nn.Linear(d, dim) for d in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, list(self.blocks), dim=1)
        return torch.stack([p(part) for p, part in zip(self.projections, parts)]).sum(0)


def late_fusion(logits: list[np.ndarray], mode: str = "logits", weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted average of members' logits (`logits`) or softmax probabilities (`proba`).

    Returns scores whose argmax is the fused prediction (log-probabilities for `proba`, so
    top-5 and argmax work the same way on both)."""
    if mode not in ("logits", "proba"):
        raise FgembedError(f"late fusion mode must be logits or proba, got {mode!r}")
    shapes = {z.shape for z in logits}
    if len(shapes) != 1:
        raise FgembedError(f"late fusion needs logits over the same rows and classes; got shapes {sorted(shapes)}")
    w = np.full(len(logits), 1 / len(logits)) if weights is None else np.asarray(weights, np.float64)
    stack = torch.as_tensor(np.stack(logits), dtype=torch.float64)
    if mode == "proba":
        stack = torch.softmax(stack, dim=2)
    fused = (torch.as_tensor(w)[:, None, None] * stack).sum(0)
    return (fused.log() if mode == "proba" else fused).float().numpy()


def fit_late_weights(val_logits: list[np.ndarray], y_val: np.ndarray, mode: str = "logits",
                     steps: int = 100) -> np.ndarray:
    """Member weights on the simplex minimising the fused cross-entropy on the validation rows
    (a softmax parametrisation optimised with L-BFGS; the test rows are never seen)."""
    stack = torch.as_tensor(np.stack(val_logits), dtype=torch.float64)
    if mode == "proba":
        stack = torch.softmax(stack, dim=2)
    y = torch.as_tensor(y_val, dtype=torch.long)
    theta = torch.zeros(len(val_logits), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        fused = (torch.softmax(theta, 0)[:, None, None] * stack).sum(0)
        scores = fused.clamp_min(1e-12).log() if mode == "proba" else fused
        value = nn.functional.cross_entropy(scores, y)
        value.backward()
        return value

    optimizer.step(loss)
    return torch.softmax(theta.detach(), 0).numpy()
