"""A teacher's soft targets in bounded memory, and the distillation loss the training loop adds.

Knowledge distillation as Hinton, Vinyals & Dean define it ("Distilling the Knowledge in a Neural
Network"): the student's softmax at temperature T is fitted to the teacher's at the same T,
mixed with the ordinary cross-entropy on the labels,

    loss = α · T² · KL(p_T ‖ q_T) + (1 − α) · CE(q, y),

where T² keeps the soft term's gradients on the scale of the hard one's as T changes (their
section 2). Dense targets do not fit at iNat shape (400k training rows × 10,000 classes is 16 GB
of float32), so each row keeps the teacher's `k` most probable classes (int32 ids and float16
probabilities) and the residual mass r = 1 − Σ_top p, which the target spreads uniformly over
the other allowed classes (those no run of the teacher or the student masks). Against that
target the cross-entropy is exact and costs one gather and one row sum of the student's log-probs:

    Σ_top p_j log q_j + r / (C' − k) · (Σ_allowed log q − Σ_top log q),     C' = allowed classes,

and the target's own Σ p log p is kept per row, so the loss is a true KL (≥ 0, zero when the
student matches the target). With k ≥ C' nothing is approximated: the loss is the dense KL (to
the float16 rounding of the probabilities). The targets are per teacher seed: the student's
seed s learns from seed s of the teacher (`fgembed distill`), so seeds stay independent replicates.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import FgembedError

TEMPERATURE = 4.0   # Hinton et al. found 2.5–4 best for their smaller students (higher ones for larger); 4 is usual
KD_ALPHA = 0.9      # weight of the soft term: they did best with a much lower weight on the labels' term
KD_TOP_K = 64       # teacher classes kept per row: exact up to 64 classes, a bounded tail beyond


@dataclass
class SoftTargets:
    """Per teacher seed and training row (in the order of the training matrix): the top-k class
    ids and probabilities at `temperature`, the residual mass, and Σ p log p of the target."""

    indices: torch.Tensor        # [S, N, k] int32
    probs: torch.Tensor          # [S, N, k] float16
    residual: torch.Tensor       # [S, N] float32: 1 − Σ probs, spread over `spread` other classes
    neg_entropy: torch.Tensor    # [S, N] float32: Σ p log p of the whole target
    allowed: torch.Tensor | None  # [C] bool: the classes a target may give mass to (None: all)
    spread: int                  # allowed classes outside the top k (0: the target is exact)
    temperature: float
    alpha: float
    record: dict = field(default_factory=dict)  # what the run's config.json says of its teacher

    @property
    def n_seeds(self) -> int:
        return int(self.indices.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.indices.shape[1])

    def to(self, device: torch.device) -> SoftTargets:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, indices=move(self.indices), probs=move(self.probs), residual=move(self.residual),
                       neg_entropy=move(self.neg_entropy), allowed=move(self.allowed))

    def check(self, n_seeds: int, n_rows: int, n_classes: int) -> None:
        """Refuse targets made for another grid or another training matrix."""
        if (self.n_seeds, self.n_rows) != (n_seeds, n_rows):
            raise FgembedError(f"soft targets for {self.n_seeds} seeds × {self.n_rows} rows; training has "
                               f"{n_seeds} seeds × {n_rows} rows")
        if self.allowed is not None and len(self.allowed) != n_classes:
            raise FgembedError(f"soft targets over {len(self.allowed)} classes; the head has {n_classes}")

    def loss(self, logits: torch.Tensor, cross_entropy: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per head and row [G, B]: α·T²·KL + (1 − α)·`cross_entropy`, for the grid's logits
        [G, B, C] (head g = k·S + s, as `StackedHeads` orders them) of the rows `idx` [S, B]."""
        S, B = idx.shape
        repeat = logits.shape[0] // S  # the lr × weight-decay settings
        seed = torch.arange(S, device=idx.device).unsqueeze(1)
        take = lambda t: t[seed, idx].repeat(repeat, *[1] * (t.ndim - 1))  # noqa: E731  [G, B, …]
        log_q = torch.log_softmax(logits / self.temperature, dim=2)
        on_top = log_q.gather(2, take(self.indices).long())
        cross = (take(self.probs).float() * on_top).sum(2)
        if self.spread:
            row_sum = log_q.sum(2) if self.allowed is None else (log_q * self.allowed).sum(2)
            cross = cross + take(self.residual) / self.spread * (row_sum - on_top.sum(2))
        kl = take(self.neg_entropy) - cross
        return self.alpha * self.temperature ** 2 * kl + (1 - self.alpha) * cross_entropy


class TargetBuilder:
    """Soft targets filled block by block from the teacher's fused scores (logits, or log-probs
    of averaged probabilities: the late-fusion rule's output), so no dense target ever exists."""

    def __init__(self, n_seeds: int, n_rows: int, n_classes: int, top_k: int, temperature: float,
                 excluded: np.ndarray | None = None) -> None:
        allowed = np.ones(n_classes, bool)
        if excluded is not None and len(excluded):
            allowed[np.asarray(excluded, np.int64)] = False
        if not allowed.any():
            raise FgembedError("every class is masked: the teacher has no class to teach")
        self.n_seeds, self.n_classes = n_seeds, n_classes
        self.k = min(int(top_k), int(allowed.sum()))
        self.spread = int(allowed.sum()) - self.k
        self.temperature = float(temperature)
        self.allowed = None if allowed.all() else torch.from_numpy(allowed)
        self.indices = torch.zeros((n_seeds, n_rows, self.k), dtype=torch.int32)
        self.probs = torch.zeros((n_seeds, n_rows, self.k), dtype=torch.float16)
        self.residual = torch.zeros((n_seeds, n_rows), dtype=torch.float32)
        self.neg_entropy = torch.zeros((n_seeds, n_rows), dtype=torch.float32)
        self.finite = np.ones(n_rows, bool)

    def add(self, positions: slice, scores: torch.Tensor) -> None:
        """The targets of rows `positions` from the teacher's scores [S, rows, C] (any device)."""
        z = scores.float() / self.temperature
        if self.allowed is not None:
            z = z.masked_fill(~self.allowed.to(z.device), float("-inf"))
        top = torch.log_softmax(z, dim=2).topk(self.k, dim=2)
        p = top.values.exp().half()
        pf = p.float()
        residual = (1 - pf.sum(2)).clamp_min(0)
        neg_entropy = torch.xlogy(pf, pf).sum(2)
        if self.spread:
            neg_entropy += torch.xlogy(residual, residual / self.spread)
        self.indices[:, positions] = top.indices.int().cpu()
        self.probs[:, positions] = p.cpu()
        self.residual[:, positions] = residual.cpu()
        self.neg_entropy[:, positions] = neg_entropy.cpu()
        self.finite[positions] = torch.isfinite(scores).all(2).all(0).cpu().numpy()

    def finish(self, alpha: float, keep: np.ndarray | None = None, record: dict | None = None) -> SoftTargets:
        """The targets (of the rows `keep` marks, all by default), mixed with weight `alpha`."""
        rows = torch.from_numpy(np.flatnonzero(keep)) if keep is not None and not keep.all() else slice(None)
        return SoftTargets(self.indices[:, rows], self.probs[:, rows], self.residual[:, rows],
                           self.neg_entropy[:, rows], self.allowed, self.spread, self.temperature, float(alpha),
                           dict(record or {}))
