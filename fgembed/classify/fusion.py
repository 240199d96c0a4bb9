"""Fusion math over member embeddings or logits of the same rows — no store access (`views.py`
reads the store and applies these; `predict` applies them to new images).

- `FUSIONS` (registry, timm-style: the dict is both the choices and the dispatch): how member
  embeddings become one design row — `single`, `concat` (each member optionally L2-normalised
  first: their scales differ), `sum` (each member projected to one dimension and summed; by PCA
  fitted on training rows only, or — `project="linear"` — the concatenation, projected by the
  head's own learned `SumProjection`).
- `late`: members' logits (or probabilities) from independently trained heads, averaged,
  optionally with weights chosen on validation rows (`fit_late_weights`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.utils.extmath import svd_flip
from torch import nn

from ..errors import FgembedError

PROJECTIONS = ("pca", "linear")
LATE_MODES = ("logits", "proba")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concat(features: list[np.ndarray], l2: bool = False) -> np.ndarray:
    return np.concatenate([l2_normalise(f) if l2 else f for f in features], axis=1)


class PCASum:
    """Project each member to `n_components` by its own PCA (fitted on training rows) and sum.

    The default dimension is the smallest member's, capped by the number of training rows (PCA
    cannot find more components than samples). Members may be fitted one at a time
    (`fit_member`), so only one member's training rows need be in memory as float32.

    The PCA is exact, with scikit-learn's orientation (`svd_flip`: each component's largest
    loading positive), whatever computes it. On the host, scikit-learn's `covariance_eigh`
    solver when there are at least as many rows as dimensions (one d × d product and the
    eigendecomposition of the covariance — the tall case of every real view), else its `full`
    SVD of the rows. Its `auto` choice would take the randomized solver for 768 of 1,024+
    dimensions: its trailing components were O(1) off the exact ones and depended on random_state. With
    `device` a GPU, torch's `eigh` of the float64 covariance on it. Rows are centred on their
    float64 mean and the covariance is float64 on both: uncentred float32 rows (XᵀX − nμμᵀ) lose
    the small components to cancellation when the mean is large against the spread, and a float32
    covariance of 8,000 rows already turns the trailing components of an embedding's slowly
    decaying spectrum (relative eigengaps ~1e-3) by O(1).
    """

    def __init__(self, n_components: int | None = None, device: str | torch.device = "cpu") -> None:
        self.n_components, self.device = n_components, device

    def prepare(self, dims: list[int], n_train: int) -> PCASum:
        """Choose the common dimension before any member is fitted."""
        k = self.n_components or min(dims)
        limit = min(n_train, *dims)
        if k > limit:
            if self.n_components:
                raise FgembedError(f"--project-dim {k} exceeds what PCA can give here ({limit}: the smallest "
                                   f"member dim or the number of training rows)")
            k = limit
        self.n_components_ = k
        self.means_: list[np.ndarray | None] = [None] * len(dims)
        self.components_: list[np.ndarray | None] = [None] * len(dims)
        return self

    def fit_member(self, i: int, train: np.ndarray) -> None:
        """Fit member i's PCA on its training rows (left unchanged)."""
        mean = np.asarray(train).mean(0, dtype=np.float64)
        if torch.device(self.device).type != "cpu":
            components = _components_on_device(train, mean, self.n_components_, self.device)
        else:
            centred = np.array(train, np.float64)  # float64 (see the class docstring), one copy, centred in place
            centred -= mean
            solver = "covariance_eigh" if centred.shape[0] >= centred.shape[1] else "full"
            pca = PCA(self.n_components_, svd_solver=solver, copy=False).fit(centred)
            components = pca.components_
        self.means_[i] = mean.astype(np.float32)
        self.components_[i] = np.ascontiguousarray(components, np.float32)

    def fit(self, train_features: list[np.ndarray]) -> PCASum:
        self.prepare([f.shape[1] for f in train_features], train_features[0].shape[0])
        for i, f in enumerate(train_features):
            self.fit_member(i, f)
        return self

    def transform_member(self, i: int, x: np.ndarray) -> np.ndarray:
        """Member i's projection of some rows, float32 (PCA's transform without whitening)."""
        return (np.asarray(x, np.float32) - self.means_[i]) @ self.components_[i].T

    def transform(self, features: list[np.ndarray]) -> np.ndarray:
        return np.sum([self.transform_member(i, f) for i, f in enumerate(features)], axis=0, dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to redo the projection, for saving beside the head's weights."""
        out = {}
        for i, (mean, components) in enumerate(zip(self.means_, self.components_)):
            # C order: safetensors writes the raw buffer (scikit-learn's components_ may be F order)
            out[f"member{i}.mean"] = np.ascontiguousarray(mean)
            out[f"member{i}.components"] = np.ascontiguousarray(components)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PCASum:
        """The inverse of `arrays()` (a saved projection, reloaded for new embeddings)."""
        n = len([k for k in arrays if k.endswith(".mean")])
        if n == 0 or any(f"member{i}.components" not in arrays for i in range(n)):
            raise FgembedError(f"not a saved PCA sum projection (keys {sorted(arrays)})")
        self = cls()
        self.means_ = [np.asarray(arrays[f"member{i}.mean"], np.float32) for i in range(n)]
        self.components_ = [np.asarray(arrays[f"member{i}.components"], np.float32) for i in range(n)]
        self.n_components_ = self.components_[0].shape[0]
        return self


def _components_on_device(train: np.ndarray, mean: np.ndarray, k: int, device: str | torch.device) -> np.ndarray:
    """The top-k PCA components of `train` from torch's `eigh` of its float64 covariance on
    `device`, oriented as scikit-learn orients them."""
    centred = torch.as_tensor(np.asarray(train), device=device).to(torch.float64, copy=True)  # never the caller's
    centred -= torch.as_tensor(mean, device=device)
    covariance = centred.T @ centred / max(len(centred) - 1, 1)
    del centred
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    components = np.ascontiguousarray(vectors[:, -k:].flip(1).T.cpu().numpy())  # descending, [k, d]
    return svd_flip(None, components, u_based_decision=False)[1]


def _single(parts: list[np.ndarray], l2: bool, projection: PCASum | None) -> np.ndarray:
    return parts[0]


def _sum(parts: list[np.ndarray], l2: bool, projection: PCASum | None) -> np.ndarray:
    if projection is None:  # learned projection: the head's SumProjection takes the concatenation
        return concat(parts, l2)
    return projection.transform([l2_normalise(p) if l2 else p for p in parts])


# name → fuse(member blocks, l2, projection) → design rows of those rows
FUSIONS: dict[str, Callable[[list[np.ndarray], bool, PCASum | None], np.ndarray]] = {
    "single": _single,
    "concat": lambda parts, l2, projection: concat(parts, l2),
    "sum": _sum,
}
STRATEGIES = ("concat", "sum", "late")  # what `fgembed ensemble` scores beside single heads


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


def _check_mode(mode: str) -> None:
    if mode not in LATE_MODES:
        raise FgembedError(f"late fusion mode must be logits or proba, got {mode!r}")


def late_fusion(logits: list[np.ndarray], mode: str = "logits", weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted average of members' logits (`logits`) or softmax probabilities (`proba`), in
    float32 (callers pass row blocks; float16 inputs are widened block by block).

    Returns scores whose argmax is the fused prediction (log-probabilities for `proba`, so
    top-5 and argmax work the same way on both)."""
    _check_mode(mode)
    shapes = {z.shape for z in logits}
    if len(shapes) != 1:
        raise FgembedError(f"late fusion needs logits over the same rows and classes; got shapes {sorted(shapes)}")
    w = np.full(len(logits), 1 / len(logits)) if weights is None else np.asarray(weights, np.float64)
    fused = None
    for wi, z in zip(w, logits):
        part = torch.as_tensor(np.asarray(z), dtype=torch.float32)
        part = torch.softmax(part, dim=1) if mode == "proba" else part
        fused = part * float(wi) if fused is None else fused.add_(part, alpha=float(wi))
    return (fused.clamp_min(1e-30).log() if mode == "proba" else fused).numpy()


def fit_late_weights(val_logits: list[np.ndarray], y_val: np.ndarray, mode: str = "logits",
                     steps: int = 100) -> np.ndarray:
    """Member weights on the simplex minimising the fused cross-entropy on the validation rows
    (a softmax parametrisation optimised with L-BFGS; the test rows are never seen). Callers
    pass a bounded sample of rows: the stack is members × rows × classes in float32."""
    _check_mode(mode)
    stack = torch.stack([torch.as_tensor(np.asarray(z), dtype=torch.float32) for z in val_logits])
    if mode == "proba":
        stack = torch.softmax(stack, dim=2)
    y = torch.as_tensor(y_val, dtype=torch.long)
    theta = torch.zeros(len(val_logits), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        fused = (torch.softmax(theta, 0)[:, None, None] * stack).sum(0)
        scores = fused.clamp_min(1e-12).log() if mode == "proba" else fused
        value = nn.functional.cross_entropy(scores, y)
        value.backward()
        return value

    optimizer.step(loss)
    return torch.softmax(theta.detach(), 0).double().numpy()
