"""The exact PCA of the `sum` fusion: fitted on training rows, one member at a time."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.utils.extmath import svd_flip

from ..errors import FgembedError


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
