"""Classification metrics. The reference paper's tables use weighted averages (their recall
equals accuracy); macro averages and mean per-class accuracy are reported beside them.

`f1_torch` runs on the device each epoch (model selection by validation F1 without a host
round-trip per batch); `classification_metrics` is the full report, checked against
scikit-learn in the tests.
"""
from __future__ import annotations

import numpy as np
import torch


def _counts(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, ...]:
    """Per class: true positives, support, predicted count. O(N + C), never the C×C confusion
    matrix (10,000 iNat classes would make that 800 MB every epoch)."""
    count = lambda v: torch.bincount(v, minlength=n_classes).double()  # noqa: E731
    return count(y_true[y_true == y_pred]), count(y_true), count(y_pred)


def _prf(counts: tuple[torch.Tensor, ...], average: str) -> tuple[float, float, float]:
    """Precision, recall, F1 from per-class counts.

    Classes absent from both truth and prediction are ignored, as scikit-learn does when given
    only the labels present; a 0/0 ratio counts as 0 (scikit-learn's zero_division=0).
    """
    tp, support, predicted = counts
    present = (support + predicted) > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    if average == "weighted":
        w = support / support.sum()
    else:
        w = present.double() / present.sum()
    return tuple(float((m * w).sum()) for m in (precision, recall, f1))


def f1_torch(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int, average: str = "weighted") -> float:
    return _prf(_counts(y_true, y_pred, n_classes), average)[2]


def top_k_hits(scores: np.ndarray, y_true: np.ndarray, k: int = 5) -> np.ndarray:
    """Rows whose true class is among the k best: fewer than k classes score strictly higher
    (a tie with the k-th place counts as a hit; `torch.topk` breaks it arbitrarily). One
    comparison and a byte count per score: ~20× `torch.topk` on CPU at 10,000 classes."""
    truth = scores[np.arange(len(y_true)), y_true]
    higher = (scores > truth[:, None]).view(np.uint8).sum(1, dtype=np.uint16 if scores.shape[1] < 2 ** 16 else np.int64)
    return higher < k


def _scores(logits) -> np.ndarray:
    """The scores as a numpy array, without a copy where they are on the CPU already: numpy's
    argmax and comparisons run ~15× torch's on CPU at 10,000 classes."""
    return logits.numpy(force=True) if isinstance(logits, torch.Tensor) else np.asarray(logits)


def classification_metrics(logits: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """Flat metric keys: accuracy, precision, recall, f1 (weighted), *_macro, top5,
    mean_class_accuracy."""
    scores, labels = _scores(logits), _scores(y_true).astype(np.int64, copy=False)
    y, pred = torch.from_numpy(labels), torch.from_numpy(scores.argmax(1))
    counts = _counts(y, pred, max(scores.shape[1], int(y.max()) + 1))
    p, r, f = _prf(counts, "weighted")
    pm, rm, fm = _prf(counts, "macro")
    top5 = top_k_hits(scores, labels).mean()
    tp, support = counts[0], counts[1]
    per_class = tp[support > 0] / support[support > 0]
    return {"accuracy": float((pred == y).double().mean()), "precision": p, "recall": r, "f1": f,
            "precision_macro": pm, "recall_macro": rm, "f1_macro": fm, "top5": float(top5),
            "mean_class_accuracy": float(per_class.mean())}


class MetricCounts:
    """`classification_metrics` accumulated over row blocks: per-class counts (O(C) memory), so
    a split of any size — or many fused subsets at once — is scored without holding its logits."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.tp, self.support, self.predicted = (torch.zeros(n_classes, dtype=torch.float64) for _ in range(3))
        self.rows = self.correct = self.top5 = 0

    def update(self, logits: torch.Tensor | np.ndarray, y_true: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Count a block of rows; returns its predicted classes, the first of tied maxima (a caller
        keeping them pays no second argmax)."""
        scores, labels = _scores(logits), _scores(y_true).astype(np.int64, copy=False)
        pred = scores.argmax(1)
        right = pred == labels
        y, one = torch.from_numpy(labels), torch.ones(len(labels), dtype=torch.float64)
        self.support.index_add_(0, y, one)  # O(rows): a block of a few dozen rows costs no O(classes) pass
        self.predicted.index_add_(0, torch.from_numpy(pred), one)
        self.tp.index_add_(0, y[torch.from_numpy(right)], one[:int(right.sum())])
        wrong = ~right  # a right row is a top-5 hit: only the others are ranked
        self.top5 += int(right.sum()) + int(top_k_hits(scores[wrong], labels[wrong]).sum())
        self.correct += int(right.sum())
        self.rows += len(labels)
        return torch.from_numpy(pred)

    def metrics(self) -> dict[str, float]:
        counts = (self.tp, self.support, self.predicted)
        p, r, f = _prf(counts, "weighted")
        pm, rm, fm = _prf(counts, "macro")
        per_class = self.tp[self.support > 0] / self.support[self.support > 0]
        n = max(self.rows, 1)
        return {"accuracy": self.correct / n, "precision": p, "recall": r, "f1": f, "precision_macro": pm,
                "recall_macro": rm, "f1_macro": fm, "top5": self.top5 / n,
                "mean_class_accuracy": float(per_class.mean())}


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds under each metric's own key, and the standard deviation as `<key>_std`."""
    out: dict[str, float] = {}
    for key in per_seed[0]:
        if isinstance(per_seed[0][key], dict):  # nested blocks keep the same flat convention inside
            out[key] = summarise([m[key] for m in per_seed])
            continue
        # None: no value for that seed (an empty shot bin; mistake severity of a seed with no mistake)
        values = np.array([m[key] for m in per_seed if m[key] is not None])
        if not len(values):
            out[key], out[f"{key}_std"] = None, None
            continue
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out
