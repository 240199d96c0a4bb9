"""Taxonomy-aware heads and metrics: one classifier per level of a coarse → fine label tree.

Three multi-level heads over a view's design rows, each returning one logit tensor per level
(coarse → fine), chosen from the `HIERARCHIES` registry (timm-style):

- `independent`: one reference MLP per level (seed 004's "vanilla multi").
- `shared`: one trunk (the reference MLP's hidden layers) with a Linear head per level (seed 001's
  two heads; 004's "vanilla single").
- `disentangled`: 004's split-and-reinforce (§4.2, eq. 2): the trunk's last hidden layer f is
  split into K parts; level k's head sees CONCAT(f_k, Γ(f_{k+1}), …, Γ(f_K)) with Γ = stop-gradient,
  so a coarse loss trains its own part (and its head's weights on the finer parts) but never
  shapes the finer parts. We split the LEARNED hidden layer, not the frozen input embedding:
  splitting a frozen input would stop nothing. The earlier trunk layers stay shared, as 004's
  backbone F is.

Training: `fit_levels` trains one model per seed; `fit_levels_grid` trains an lr × weight-decay grid
setting by setting and keeps per seed the setting whose best epoch validates best.

Metrics: per-level classification metrics and their mean (004's "avg acc"); the consistency rate;
two consistent decoders (top-down, and the product of level probabilities along each root-to-leaf
path); mistake severity (mean depth of the lowest common ancestor over mistakes, root at depth 0 —
higher means the mistakes stay in a closer group); and the selective "deepest confident level"
prediction with its accuracy-versus-specificity curve (004's "flamingo or bird").
"""
from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..devices import resolve_device
from ..errors import FgembedError
from ..plots import save_figure
from .metrics import classification_metrics, f1_torch

BLOCK_ROWS = 16384          # rows per prediction / decoding block
LEVEL_ALIASES = {"species": "label"}  # CUB and iNat fine labels are species (CONVENTIONS)


# ---- the taxonomy --------------------------------------------------------------------------
@dataclass(frozen=True)
class Taxonomy:
    """Each fine class's ancestor at every level. `order` is coarse → fine; its last level is
    the fine one. `ancestor[level][c]` is the code of fine class c at `level` (-1 for a fine code
    no row carries)."""

    order: tuple[str, ...]
    ancestor: dict[str, np.ndarray]
    n_classes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_codes(cls, levels: dict[str, np.ndarray], order: Sequence[str],
                   n_classes: dict[str, int] | None = None) -> Taxonomy:
        """Build from per-row codes (`store.labels(level=…)` over all rows), keeping the names of
        `order` (`species` finds the codes under `label` and back). Refuses levels that do not
        nest: a class with two parents at the next coarser level."""
        order = tuple(order)
        if len(order) < 2 or len(set(order)) != len(order):
            raise FgembedError(f"a hierarchy needs two or more distinct levels, coarse to fine; got {','.join(order)}")
        codes = {name: np.asarray(levels[_resolve(name, levels)], np.int64) for name in order}
        if len({len(c) for c in codes.values()}) != 1:
            raise FgembedError("taxonomy levels differ in length")
        given = {name: int(n_classes[key]) for name in order
                 if n_classes and (key := _resolve(name, n_classes, strict=False))}
        counts = {name: max(int(codes[name].max()) + 1, given.get(name, 0)) for name in order}
        for coarse, fine in itertools.pairwise(order):
            pairs = np.unique(np.stack([codes[fine], codes[coarse]], 1), axis=0)
            if len(np.unique(pairs[:, 0])) != len(pairs):
                bad = pairs[np.flatnonzero(np.diff(pairs[:, 0]) == 0)[0]][0]
                parents = pairs[pairs[:, 0] == bad, 1]
                raise FgembedError(f"levels do not nest: {fine} class {bad} falls under {coarse} classes "
                                   f"{parents[0]} and {parents[1]} (give levels coarse to fine)")
        ancestor = {}
        for name in order:
            table = np.full(counts[order[-1]], -1, np.int64)
            table[codes[order[-1]]] = codes[name]
            ancestor[name] = table
        return cls(order, ancestor, counts)

    @classmethod
    def from_store(cls, store, order: Sequence[str]) -> Taxonomy:
        """From a FeatureStore's `samples/<level>` arrays (`species` names the fine `label`)."""
        names = {"label": store.class_names, **store.samples_attrs.get("levels", {})}
        codes, counts = {}, {}
        for name in order:
            key = _resolve(name, names, strict=False) or name
            codes[name] = store.labels(level=None if key == "label" else key)
            counts[name] = len(names[key])
        return cls.from_codes(codes, order, counts)

    @property
    def fine(self) -> str:
        return self.order[-1]

    def ancestors(self, fine_ids: np.ndarray, level: str) -> np.ndarray:
        """Codes at `level` of the given fine classes."""
        return self.ancestor[_resolve(level, self.ancestor)][np.asarray(fine_ids, np.int64)]

    def parents(self, k: int) -> np.ndarray:
        """[C_k] the parent code (level k-1) of each class at level k (-1 when unused)."""
        table = np.full(self.n_classes[self.order[k]], -1, np.int64)
        used = self.ancestor[self.fine] >= 0
        table[self.ancestor[self.order[k]][used]] = self.ancestor[self.order[k - 1]][used]
        return table

    def paths(self) -> np.ndarray:
        """[C_fine, K] each fine class's codes from the coarsest level to itself."""
        return np.stack([self.ancestor[name] for name in self.order], 1)


