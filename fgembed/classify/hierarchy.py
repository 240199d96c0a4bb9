"""Taxonomy-aware heads: one classifier per level of a coarse → fine label tree, and their training.

Three multi-level heads over a view's design rows, each returning one logit tensor per level
(coarse → fine), chosen from the `HIERARCHIES` registry (timm-style):

- `independent`: one reference MLP per level (the flamingo-or-bird paper's "vanilla multi").
- `shared`: one trunk (the reference MLP's hidden layers) with a Linear head per level (Zusin's
  two heads; the flamingo-or-bird paper's "vanilla single").
- `disentangled`: the flamingo-or-bird paper's split-and-reinforce (§4.2, eq. 2): the trunk's last hidden layer f is
  split into K parts; level k's head sees CONCAT(f_k, Γ(f_{k+1}), …, Γ(f_K)) with Γ = stop-gradient,
  so a coarse loss trains its own part (and its head's weights on the finer parts) but never
  shapes the finer parts. We split the LEARNED hidden layer, not the frozen input embedding:
  splitting a frozen input would stop nothing. The earlier trunk layers stay shared, as the flamingo-or-bird paper's
  backbone F is.

Training: `fit_levels` trains one model per seed; `fit_levels_grid` trains an lr × weight-decay grid
setting by setting and keeps per seed the setting whose best epoch validates best. What the
trained models' logits are scored with (the taxonomy, consistency, consistent decoders, mistake
severity, the selective curve) is `hierarchy_metrics`: it needs logits, never a model.
"""
from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..devices import resolve_device
from ..errors import FgembedError
from .metrics import f1_torch
from .blocks import blocks
from .train import cpu_threads


