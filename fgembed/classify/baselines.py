"""Baseline heads beside the paper's MLP: cosine kNN, multinomial logistic regression, zero-shot.

Each follows the same contract as the trained heads (`fit_grid` → one fitted head per seed, a
`module_` whose forward gives class scores, `from_state` to rebuild a saved one), so a baseline
is a run like any other: it lands in `fgembed ensemble` tables, is a late-fusion member and is
served by `fgembed predict`. Their hyper-parameter grids (k, C) are chosen on the validation
split by weighted F1, as the MLP's epoch is.

- `knn`: dinov2's kNN evaluation — cosine similarity to the L2-normalised training rows, the
  top-k similarities softmaxed at temperature T, votes summed per class; k from {10, 20, 100, 200}.
- `logreg`: multinomial logistic regression with an L2 penalty, scikit-learn's objective
  (C·Σ cross-entropy + ½‖W‖²) minimised by full-batch L-BFGS in torch over row blocks, so it
  runs on the GPU and never upcasts the whole float16 matrix; C from a small grid, warm-started.
  (`benchmarks/baselines.py` times it against scikit-learn's lbfgs on CUB-shaped features.)
- `zeroshot`: no training — cosine similarity to the class-name text embeddings a CLIP-style
  backbone's text tower gave at extraction (`fgembed extract --text`), times its logit scale.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..devices import resolve_device
from ..errors import FgembedError
from .base import Head, as_rows
from .blocks import blocks
from .metrics import f1_torch
from .registry import register_head

KNN_KS = (10, 20, 100, 200)
LOGREG_CS = (0.01, 0.1, 1.0, 10.0)


def _float_blocks(X: torch.Tensor, size: int = 4096):
    for rows in blocks(len(X), size):
        yield X[rows].float()


class BaselineHead(Head):
    """A head whose fit is deterministic given its data (kNN, a convex problem, or no training):
    every seed gets the same head, so their std is 0, honestly. Subclasses build `module_` in
    `_fit_one` and record `grid_` (each candidate's validation F1) and `chosen_`."""

    def fit_grid(self, X, y, X_val, y_val, *, seeds, lrs=None, weight_decays=None, n_classes: int | None = None,
                 on_epoch: Callable[[int], None] | None = None, balance: str = "none") -> list[BaselineHead]:
        if lrs is not None or weight_decays is not None or balance != "none":
            raise FgembedError(f"the {self.registered_name} head is not trained by gradient descent: it takes no "
                               "learning rate, weight decay or re-balancing")
        device = resolve_device(self.device)
        X, X_val = as_rows(X, device), as_rows(X_val, device)
        y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
        y_val = torch.as_tensor(np.asarray(y_val), dtype=torch.long, device=device)
        if len(X) != len(y) or len(X_val) != len(y_val):
            raise FgembedError(f"one label per row: X {tuple(X.shape)}, y {tuple(y.shape)}")
        n_classes = int(n_classes or max(int(y.max()), int(y_val.max())) + 1)
        self._fit_one(X, y, X_val, y_val, n_classes)
        self.module_.eval()
        self._fitted(int(X.shape[1]), n_classes)
        self.history_, self.best_epoch_ = [], 0
        self.best_val_f1_ = max(g["best_val_f1"] for g in self.grid_)
        if on_epoch:
            on_epoch(1)
        return [self] + [self._copy(seed) for seed in list(seeds)[1:]]

    def _copy(self, seed: int) -> BaselineHead:
        head = self.__class__(**{**self.get_params(), "random_state": seed})
        head.__dict__.update({k: v for k, v in self.__dict__.items() if k.endswith("_")})
        return head


# ---- kNN ----------------------------------------------------------------------------------
class KNNModule(nn.Module):
    """Scores = log of the temperature-softmaxed top-k cosine votes per class (dinov2's kNN)."""

    def __init__(self, train: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int, temperature: float) -> None:
        super().__init__()
        self.register_buffer("bank", train)         # [N, d] L2-normalised training rows, in the input dtype
        self.register_buffer("bank_labels", labels)  # [N] int64
        self.register_buffer("k", torch.tensor(int(k)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.n_classes = n_classes

    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k similarities and neighbour labels, over the training rows in blocks (iNat-sized
        banks never make a [queries, N] matrix at once)."""
        x = nn.functional.normalize(x.float(), dim=1)
        best_sim = torch.empty(len(x), 0, device=x.device)
        best_idx = torch.empty(len(x), 0, dtype=torch.long, device=x.device)
        for start in range(0, len(self.bank), 65536):
            sims = x @ self.bank[start:start + 65536].float().T
            sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)
            best_sim, order = torch.cat([best_sim, sims], 1).topk(min(k, best_sim.shape[1] + sims.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + start], 1).gather(1, order)
        return best_sim, self.bank_labels[best_idx]

    def votes(self, sims: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        weights = torch.softmax(sims[:, :k] / self.temperature, dim=1)
        out = torch.zeros(len(sims), self.n_classes, device=sims.device)
        return out.scatter_add_(1, labels[:, :k], weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(self.k)
        sims, labels = self.topk(x, k)
        return self.votes(sims, labels, k).clamp_min(1e-12).log()


@register_head("knn")
class KNNHead(BaselineHead):
    """Cosine kNN with temperature-weighted votes (dinov2's kNN evaluation); k chosen on val. Not
    exportable: its module is the training rows themselves, searched in blocks of a size that
    depends on how many there are (an iNat bank is gigabytes), not a network to ship."""

    exportable = False

    def __init__(self, ks: tuple[int, ...] = KNN_KS, temperature: float = 0.07, device: str = "auto",
                 random_state: int = 0) -> None:
        self.ks, self.temperature, self.device, self.random_state = ks, temperature, device, random_state

    def _fit_one(self, X, y, X_val, y_val, n_classes: int) -> None:
        ks = sorted({int(k) for k in self.ks})
        if not ks or ks[0] < 1 or not self.temperature > 0:
            raise FgembedError(f"knn needs ks ≥ 1 and temperature > 0; got ks={self.ks}, T={self.temperature}")
        train = torch.cat([nn.functional.normalize(b, dim=1).to(X.dtype) for b in _float_blocks(X)])
        module = KNNModule(train, y, n_classes, ks[-1], self.temperature)
        pred = {k: [] for k in ks}
        with torch.no_grad():
            for block in _float_blocks(X_val):
                sims, labels = module.topk(block, ks[-1])
                for k in ks:
                    pred[k].append(module.votes(sims, labels, k).argmax(1))
        self.grid_ = [{"k": k, "best_val_f1": f1_torch(y_val, torch.cat(pred[k]), n_classes)} for k in ks]
        best = max(self.grid_, key=lambda g: g["best_val_f1"])
        module.k.fill_(best["k"])
        self.module_, self.chosen_ = module, {"k": best["k"]}

    def _empty_module(self, d: int, n_classes: int, state: dict) -> nn.Module:
        return KNNModule(torch.empty_like(state["bank"]), torch.empty_like(state["bank_labels"]), n_classes,
                         int(state["k"]), float(state["temperature"]))


# ---- logistic regression ------------------------------------------------------------------
@register_head("logreg")
class LogRegHead(BaselineHead):
    """Multinomial logistic regression (scikit-learn's L2 objective) by L-BFGS; C chosen on val."""

    def __init__(self, Cs: tuple[float, ...] = LOGREG_CS, max_iter: int = 200, tol: float = 1e-6,
                 device: str = "auto", random_state: int = 0) -> None:
        self.Cs, self.max_iter, self.tol, self.device, self.random_state = Cs, max_iter, tol, device, random_state

    def _fit_one(self, X, y, X_val, y_val, n_classes: int) -> None:
        Cs = sorted(float(c) for c in self.Cs)
        if not Cs or Cs[0] <= 0:
            raise FgembedError(f"logreg needs every C > 0; got {self.Cs}")
        linear = nn.Linear(X.shape[1], n_classes).to(X.device)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.grid_, best_f1, best_state = [], -1.0, None
        for C in Cs:  # small C first: each solution warm-starts the next
            _, iterations = minimise_logreg(linear, X, y, C, self.max_iter, self.tol)
            with torch.no_grad():
                pred = torch.cat([linear(b).argmax(1) for b in _float_blocks(X_val)])
            f1 = f1_torch(y_val, pred, n_classes)
            self.grid_.append({"C": C, "best_val_f1": f1, "iterations": iterations})
            if f1 > best_f1:
                best_f1, best_state = f1, {k: v.clone() for k, v in linear.state_dict().items()}
                self.n_iter_ = iterations  # of the kept C (warm-started from the smaller ones)
        linear.load_state_dict(best_state)
        self.module_ = linear
        self.chosen_ = {"C": max(self.grid_, key=lambda g: g["best_val_f1"])["C"]}

    def _empty_module(self, d: int, n_classes: int, state: dict) -> nn.Module:
        return nn.Linear(d, n_classes)


def minimise_logreg(linear: nn.Linear, X: torch.Tensor, y: torch.Tensor, C: float, max_iter: int,
                    tol: float) -> tuple[float, int]:
    """scikit-learn's objective divided by C·n — mean cross-entropy + ‖W‖² / (2·C·n), intercept
    unpenalised — by full-batch L-BFGS; gradients accumulate over row blocks, so the float16
    matrix is cast one block at a time. Returns the final objective and L-BFGS's iterations."""
    n = len(X)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        total = linear.weight.pow(2).sum() / (2 * C * n)
        total.backward()
        value = float(total.detach())
        for start in range(0, n, 16384):
            block = X[start:start + 16384].float()
            loss = nn.functional.cross_entropy(linear(block), y[start:start + 16384], reduction="sum") / n
            loss.backward()
            value += float(loss.detach())
        return torch.tensor(value)

    optimizer.step(objective)
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    return float(objective()), iterations


# ---- zero-shot ----------------------------------------------------------------------------
class ZeroShotModule(nn.Module):
    def __init__(self, text: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("text", nn.functional.normalize(text.float(), dim=1))  # [C, d]
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(x.float(), dim=1) @ self.text.T


@register_head("zeroshot")
class ZeroShotHead(BaselineHead):
    """Class scores from text embeddings of the class names: no training rows are used (the
    training call only checks shapes, so the head joins runs and late fusion like any other)."""

    needs_text = True  # runs pass the member's stored text embeddings as `text_embeddings`

    def __init__(self, text_embeddings: np.ndarray | None = None, logit_scale: float = 100.0,
                 device: str = "auto", random_state: int = 0) -> None:
        self.text_embeddings, self.logit_scale = text_embeddings, logit_scale
        self.device, self.random_state = device, random_state

    def _fit_one(self, X, y, X_val, y_val, n_classes: int) -> None:
        if self.text_embeddings is None:
            raise FgembedError("the zeroshot head needs class-name text embeddings: extract the backbone "
                               "with `fgembed extract --text` (open_clip models only)")
        text = torch.as_tensor(np.asarray(self.text_embeddings, np.float32), device=X.device)
        if text.shape != (n_classes, X.shape[1]):
            raise FgembedError(f"text embeddings are {tuple(text.shape)}; need [{n_classes} classes, "
                               f"{X.shape[1]} dims] (zeroshot works on a single open_clip member)")
        self.module_ = ZeroShotModule(text, self.logit_scale)
        with torch.no_grad():
            pred = torch.cat([self.module_(b).argmax(1) for b in _float_blocks(X_val)])
        self.grid_ = [{"best_val_f1": f1_torch(y_val, pred, n_classes)}]
        self.chosen_ = {}

    def _empty_module(self, d: int, n_classes: int, state: dict) -> nn.Module:
        return ZeroShotModule(torch.ones(n_classes, d), 1.0)
