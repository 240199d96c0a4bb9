"""Metrics and consistent decoding of multi-level predictions, against a coarse → fine taxonomy.

Everything here reads logits or predictions per level (coarse → fine), never a model, so a run's
stored logits and a late fusion of several runs are scored alike: per-level classification
metrics and their mean ("avg acc"); the consistency rate (the predicted fine class's
ancestors are the predicted coarser classes); two consistent decoders (top-down, and the product
of level probabilities along each root-to-leaf path); mistake severity (mean depth of the lowest
common ancestor over mistakes, root at depth 0 — higher means the mistakes stay in a closer
group); and the selective "deepest confident level" prediction with its accuracy-versus-
specificity curve (the "flamingo or bird" question of Chang et al., "Your 'Flamingo' is My
'Bird': Fine-Grained, or Not"). Row-level pieces (`consistent_rows`, `lca_depth`) let a streamed
scorer sum them block by block: `DecodedCounts` and `HierarchyScores` accumulate every metric of a
multi-level run over row blocks, so a run's test logits are scored as they are written.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FgembedError
from ..plots import save_figure
from .blocks import BLOCK_ROWS
from .metrics import MetricCounts, _counts, _prf, classification_metrics, f1_torch

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


# ---- metrics and consistent decoding -------------------------------------------------------
def level_metrics(logits: Sequence[np.ndarray], ys: Sequence[np.ndarray], order: Sequence[str]) -> dict:
    """`{"levels": {<level>: classification_metrics}, "avg_accuracy": mean accuracy over levels}`
    for one seed; `runs.summarise`, applied at every depth, gives the mean ± std over seeds."""
    per_level = {name: classification_metrics(z, y) for name, z, y in zip(order, logits, ys)}
    return {"levels": per_level, "avg_accuracy": float(np.mean([m["accuracy"] for m in per_level.values()]))}


def consistent_rows(preds: Sequence[np.ndarray], taxonomy: Taxonomy) -> np.ndarray:
    """Per row: whether the predicted fine class has exactly the predicted coarser classes as its
    ancestors (a streamed scorer sums these block by block)."""
    fine = np.asarray(preds[-1])
    ok = np.ones(len(fine), bool)
    for name, pred in zip(taxonomy.order[:-1], preds[:-1]):
        ok &= taxonomy.ancestors(fine, name) == np.asarray(pred)
    return ok


def consistency_rate(preds: Sequence[np.ndarray], taxonomy: Taxonomy) -> float:
    """Fraction of rows whose predictions are consistent (`consistent_rows`)."""
    return float(consistent_rows(preds, taxonomy).mean())


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


SELECTIVE_TAUS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # a run's fixed points (Zusin et al.'s τ 0.5, 0.7 among them)
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


# ---- streamed over row blocks ----------------------------------------------------------------
class DecodedCounts:
    """`decoded_metrics` of per-level predictions accumulated over row blocks: per-level class
    counts, consistent rows, and the LCA depths of the fine mistakes. O(classes) memory."""

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        self.counts = [[torch.zeros(taxonomy.n_classes[name], dtype=torch.float64) for _ in range(3)]
                       for name in taxonomy.order]
        self.correct = [0] * len(taxonomy.order)
        self.rows = self.consistent = self.mistakes = self.lca_sum = 0

    def update(self, preds: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> None:
        for k, (name, pred, y) in enumerate(zip(self.taxonomy.order, preds, ys)):
            p_t, y_t = torch.as_tensor(np.asarray(pred), dtype=torch.long), torch.as_tensor(np.asarray(y), dtype=torch.long)
            for total, part in zip(self.counts[k], _counts(y_t, p_t, self.taxonomy.n_classes[name])):
                total += part
            self.correct[k] += int((p_t == y_t).sum())
        fine, truth = np.asarray(preds[-1]), np.asarray(ys[-1])
        wrong = fine != truth
        self.rows += len(fine)
        self.consistent += int(consistent_rows(preds, self.taxonomy).sum())
        self.mistakes += int(wrong.sum())
        self.lca_sum += int(lca_depth(fine[wrong], truth[wrong], self.taxonomy).sum())

    def metrics(self) -> dict:
        """As `decoded_metrics` gives them for the same rows at once."""
        n = max(self.rows, 1)
        levels = {}
        for k, name in enumerate(self.taxonomy.order):
            levels[name] = {"accuracy": self.correct[k] / n, "f1": _prf(tuple(self.counts[k]), "weighted")[2],
                            "f1_macro": _prf(tuple(self.counts[k]), "macro")[2]}
        return levels[self.taxonomy.fine] | {
            "levels": levels, "avg_accuracy": float(np.mean([m["accuracy"] for m in levels.values()])),
            "consistency": self.consistent / n,
            "mistake_severity": self.lca_sum / self.mistakes if self.mistakes else None}


class HierarchyScores:
    """One seed's metrics of a multi-level run, from its logits per level (coarse → fine) given
    block by block: per-level classification metrics and their mean, consistency and mistake
    severity of the argmax, every consistent decoder's metrics (`DECODERS`), and the selective
    points (`SELECTIVE_TAUS`) — what `level_metrics`, `decoded_metrics` and `selective_points`
    give on all the rows at once, without holding them."""

    def __init__(self, taxonomy: Taxonomy, taus: Sequence[float] = SELECTIVE_TAUS) -> None:
        self.taxonomy, self.taus = taxonomy, tuple(taus)
        self.logits = [MetricCounts(taxonomy.n_classes[name]) for name in taxonomy.order]
        self.argmax = DecodedCounts(taxonomy)
        self.decoders = {name: DecodedCounts(taxonomy) for name in DECODERS}
        self.selective = np.zeros((len(self.taus), 3))  # per τ: sums of right, depth fraction, at the finest
        self.rows = 0

    def update(self, logits: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> None:
        z = [torch.as_tensor(np.asarray(b), dtype=torch.float32) for b in logits]
        for counts, zk, y in zip(self.logits, z, ys):
            counts.update(zk, y)
        self.argmax.update([zk.argmax(1).numpy() for zk in z], ys)
        for name, decode in DECODERS.items():
            self.decoders[name].update(decode(logits, self.taxonomy), ys)
        truth = np.stack([np.asarray(y) for y in ys], 1)
        conf, preds = _confidence(logits)
        for i, tau in enumerate(self.taus):
            level, pred = _deepest(conf, preds, float(tau))
            self.selective[i] += ((pred == truth[np.arange(len(pred)), level]).sum(),
                                  ((level + 1) / len(ys)).sum(), (level == len(ys) - 1).sum())
        self.rows += len(truth)

    def metrics(self) -> dict:
        per_level = [c.metrics() for c in self.logits]
        argmax = self.argmax.metrics()
        selective = self.selective / max(self.rows, 1)
        return per_level[-1] | {
            "levels": dict(zip(self.taxonomy.order, per_level)),
            "avg_accuracy": float(np.mean([m["accuracy"] for m in per_level])),
            "consistency": argmax["consistency"], "mistake_severity": argmax["mistake_severity"],
            "decoder": {name: d.metrics() for name, d in self.decoders.items()},
            "selective": {tau_key(tau): dict(zip(SELECTIVE_KEYS, map(float, row)))
                          for tau, row in zip(self.taus, selective)}}