# ---- multi-level heads ---------------------------------------------------------------------
def _trunk(d: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """The reference MLP's hidden layers (as `heads.MLPHead`): Linear → ReLU → BatchNorm → Dropout."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d, width), nn.ReLU(), nn.BatchNorm1d(width), nn.Dropout(dropout)]
        d = width
    return nn.Sequential(*layers)


class IndependentHeads(nn.Module):
    """One reference MLP per level, trained side by side (the flamingo-or-bird paper's "vanilla multi")."""

    def __init__(self, d: int, n_classes: Sequence[int], hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nn.Sequential(_trunk(d, hidden, dropout), nn.Linear(hidden[-1], c))
                                  for c in n_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [net(x) for net in self.nets]


class SharedTrunkHeads(nn.Module):
    """One trunk, a Linear head per level (Zusin's two heads; the flamingo-or-bird paper's "vanilla single")."""

    def __init__(self, d: int, n_classes: Sequence[int], hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.trunk = _trunk(d, hidden, dropout)
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], c) for c in n_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.trunk(x)
        return [head(f) for head in self.heads]


class DisentangledHeads(nn.Module):
    """The flamingo-or-bird paper's split-and-reinforce: the trunk's last hidden layer is split into K near-equal parts
    (`part_slices`); level k's head reads its own part and the finer parts detached (eq. 2)."""

    def __init__(self, d: int, n_classes: Sequence[int], hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5) -> None:
        super().__init__()
        K, width = len(n_classes), hidden[-1]
        if width < K:
            raise FgembedError(f"the last hidden layer ({width}) cannot be split into {K} level parts")
        self.trunk = _trunk(d, hidden, dropout)
        sizes = [len(a) for a in np.array_split(np.arange(width), K)]
        bounds = np.cumsum([0, *sizes])
        self.part_slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self.heads = nn.ModuleList(nn.Linear(width - int(bounds[k]), c) for k, c in enumerate(n_classes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.trunk(x)
        parts = [f[:, s] for s in self.part_slices]
        return [head(torch.cat([parts[k], *(p.detach() for p in parts[k + 1:])], 1))
                for k, head in enumerate(self.heads)]


HIERARCHIES: dict[str, type[nn.Module]] = {
    "independent": IndependentHeads, "shared": SharedTrunkHeads, "disentangled": DisentangledHeads}


def list_hierarchies(pattern: str = "*") -> list[str]:
    return sorted(fnmatch.filter(HIERARCHIES, pattern))


def create_hierarchy(name: str, d: int, n_classes: Sequence[int], **params) -> nn.Module:
    if name not in HIERARCHIES:
        raise FgembedError(f"unknown hierarchy {name!r}; choose from {', '.join(list_hierarchies())}")
    return HIERARCHIES[name](d, list(n_classes), **params)


def hierarchical_loss(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                      weights: Sequence[float] | None = None) -> torch.Tensor:
    """Σ_k w_k · CE_k (004 eq. 1; 001 uses all weights 1, the default)."""
    weights = [1.0] * len(logits) if weights is None else list(weights)
    if len(weights) != len(logits):
        raise FgembedError(f"{len(weights)} level weights for {len(logits)} levels")
    return sum(w * F.cross_entropy(z, t) for w, z, t in zip(weights, logits, targets))


# ---- training ------------------------------------------------------------------------------
@dataclass
class LevelsFit:
    """One trained multi-level model (eval mode) at its best epoch."""

    module: nn.Module
    seed: int
    best_epoch: int
    best_val_f1: list[float]            # per level, at the best epoch
    history: list[dict] = field(default_factory=list)
    lr: float = 0.0
    weight_decay: float = 0.0
    best_val_score: float = -1.0        # what selects the epoch and the setting (`select`)
    grid: list[dict] = field(default_factory=list)  # every setting's best score and epoch (fit_levels_grid)

    @property
    def chosen(self) -> dict[str, float]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}


SELECTIONS = ("mean", "fine")


@torch.no_grad()
def _forward_blocks(module: nn.Module, X: torch.Tensor) -> list[torch.Tensor]:
    """Eval-mode logits per level on the module's device, row blocks cast to float32 one at a time."""
    device = next(module.parameters()).device
    module.eval()
    outputs = [module(X[rows].to(device).float()) for rows in blocks(len(X))]
    return [torch.cat(level) for level in zip(*outputs)]


def predict_levels(module: nn.Module, X) -> list[np.ndarray]:
    """Logits per level, [n, C_k] float32 on the host (float16 or float32 input)."""
    return [z.float().cpu().numpy() for z in _forward_blocks(module, torch.as_tensor(X))]


def fit_levels(name: str, X, ys: Sequence[np.ndarray], X_val, ys_val: Sequence[np.ndarray],
               n_classes: Sequence[int], *, seeds: Sequence[int] = (0,), lr: float = 1e-3,
               weight_decay: float = 0.01, epochs: int = 150, batch_size: int = 128,
               level_weights: Sequence[float] | None = None, select: str = "mean",
               hidden: Sequence[int] = (512, 256), dropout: float = 0.5, device: str = "auto",
               on_epoch: Callable[[int], None] | None = None) -> list[LevelsFit]:
    """Train one multi-level model per seed with train.py's recipe (AdamW, constant lr, the
    training matrix resident on the device in its own dtype, batches sliced from a permuted index
    and cast to float32 one batch at a time).

    The best epoch maximises the mean over levels of the weighted validation F1 (`select="mean"`,
    the default: 004 reports the mean over levels, "avg acc") or the fine level's alone
    (`select="fine"`)."""
    _check(select, epochs, batch_size, [(lr, weight_decay)], level_weights, n_classes)
    data = _on_device(X, ys, X_val, ys_val, n_classes, device)
    return _fit_seeds(name, data, n_classes, seeds, lr, weight_decay, epochs, batch_size, level_weights, select,
                      hidden, dropout, on_epoch)


def fit_levels_grid(name: str, X, ys: Sequence[np.ndarray], X_val, ys_val: Sequence[np.ndarray],
                    n_classes: Sequence[int], *, seeds: Sequence[int] = (0,), lrs: Sequence[float] = (1e-3,),
                    weight_decays: Sequence[float] = (0.01,), epochs: int = 150, batch_size: int = 128,
                    level_weights: Sequence[float] | None = None, select: str = "mean",
                    hidden: Sequence[int] = (512, 256), dropout: float = 0.5, device: str = "auto",
                    on_epoch: Callable[[float], None] | None = None) -> list[LevelsFit]:
    """`fit_levels` at every (lr, weight decay), lr-major; per seed the setting with the best
    validation score — the same score that picks the best epoch (`select`: by default the mean over
    levels of the weighted validation F1, the flamingo-or-bird paper's "avg"; ties go to the first setting), so a setting
    is chosen the way an epoch is. Each fit's `grid` lists every setting's score and best epoch.

    Settings train one after another, not batched like `train.train_grid`: its stacked model runs
    a chain of layers with one output, and these heads branch per level. The rows and labels go to
    the device once, for every setting. Every setting of a seed starts from the same initial
    weights and batch order, so the kept fit equals the same setting trained alone.
    `on_epoch(1 / settings)` after every epoch of every setting."""
    settings = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not settings or len(set(settings)) != len(settings):
        raise FgembedError(f"need distinct learning rates and weight decays; got {list(lrs)}, {list(weight_decays)}")
    _check(select, epochs, batch_size, settings, level_weights, n_classes)
    data = _on_device(X, ys, X_val, ys_val, n_classes, device)
    best: list[LevelsFit | None] = [None] * len(seeds)
    grids: list[list[dict]] = [[] for _ in seeds]
    tick = None if on_epoch is None else (lambda n=1: on_epoch(n / len(settings)))
    for lr, wd in settings:
        for s, fit in enumerate(_fit_seeds(name, data, n_classes, seeds, lr, wd, epochs, batch_size, level_weights,
                                           select, hidden, dropout, tick)):
            grids[s].append({"lr": lr, "weight_decay": wd, "best_val_score": fit.best_val_score,
                             "best_val_f1": fit.best_val_f1, "best_epoch": fit.best_epoch})
            if best[s] is None or fit.best_val_score > best[s].best_val_score:
                best[s] = fit
    for fit, grid in zip(best, grids):
        fit.grid = grid
    return best


def _check(select: str, epochs: int, batch_size: int, settings: Sequence[tuple[float, float]],
           level_weights: Sequence[float] | None, n_classes: Sequence[int]) -> None:
    if select not in SELECTIONS:
        raise FgembedError(f"unknown selection {select!r}; choose one of {', '.join(SELECTIONS)}")
    if epochs < 1 or batch_size < 2 or any(lr <= 0 or wd < 0 for lr, wd in settings):
        raise FgembedError("need epochs ≥ 1, batch size ≥ 2, lr > 0 and weight decay ≥ 0")
    if level_weights is not None and (len(level_weights) != len(n_classes) or min(level_weights) < 0):
        raise FgembedError(f"need {len(n_classes)} level weights ≥ 0 (one per level); got {list(level_weights)}")


def _on_device(X, ys: Sequence[np.ndarray], X_val, ys_val: Sequence[np.ndarray], n_classes: Sequence[int],
               device: str) -> tuple[torch.Tensor, ...]:
    """(X, Y, X_val, Y_val) on the device: rows in their own dtype, labels [levels, rows] int64."""
    device = resolve_device(device)
    X, X_val = torch.as_tensor(X).to(device), torch.as_tensor(X_val).to(device)
    Y = torch.as_tensor(np.stack(ys), dtype=torch.long, device=device)
    Y_val = torch.as_tensor(np.stack(ys_val), dtype=torch.long, device=device)
    if Y.shape != (len(n_classes), len(X)) or Y_val.shape != (len(n_classes), len(X_val)):
        raise FgembedError(f"need one label per row at each of {len(n_classes)} levels")
    return X, Y, X_val, Y_val


def _fit_seeds(name: str, data: tuple[torch.Tensor, ...], n_classes: Sequence[int], seeds: Sequence[int],
               lr: float, weight_decay: float, epochs: int, batch_size: int,
               level_weights: Sequence[float] | None, select: str, hidden: Sequence[int], dropout: float,
               on_epoch: Callable[[int], None] | None) -> list[LevelsFit]:
    """One model per seed on device-resident `data` (`_on_device`), each from its own seed."""
    X, Y, X_val, Y_val = data
    fits = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):
            torch.manual_seed(seed)
            module = create_hierarchy(name, X.shape[1], n_classes, hidden=hidden, dropout=dropout).to(X.device)
            fits.append(_train_one(module, X, Y, X_val, Y_val, n_classes, int(seed), lr, weight_decay, epochs,
                                   batch_size, level_weights, select, on_epoch))
    return fits


def _train_one(module: nn.Module, X: torch.Tensor, Y: torch.Tensor, X_val: torch.Tensor, Y_val: torch.Tensor,
               n_classes: Sequence[int], seed: int, lr: float, weight_decay: float, epochs: int, batch_size: int,
               level_weights: Sequence[float] | None, select: str,
               on_epoch: Callable[[int], None] | None) -> LevelsFit:
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator(device=X.device).manual_seed(seed)
    history: list[dict] = []
    weights = sum(p.numel() for p in module.parameters())
    with cpu_threads(X.device, batch_size * weights):
        best, best_epoch, best_f1, best_state = _epochs(module, optimizer, generator, X, Y, X_val, Y_val, n_classes,
                                                        epochs, batch_size, level_weights, select, on_epoch, history)
    module.load_state_dict(best_state)
    return LevelsFit(module.eval(), seed, best_epoch, best_f1, history, lr, weight_decay, best)


def _epochs(module: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, X: torch.Tensor,
            Y: torch.Tensor, X_val: torch.Tensor, Y_val: torch.Tensor, n_classes: Sequence[int], epochs: int,
            batch_size: int, level_weights: Sequence[float] | None, select: str,
            on_epoch: Callable[[int], None] | None, history: list[dict]) -> tuple[float, int, list, dict]:
    """The training epochs of `_train_one`: (best score, its epoch, its per-level F1, its state)."""
    best, best_epoch, best_f1, best_state = -1.0, -1, [], None
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(len(X), generator=generator, device=X.device)
        total = torch.zeros((), device=X.device)
        for start in range(0, len(X), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            loss = hierarchical_loss(module(X[idx].float()), list(Y[:, idx]), level_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        preds = [z.argmax(1) for z in _forward_blocks(module, X_val)]
        f1 = [f1_torch(Y_val[k], p, c) for k, (p, c) in enumerate(zip(preds, n_classes))]
        score = float(np.mean(f1)) if select == "mean" else f1[-1]
        history.append({"epoch": epoch, "train_loss": float(total) / len(X), "val_f1": f1, "val_score": score})
        if score > best:
            best, best_epoch, best_f1 = score, epoch, f1
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if on_epoch:
            on_epoch(1)
    return best, best_epoch, best_f1, best_state
