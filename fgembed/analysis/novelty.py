"""Open-set novelty scores on cached features, their metrics, and Zusin's open-set table.

Sign convention: every score is HIGHER FOR MORE NOVEL rows, and novel rows are the positives of
every metric (CONVENTIONS), so AUROC > 0.5 means the score ranks novel rows above seen ones.

Scores (registry `SCORES`, timm-style: `create_scorer(name, **params)`, `list_scores(pattern)`):

- from a head's logits: `msp` (−max softmax probability, Zusin's score), `maxlogit` (−max logit),
  `energy` (−T·logsumexp(z/T): the free energy, low on known data);
- from embeddings, fitted on the TRAINING rows: `knn` (distance to the k-th nearest L2-normalised
  training embedding), `mahalanobis` (min over classes of the squared Mahalanobis distance to the
  class mean under one shared covariance), `gmm` (negative log-likelihood under a Gaussian
  mixture). Every scorer has `fit(embeddings, labels)` (a no-op for logit scores) and
  `score(logits=…, embeddings=…)`.

Several runs (a late-fusion ensemble) are scored from their averaged logits or probabilities
(`ensemble_logits`), or by averaging their standardised embedding scores (`fuse_scores`).

Metrics: AUROC, AUPR and the FPR at 95 % TPR (novel = positive: the fraction of seen rows flagged
when 95 % of the novel rows are caught) via scikit-learn. Thresholds calibrated on validation use
SEEN rows only: the threshold that keeps a target fraction of known rows (`calibrate_threshold`).
Per-row scores go to `<dir>/novelty.zarr/[<level>/]<score>` with `rows` (store row ids) and `novel`.

An undefined number — AUROC, AUPR and FPR@95 of a split without novel (or without seen) rows, an
accuracy over zero rows — is NaN in a row and null in JSON / an empty CSV cell / – in a table:
the JSON stays valid (`allow_nan=False`) and says "undefined", not a made-up 0.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from ..classify.blocks import BLOCK_ROWS
from ..classify.fusion import l2_normalise
from ..classify.late import late_fusion
from ..errors import FgembedError
from ..plots import save_figure

MAHALANOBIS_ELEMENTS = 1 << 24             # rows × classes per distance chunk
DEFAULT_TAU = {"coarse": 0.7, "fine": 0.5}   # 001 §4.3: τ_super = 0.7, τ_sub = 0.5 (MSP)


# ---- scores --------------------------------------------------------------------------------
class Scorer:
    """`needs` says which input `score` reads: "logits" or "embeddings"."""

    needs = "logits"

    def fit(self, embeddings: np.ndarray | None = None, labels: np.ndarray | None = None) -> Scorer:
        return self

    def score(self, logits: np.ndarray | None = None, embeddings: np.ndarray | None = None) -> np.ndarray:
        data = logits if self.needs == "logits" else embeddings
        if data is None:
            raise FgembedError(f"the {type(self).__name__} score needs {self.needs}")
        data = torch.as_tensor(np.asarray(data))
        return torch.cat([self._score(data[i:i + BLOCK_ROWS].double())
                          for i in range(0, len(data), BLOCK_ROWS)]).float().numpy()

    def _score(self, block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MSP(Scorer):
    """−max softmax probability (001: novel when max p < τ, i.e. score > −τ)."""

    def _score(self, z: torch.Tensor) -> torch.Tensor:
        return -torch.softmax(z, 1).max(1).values


class MaxLogit(Scorer):
    """−max logit (Hendrycks et al., 2022)."""

    def _score(self, z: torch.Tensor) -> torch.Tensor:
        return -z.max(1).values


class Energy(Scorer):
    """Free energy −T·logsumexp(z/T) (Liu et al., 2020; 001 §6 names it as the next step)."""

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise FgembedError(f"energy temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _score(self, z: torch.Tensor) -> torch.Tensor:
        return -self.temperature * torch.logsumexp(z / self.temperature, 1)


class _EmbeddingScorer(Scorer):
    needs = "embeddings"

    def score(self, logits: np.ndarray | None = None, embeddings: np.ndarray | None = None) -> np.ndarray:
        if not hasattr(self, "n_features_in_"):
            raise FgembedError(f"fit the {type(self).__name__} score on training embeddings first")
        if embeddings is not None and np.asarray(embeddings).shape[1] != self.n_features_in_:
            raise FgembedError(f"embeddings have {np.asarray(embeddings).shape[1]} features; "
                               f"the score was fitted on {self.n_features_in_}")
        return super().score(logits, embeddings)


class KNN(_EmbeddingScorer):
    """Distance to the k-th nearest L2-normalised training embedding (Sun et al., 2022)."""

    def __init__(self, k: int = 10) -> None:
        self.k = k

    def fit(self, embeddings: np.ndarray | None = None, labels: np.ndarray | None = None) -> KNN:
        if self.k < 1 or self.k > len(embeddings):
            raise FgembedError(f"k must be between 1 and the {len(embeddings)} training rows, got {self.k}")
        self.index_ = NearestNeighbors(n_neighbors=self.k).fit(l2_normalise(np.asarray(embeddings, np.float32)))
        self.n_features_in_ = np.asarray(embeddings).shape[1]
        return self

    def _score(self, block: torch.Tensor) -> torch.Tensor:
        dist, _ = self.index_.kneighbors(l2_normalise(block.float().numpy()))
        return torch.as_tensor(dist[:, -1])


class Mahalanobis(_EmbeddingScorer):
    """min over classes of (x−μ_c)ᵀ Σ⁻¹ (x−μ_c), with the class means and one covariance of the
    class-centred training embeddings (Lee et al., 2018). `shrinkage="ledoit-wolf"` (default:
    with fewer rows than dimensions the empirical covariance is singular) or `"empirical"`."""

    def __init__(self, shrinkage: str = "ledoit-wolf") -> None:
        self.shrinkage = shrinkage

    def fit(self, embeddings: np.ndarray | None = None, labels: np.ndarray | None = None) -> Mahalanobis:
        estimators = {"ledoit-wolf": LedoitWolf, "empirical": EmpiricalCovariance}
        if self.shrinkage not in estimators:
            raise FgembedError(f"unknown shrinkage {self.shrinkage!r}; choose one of {', '.join(estimators)}")
        if labels is None:
            raise FgembedError("the mahalanobis score needs the training rows' labels")
        X, y = np.asarray(embeddings, np.float64), np.asarray(labels)
        self.classes_, inverse = np.unique(y, return_inverse=True)
        self.means_ = np.stack([X[inverse == c].mean(0) for c in range(len(self.classes_))])
        self.covariance_ = estimators[self.shrinkage](assume_centered=True).fit(X - self.means_[inverse])
        self.n_features_in_ = X.shape[1]
        return self

    def _score(self, block: torch.Tensor) -> torch.Tensor:
        # (x−μ)ᵀP(x−μ) = xᵀPx − 2xᵀPμ + μᵀPμ for every class at once, in row chunks so that a
        # chunk × classes matrix stays small (10,000 iNat classes)
        P, mu = torch.as_tensor(self.covariance_.precision_), torch.as_tensor(self.means_)
        muP_mu = ((mu @ P) * mu).sum(1)
        step = max(1, MAHALANOBIS_ELEMENTS // len(mu))
        out = []
        for x in block.split(step):
            xP = x @ P
            out.append(((xP * x).sum(1, keepdim=True) - 2 * xP @ mu.T + muP_mu).min(1).values)
        return torch.cat(out)


class GMM(_EmbeddingScorer):
    """Negative log-likelihood under a Gaussian mixture fitted on the training embeddings (001
    §6's density model)."""

    def __init__(self, n_components: int = 8, covariance_type: str = "diag", random_state: int = 0) -> None:
        self.n_components, self.covariance_type, self.random_state = n_components, covariance_type, random_state

    def fit(self, embeddings: np.ndarray | None = None, labels: np.ndarray | None = None) -> GMM:
        if not 1 <= self.n_components <= len(embeddings):
            raise FgembedError(f"gmm components must be between 1 and the {len(embeddings)} training rows")
        self.model_ = GaussianMixture(self.n_components, covariance_type=self.covariance_type,
                                      random_state=self.random_state).fit(np.asarray(embeddings, np.float64))
        self.n_features_in_ = np.asarray(embeddings).shape[1]
        return self

    def _score(self, block: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(-self.model_.score_samples(block.numpy()))


SCORES: dict[str, type[Scorer]] = {"msp": MSP, "maxlogit": MaxLogit, "energy": Energy, "knn": KNN,
                                   "mahalanobis": Mahalanobis, "gmm": GMM}


def list_scores(pattern: str = "*") -> list[str]:
    return sorted(fnmatch.filter(SCORES, pattern))


def create_scorer(name: str, **params) -> Scorer:
    """A scorer by name; `params` go to its constructor (`k` for knn, `temperature` for energy,
    `n_components` for gmm, `shrinkage` for mahalanobis)."""
    if name not in SCORES:
        raise FgembedError(f"unknown novelty score {name!r}; choose from {', '.join(list_scores())}")
    try:
        return SCORES[name](**params)
    except TypeError as error:
        raise FgembedError(f"bad parameters for the {name} score: {error}") from None


def ensemble_logits(logits: Sequence[np.ndarray], mode: str = "logits") -> np.ndarray:
    """Late fusion of several runs before scoring: averaged logits, or log of averaged
    probabilities (`mode="proba"`; then msp is meaningful but energy and maxlogit are not)."""
    return late_fusion(list(logits), mode)


def fuse_scores(scores: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> np.ndarray:
    """Average of several runs' scores, each standardised by its own reference distribution (its
    seen validation rows), so scores of different scales weigh the same."""
    out = [(np.asarray(s, np.float64) - np.mean(r)) / max(float(np.std(r)), 1e-12) for s, r in zip(scores, reference)]
    return np.mean(out, 0).astype(np.float32)


# ---- metrics -------------------------------------------------------------------------------
def detection_metrics(scores: np.ndarray, novel: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """AUROC, AUPR (average precision) and the FPR at `tpr` TPR, novel rows positive."""
    novel = np.asarray(novel, bool)
    if novel.all() or not novel.any():
        raise FgembedError("novelty metrics need both novel and seen rows (hold some classes out)")
    fpr, tpr_curve, _ = roc_curve(novel, scores, drop_intermediate=False)
    return {"auroc": float(roc_auc_score(novel, scores)), "aupr": float(average_precision_score(novel, scores)),
            "fpr95": float(fpr[np.searchsorted(tpr_curve, tpr, side="left")])}


def calibrate_threshold(seen_val_scores: np.ndarray, target_tpr: float = 0.95) -> float:
    """The threshold t that keeps `target_tpr` of the SEEN validation rows as known (score ≤ t);
    a row is flagged novel when its score exceeds t."""
    if not 0 < target_tpr <= 1:
        raise FgembedError(f"target TPR must be in (0, 1], got {target_tpr}")
    return float(np.quantile(np.asarray(seen_val_scores, np.float64), target_tpr, method="higher"))


def open_set_accuracy(pred: np.ndarray, y: np.ndarray, flagged: np.ndarray, novel: np.ndarray) -> dict[str, float]:
    """Zusin's Table 1 at one level (its Algorithm 1, §3.2, and §5): the answer is `novel`
    when flagged, else the argmax. A seen row is right when not flagged and its class is right;
    a novel row is right when flagged. Overall is over all rows (NaN for an empty group)."""
    pred, y, flagged, novel = (np.asarray(a) for a in (pred, y, flagged, novel))
    correct = np.where(novel, flagged, ~flagged & (pred == y))
    mean = lambda m: float(correct[m].mean()) if m.any() else float("nan")
    return {"overall": mean(np.ones_like(novel, bool)), "seen": mean(~novel), "unseen": mean(novel)}


def novel_at_level(y_level: np.ndarray, train_level: np.ndarray) -> np.ndarray:
    """Rows whose class at this level has no training row: with families held out, a row of a
    held-out family whose order is still trained on is novel at family level, seen at order."""
    return ~np.isin(y_level, np.unique(train_level))


def score_row(score: str, level: str, test_scores: np.ndarray, novel: np.ndarray, pred: np.ndarray, y: np.ndarray,
              threshold: float, rule: str) -> dict:
    """One table row: detection metrics and Zusin's accuracies at `threshold` (flagged: score > t).
    Without both novel and seen rows the detection metrics are undefined (NaN), the accuracies kept."""
    novel = np.asarray(novel, bool)
    detection = detection_metrics(test_scores, novel) if novel.any() and not novel.all() else \
        dict.fromkeys(("auroc", "aupr", "fpr95"), math.nan)
    return {"score": score, "level": level, **detection, "threshold": float(threshold),
            "rule": rule, **open_set_accuracy(pred, y, np.asarray(test_scores) > threshold, novel)}


def default_tau(level: int, n_levels: int) -> float:
    """Zusin's MSP thresholds: 0.5 at the finest level, 0.7 at every coarser one."""
    return DEFAULT_TAU["fine"] if level == n_levels - 1 else DEFAULT_TAU["coarse"]


def level_rows(level: str, test_scores: dict[str, np.ndarray], seen_val_scores: dict[str, np.ndarray],
               novel: np.ndarray, pred: np.ndarray, y: np.ndarray, tau: float | None = None,
               target_tpr: float = 0.95) -> list[dict]:
    """The table rows of one level: msp at Zusin's fixed τ (flagged when max p < τ) when `tau` is
    given, and every score at the threshold calibrated on its seen validation rows."""
    rows = []
    if tau is not None and "msp" in test_scores:
        rows.append(score_row("msp", level, test_scores["msp"], novel, pred, y, -tau, f"τ={tau:g}"))
    for name, scores in test_scores.items():
        threshold = calibrate_threshold(seen_val_scores[name], target_tpr)
        rows.append(score_row(name, level, scores, novel, pred, y, threshold, f"val-tpr{target_tpr:g}"))
    return rows


# ---- per-row scores on disk ----------------------------------------------------------------
def write_scores(directory: str | Path, scores: dict[str, np.ndarray], rows: np.ndarray,
                 novel: np.ndarray | None = None, level: str | None = None) -> Path:
    """`<directory>/novelty.zarr/[<level>/]{<score>, rows, novel}`: plain zarr arrays whose last
    axis is the test rows (`[rows]`, or `[seeds, rows]` for a logit score per seed). Writing one
    level replaces that level's arrays and keeps the others."""
    path = Path(directory) / "novelty.zarr"
    for name, values in scores.items():
        if np.shape(values)[-1] != len(rows):
            raise FgembedError(f"score {name} has {np.shape(values)[-1]} rows; expected {len(rows)}")
    root = zarr.open_group(path, mode="a")
    root.attrs["sign"] = "higher is more novel; novel rows are the positives"
    group = root.require_group(level) if level else root
    arrays = {"rows": np.asarray(rows, np.int64), **({"novel": np.asarray(novel, bool)} if novel is not None else {}),
              **{name: np.asarray(values, np.float32) for name, values in scores.items()}}
    for stale in list(group.array_keys()):
        del group[stale]
    for name, data in arrays.items():
        group.create_array(name, data=data)
    return path


def read_scores(directory: str | Path, level: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                           np.ndarray | None]:
    """(scores by name, store rows, novel mask or None) as written by `write_scores`."""
    path = Path(directory) / "novelty.zarr"
    if not (path / "zarr.json").is_file():
        raise FgembedError(f"{directory} has no novelty.zarr (run `fgembed novelty` on it first)")
    root = zarr.open_group(path, mode="r")
    if level and level not in root.group_keys():
        raise FgembedError(f"{path} has no scores for level {level!r}; has: {', '.join(root.group_keys()) or 'none'}")
    group = root[level] if level else root
    names = sorted(set(group.array_keys()) - {"rows", "novel"})
    novel = group["novel"][:] if "novel" in group else None
    return {n: group[n][:] for n in names}, group["rows"][:], novel


# ---- tables and plots ----------------------------------------------------------------------
TABLE_METRICS = (("auroc", "AUROC"), ("aupr", "AUPR"), ("fpr95", "FPR@95"), ("overall", "Overall acc"),
                 ("seen", "Seen acc"), ("unseen", "Unseen acc"))
FORMATS = ("md", "csv", "latex", "json")


def _cell(record: dict, key: str) -> str:
    value = record[key]
    if value is None or not math.isfinite(value):
        return "–"
    std = record.get(f"{key}_std")
    return f"{100 * value:.2f} ± {100 * std:.2f}" if std and math.isfinite(std) else f"{100 * value:.2f}"


def defined(value):
    """`value` with every NaN or infinite number (an undefined metric) replaced by None, numpy
    numbers made plain, at any depth: what JSON can hold (`json.dumps(..., allow_nan=False)`)."""
    if isinstance(value, dict):
        return {k: defined(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [defined(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def format_table(records: list[dict], fmt: str) -> str:
    """Rows from `score_row` (optionally with `<key>_std`) as md / csv / latex / json; numbers in
    percent except json and csv, which keep fractions; undefined numbers are null / empty / –."""
    if fmt not in FORMATS:
        raise FgembedError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(defined(records), indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        keys = list(dict.fromkeys(k for r in records for k in r))
        writer = csv.DictWriter(buffer, keys)
        writer.writeheader()
        writer.writerows(defined(records))
        return buffer.getvalue()
    header = ["Score", "Level", *(title for _, title in TABLE_METRICS), "Threshold"]
    rows = [[r["score"], r["level"], *(_cell(r, k) for k, _ in TABLE_METRICS), f"{r['threshold']:.4g} ({r['rule']})"]
            for r in records]
    if fmt == "latex":
        escape = lambda s: s.replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%").replace("τ", r"$\tau$")
        lines = [r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
                 " & ".join(map(escape, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(escape, row)) + r" \\" for row in rows]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
             title: str = "novelty detection (novel = positive)") -> Path:
    """ROC curves, one per `{label: (scores, novel)}`, AUROC in the legend."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label, (scores, novel) in curves.items():
        fpr, tpr, _ = roc_curve(np.asarray(novel, bool), scores)
        ax.plot(fpr, tpr, label=f"{label} (AUROC {100 * roc_auc_score(novel, scores):.1f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (seen rows flagged)")
    ax.set_ylabel("true positive rate (novel rows flagged)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