def _resolve(name: str, available, strict: bool = True) -> str | None:
    """`name` itself, or its alias (species ↔ label) when only that is available."""
    if name in available:
        return name
    alias = {**LEVEL_ALIASES, **{v: k for k, v in LEVEL_ALIASES.items()}}.get(name)
    if alias in available:
        return alias
    if strict:
        raise FgembedError(f"no codes for level {name!r}; have {', '.join(available)}")
    return None


# ---- multi-level heads ---------------------------------------------------------------------
def _trunk(d: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """The reference MLP's hidden layers (as `heads.MLPHead`): Linear → ReLU → BatchNorm → Dropout."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d, width), nn.ReLU(), nn.BatchNorm1d(width), nn.Dropout(dropout)]
        d = width
    return nn.Sequential(*layers)


class IndependentHeads(nn.Module):
    """One reference MLP per level, trained side by side (004's "vanilla multi")."""

    def __init__(self, d: int, n_classes: Sequence[int], hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nn.Sequential(_trunk(d, hidden, dropout), nn.Linear(hidden[-1], c))
                                  for c in n_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [net(x) for net in self.nets]


class SharedTrunkHeads(nn.Module):
    """One trunk, a Linear head per level (001's two heads; 004's "vanilla single")."""

    def __init__(self, d: int, n_classes: Sequence[int], hidden: Sequence[int] = (512, 256),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.trunk = _trunk(d, hidden, dropout)
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], c) for c in n_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.trunk(x)
        return [head(f) for head in self.heads]


class DisentangledHeads(nn.Module):
    """004's split-and-reinforce: the trunk's last hidden layer is split into K near-equal parts
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
    blocks = [module(X[i:i + BLOCK_ROWS].to(device).float()) for i in range(0, len(X), BLOCK_ROWS)]
    return [torch.cat(level) for level in zip(*blocks)]


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
    if select not in SELECTIONS:
        raise FgembedError(f"unknown selection {select!r}; choose one of {', '.join(SELECTIONS)}")
    if epochs < 1 or batch_size < 2 or lr <= 0 or weight_decay < 0:
        raise FgembedError("need epochs ≥ 1, batch size ≥ 2, lr > 0 and weight decay ≥ 0")
    if level_weights is not None and (len(level_weights) != len(n_classes) or min(level_weights) < 0):
        raise FgembedError(f"need {len(n_classes)} level weights ≥ 0 (one per level); got {list(level_weights)}")
    device = resolve_device(device)
    X, X_val = torch.as_tensor(X).to(device), torch.as_tensor(X_val).to(device)
    Y = torch.as_tensor(np.stack(ys), dtype=torch.long, device=device)
    Y_val = torch.as_tensor(np.stack(ys_val), dtype=torch.long, device=device)
    if Y.shape != (len(n_classes), len(X)) or Y_val.shape != (len(n_classes), len(X_val)):
        raise FgembedError(f"need one label per row at each of {len(n_classes)} levels")
    fits = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            module = create_hierarchy(name, X.shape[1], n_classes, hidden=hidden, dropout=dropout).to(device)
            fits.append(_train_one(module, X, Y, X_val, Y_val, n_classes, int(seed), lr, weight_decay, epochs,
                                   batch_size, level_weights, select, on_epoch))
    return fits


def fit_levels_grid(name: str, X, ys: Sequence[np.ndarray], X_val, ys_val: Sequence[np.ndarray],
                    n_classes: Sequence[int], *, seeds: Sequence[int] = (0,), lrs: Sequence[float] = (1e-3,),
                    weight_decays: Sequence[float] = (0.01,), select: str = "mean",
                    on_epoch: Callable[[float], None] | None = None, **params) -> list[LevelsFit]:
    """`fit_levels` at every (lr, weight decay), lr-major; per seed the setting with the best
    validation score — the same score that picks the best epoch (`select`: by default the mean over
    levels of the weighted validation F1, 004's "avg"; ties go to the first setting), so a setting
    is chosen the way an epoch is. Each fit's `grid` lists every setting's score and best epoch.

    Settings train one after another, not batched like `train.train_grid`: its stacked model runs
    a chain of layers with one output, and these heads branch per level. Every setting of a seed
    starts from the same initial weights and batch order, so the kept fit equals the same setting
    trained alone. `on_epoch(1 / settings)` after every epoch of every setting."""
    settings = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not settings or len(set(settings)) != len(settings):
        raise FgembedError(f"need distinct learning rates and weight decays; got {list(lrs)}, {list(weight_decays)}")
    best: list[LevelsFit | None] = [None] * len(seeds)
    grids: list[list[dict]] = [[] for _ in seeds]
    tick = None if on_epoch is None else (lambda n=1: on_epoch(n / len(settings)))
    for lr, wd in settings:
        for s, fit in enumerate(fit_levels(name, X, ys, X_val, ys_val, n_classes, seeds=seeds, lr=lr,
                                           weight_decay=wd, select=select, on_epoch=tick, **params)):
            grids[s].append({"lr": lr, "weight_decay": wd, "best_val_score": fit.best_val_score,
                             "best_val_f1": fit.best_val_f1, "best_epoch": fit.best_epoch})
            if best[s] is None or fit.best_val_score > best[s].best_val_score:
                best[s] = fit
    for fit, grid in zip(best, grids):
        fit.grid = grid
    return best


def _train_one(module: nn.Module, X: torch.Tensor, Y: torch.Tensor, X_val: torch.Tensor, Y_val: torch.Tensor,
               n_classes: Sequence[int], seed: int, lr: float, weight_decay: float, epochs: int, batch_size: int,
               level_weights: Sequence[float] | None, select: str,
               on_epoch: Callable[[int], None] | None) -> LevelsFit:
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator(device=X.device).manual_seed(seed)
    best, best_epoch, best_f1, best_state, history = -1.0, -1, [], None, []
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
    module.load_state_dict(best_state)
    return LevelsFit(module.eval(), seed, best_epoch, best_f1, history, lr, weight_decay, best)


# ---- metrics and consistent decoding -------------------------------------------------------
def level_metrics(logits: Sequence[np.ndarray], ys: Sequence[np.ndarray], order: Sequence[str]) -> dict:
    """`{"levels": {<level>: classification_metrics}, "avg_accuracy": mean accuracy over levels}`
    for one seed; `runs.summarise`, applied at every depth, gives the mean ± std over seeds."""
    per_level = {name: classification_metrics(z, y) for name, z, y in zip(order, logits, ys)}
    return {"levels": per_level, "avg_accuracy": float(np.mean([m["accuracy"] for m in per_level.values()]))}


def consistency_rate(preds: Sequence[np.ndarray], taxonomy: Taxonomy) -> float:
    """Fraction of rows whose predicted fine class has exactly the predicted coarse classes as
    its ancestors."""
    fine = np.asarray(preds[-1])
    ok = np.ones(len(fine), bool)
    for name, pred in zip(taxonomy.order[:-1], preds[:-1]):
        ok &= taxonomy.ancestors(fine, name) == np.asarray(pred)
    return float(ok.mean())


def _log_probs(logits: Sequence[np.ndarray], start: int, stop: int) -> list[torch.Tensor]:
    return [torch.log_softmax(torch.as_tensor(z[start:stop], dtype=torch.float32), 1) for z in logits]


def decode_top_down(logits: Sequence[np.ndarray], taxonomy: Taxonomy) -> list[np.ndarray]:
    """Greedy descent: the coarsest level's argmax, then at each finer level the argmax among the
    chosen parent's children. Consistent by construction."""
    parents = [torch.as_tensor(taxonomy.parents(k)) for k in range(1, len(taxonomy.order))]
    out: list[list[torch.Tensor]] = [[] for _ in taxonomy.order]
    for start in range(0, len(logits[0]), BLOCK_ROWS):
        lp = _log_probs(logits, start, start + BLOCK_ROWS)
        pred = lp[0].argmax(1)
        out[0].append(pred)
        for k in range(1, len(lp)):
            allowed = parents[k - 1][None, :] == pred[:, None]
            pred = lp[k].masked_fill(~allowed, -torch.inf).argmax(1)
            out[k].append(pred)
    return [torch.cat(level).numpy() for level in out]


def decode_path_product(logits: Sequence[np.ndarray], taxonomy: Taxonomy) -> list[np.ndarray]:
    """The fine class maximising Π_k p_k(ancestor_k(c)) (a sum of log-probabilities), and its
    ancestors at every coarser level. Consistent by construction."""
    paths = torch.as_tensor(taxonomy.paths())
    used = (paths >= 0).all(1)
    out = []
    for start in range(0, len(logits[0]), BLOCK_ROWS):
        lp = _log_probs(logits, start, start + BLOCK_ROWS)
        score = sum(level[:, paths[:, k].clamp(min=0)] for k, level in enumerate(lp))
        out.append(score.masked_fill(~used[None, :], -torch.inf).argmax(1))
    fine = torch.cat(out).numpy()
    return [taxonomy.ancestors(fine, name) for name in taxonomy.order]


DECODERS: dict[str, Callable[[Sequence[np.ndarray], Taxonomy], list[np.ndarray]]] = {
    "top_down": decode_top_down, "path_product": decode_path_product}


def decoded_metrics(preds: Sequence[np.ndarray], ys: Sequence[np.ndarray], taxonomy: Taxonomy) -> dict:
    """One seed's metrics of per-level predictions (coarse → fine, e.g. a decoder's), laid out as a
    run's: the fine level's accuracy / f1 / f1_macro at the top, `levels.<level>.*`, avg_accuracy,
    consistency and mistake_severity (None without a mistake: NaN is not JSON)."""
    levels = {}
    for name, pred, y in zip(taxonomy.order, preds, ys):
        y_t, p_t = torch.as_tensor(np.asarray(y), dtype=torch.long), torch.as_tensor(np.asarray(pred), dtype=torch.long)
        n = max(taxonomy.n_classes.get(name, 0), int(y_t.max()) + 1, int(p_t.max()) + 1)
        levels[name] = {"accuracy": float((p_t == y_t).double().mean()), "f1": f1_torch(y_t, p_t, n),
                        "f1_macro": f1_torch(y_t, p_t, n, "macro")}
    severity = mistake_severity(preds[-1], ys[-1], taxonomy)
    return levels[taxonomy.fine] | {
        "levels": levels, "avg_accuracy": float(np.mean([m["accuracy"] for m in levels.values()])),
        "consistency": consistency_rate(preds, taxonomy), "mistake_severity": None if np.isnan(severity) else severity}


def lca_depth(pred_fine: np.ndarray, true_fine: np.ndarray, taxonomy: Taxonomy) -> np.ndarray:
    """Depth of the lowest common ancestor of each (true, predicted) fine pair: 0 at the root,
    k when they agree down to the k-th level (levels nest, so agreement is a prefix)."""
    depth = np.zeros(len(pred_fine), np.int64)
    agree = np.ones(len(pred_fine), bool)
    for name in taxonomy.order:
        agree &= taxonomy.ancestors(pred_fine, name) == taxonomy.ancestors(true_fine, name)
        depth += agree
    return depth


def mistake_severity(pred_fine: np.ndarray, true_fine: np.ndarray, taxonomy: Taxonomy) -> float:
    """Mean LCA depth over the mistakes only (CONVENTIONS; root depth 0). Higher is milder: the
    wrong species is at least in the right family. NaN when there is no mistake."""
    pred_fine, true_fine = np.asarray(pred_fine), np.asarray(true_fine)
    wrong = pred_fine != true_fine
    return float(lca_depth(pred_fine[wrong], true_fine[wrong], taxonomy).mean()) if wrong.any() else float("nan")


def _confidence(logits: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and level: the max softmax probability and the argmax, [n, K] each (row blocks)."""
    conf, preds = [], []
    for start in range(0, len(logits[0]), BLOCK_ROWS):
        probs = [torch.softmax(torch.as_tensor(z[start:start + BLOCK_ROWS], dtype=torch.float32), 1) for z in logits]
        top = [p.max(1) for p in probs]
        conf.append(torch.stack([t.values for t in top], 1))
        preds.append(torch.stack([t.indices for t in top], 1))
    return torch.cat(conf), torch.cat(preds)


def _deepest(conf: torch.Tensor, preds: torch.Tensor, tau: float) -> tuple[np.ndarray, np.ndarray]:
    ok = (conf >= tau).flip(1).int()                                 # finest level first
    chosen = (conf.shape[1] - 1 - ok.argmax(1)).where(ok.any(1), torch.zeros(len(conf), dtype=torch.long))
    return chosen.numpy(), preds.gather(1, chosen[:, None]).squeeze(1).numpy()


def deepest_confident(logits: Sequence[np.ndarray], tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Selective prediction: per row the finest level whose max softmax probability is ≥ τ (the
    coarsest level when none is), and that level's argmax. Returns (level index, class code)."""
    return _deepest(*_confidence(logits), tau)


def selective_curve(logits: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                    taus: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Accuracy versus specificity over a τ sweep. Accuracy: the answer is right at the level it
    is given. Specificity: the mean answered depth as a fraction of the finest (1 = every row at
    species); `fine_fraction`: rows answered at the finest level. τ defaults to 0, 0.05, …, 1."""
    taus = np.linspace(0, 1, 21) if taus is None else taus
    truth = np.stack(ys, 1)
    conf, preds = _confidence(logits)
    curve: dict[str, list[float]] = {"tau": [], "accuracy": [], "specificity": [], "fine_fraction": []}
    for tau in taus:
        level, pred = _deepest(conf, preds, float(tau))
        curve["tau"].append(float(tau))
        curve["accuracy"].append(float((pred == truth[np.arange(len(pred)), level]).mean()))
        curve["specificity"].append(float(((level + 1) / len(ys)).mean()))
        curve["fine_fraction"].append(float((level == len(ys) - 1).mean()))
    return curve


SELECTIVE_TAUS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # a run's fixed points (001's τ 0.5, 0.7 among them)
SELECTIVE_KEYS = ("accuracy", "specificity", "fine_fraction")


def tau_key(tau: float) -> str:
    """A selective point's key: τ in hundredths, "tau70" for 0.7 (no dot, so report.py's dotted
    paths such as `selective.tau70.accuracy` reach it)."""
    return f"tau{round(100 * tau):02d}"


def selective_points(logits: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                     taus: Sequence[float] = SELECTIVE_TAUS) -> dict[str, dict[str, float]]:
    """`selective_curve` at fixed τ, keyed by `tau_key` ("tau70": {accuracy, specificity,
    fine_fraction}): keys, not a list, so each point gets its mean ± std over seeds like every
    metric (metrics.json's `selective`)."""
    curve = selective_curve(logits, ys, taus)
    return {tau_key(tau): {k: curve[k][i] for k in SELECTIVE_KEYS} for i, tau in enumerate(curve["tau"])}


def curve_of_points(points: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """`selective_points` (or metrics.json's `selective` block) back as a curve, τ ascending, for
    `plot_selective_curve`."""
    taus = sorted(points, key=lambda key: int(key.removeprefix("tau")))
    return {"tau": [int(t.removeprefix("tau")) / 100 for t in taus],
            **{k: [points[t][k] for t in taus] for k in SELECTIVE_KEYS}}


def plot_selective_curve(curves: dict[str, dict[str, list[float]]], path: str | Path,
                         title: str = "deepest confident level") -> Path:
    """Accuracy (y) against specificity (x), one line per run, τ annotated at the ends."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for label, c in curves.items():
        ax.plot(c["specificity"], [100 * a for a in c["accuracy"]], marker=".", label=label)
        for i in (0, -1):
            ax.annotate(f"τ={c['tau'][i]:.2f}", (c["specificity"][i], 100 * c["accuracy"][i]), fontsize=7)
    ax.set_xlabel("specificity (mean answered depth / finest)")
    ax.set_ylabel("accuracy at the answered level (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
