"""Late fusion: the members' class scores from separately trained heads, averaged — the one rule
every caller uses (`fgembed ensemble`'s streamed scoring, `fgembed predict`, novelty of an
ensemble, fitting the members' weights on validation rows).

Two steps, so that a streamed scorer prepares each member's block once and combines it into
many subsets: `prepare` (the scores a member contributes: its logits, or its softmax
probabilities with `mode="proba"`) and `combine` (their weighted sum; for `proba` the log of
the averaged probabilities, so top-5 and argmax read logits and probabilities alike).
`late_fusion` is both at once. Scores are float32 torch tensors; float16 inputs are widened
block by block by the caller's blocks. `running_combine` scores many equal-weight subsets of the
same prepared members, each from the previous one's sum plus or minus one member.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import FgembedError

LATE_MODES = ("logits", "proba")


def check_mode(mode: str) -> None:
    if mode not in LATE_MODES:
        raise FgembedError(f"late fusion mode must be logits or proba, got {mode!r}")


def prepare(scores, mode: str) -> torch.Tensor:
    """One member's contribution: float32 logits, or softmax probabilities for `proba`."""
    z = scores.float() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    return torch.softmax(z, dim=-1) if mode == "proba" else z


def combine(prepared: Sequence[torch.Tensor], weights=None, mode: str = "logits") -> torch.Tensor:
    """The weighted sum of prepared members (equal weights when None; a weight tensor keeps its
    gradient, as `fit_late_weights` needs); for `proba`, its log."""
    w = [1 / len(prepared)] * len(prepared) if weights is None else list(weights)
    fused = None
    for wi, part in zip(w, prepared, strict=True):
        term = part * wi
        fused = term if fused is None else fused + term
    return fused.clamp_min(1e-30).log() if mode == "proba" else fused


def gray_order(subsets: Sequence[tuple[int, ...]]) -> list[int]:
    """Indices of `subsets` (member indices) in binary-reflected Gray-code order: all subsets of
    n members in this order step from one to the next by adding or removing one member."""
    def rank(subset: tuple[int, ...]) -> int:
        code = sum(1 << m for m in set(subset))
        position, shift = code, 1
        while code >> shift:  # the inverse of i ^ (i >> 1)
            position ^= code >> shift
            shift += 1
        return position
    return sorted(range(len(subsets)), key=lambda i: rank(subsets[i]))


def running_combine(prepared: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
                    subsets: Sequence[tuple[int, ...]], mode: str = "logits",
                    ranks_only: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """(index into `subsets`, `combine` of its members with equal weights) for every subset, in
    `gray_order`: one running float32 sum over the members, each subset reached from the previous
    one by adding and subtracting the members they differ in, or summed afresh where that is
    fewer operations (the subsets given need not be all). `ranks_only` yields the sum itself,
    which orders every row's classes as `combine` does (argmax, top-k) at no extra pass. What is
    yielded is a buffer reused by the next step: use it before advancing."""
    check_mode(mode)
    total, held = None, set()
    for i in gray_order(subsets):
        members = set(subsets[i])
        add, remove = sorted(members - held), sorted(held - members)
        if total is None or len(add) + len(remove) >= len(members):
            first, *add = sorted(members)
            remove = []
            total = prepared[first].clone() if total is None else total.copy_(prepared[first])
        for m in add:
            total.add_(prepared[m])
        for m in remove:
            total.sub_(prepared[m])
        held = members
        if ranks_only:
            yield i, total
        else:
            fused = total * (1 / len(members))
            yield i, fused.clamp_min_(1e-30).log_() if mode == "proba" else fused


def late_fusion(scores: Sequence, mode: str = "logits", weights: Sequence[float] | None = None) -> np.ndarray:
    """`combine(prepare(...))` of whole member score matrices over the same rows and classes."""
    check_mode(mode)
    shapes = {tuple(np.shape(z)) for z in scores}
    if len(shapes) != 1:
        raise FgembedError(f"late fusion needs logits over the same rows and classes; got shapes {sorted(shapes)}")
    return combine([prepare(z, mode) for z in scores], weights, mode).numpy()


def fit_late_weights(val_scores: Sequence, y_val: np.ndarray, mode: str = "logits", steps: int = 100) -> np.ndarray:
    """Member weights on the simplex minimising the fused cross-entropy on validation rows (a
    softmax parametrisation optimised with L-BFGS; the test rows are never seen). Callers pass a
    bounded sample of rows: the stack is members × rows × classes in float32."""
    check_mode(mode)
    stack = torch.stack([prepare(z, mode) for z in val_scores])
    y = torch.as_tensor(y_val, dtype=torch.long)
    theta = torch.zeros(len(val_scores), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(combine(list(stack), torch.softmax(theta, 0), mode), y)
        value.backward()
        return value

    optimizer.step(loss)
    return torch.softmax(theta.detach(), 0).double().numpy()
