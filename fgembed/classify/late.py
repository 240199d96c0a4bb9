"""Late fusion: the members' class scores from separately trained heads, averaged — the one rule
every caller uses (`fgembed ensemble`'s streamed scoring, `fgembed predict`, novelty of an
ensemble, fitting the members' weights on validation rows).

Two steps, so that a streamed scorer prepares each member's block once and combines it into
many subsets: `prepare` (the scores a member contributes: its logits, or its softmax
probabilities with `mode="proba"`) and `combine` (their weighted sum; for `proba` the log of
the averaged probabilities, so top-5 and argmax read logits and probabilities alike).
`late_fusion` is both at once. Scores are float32 torch tensors; float16 inputs are widened
block by block by the caller's blocks. `running_combine` sums many equal-weight subsets of the
same prepared members, each from an earlier one's sum plus one member.
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


def prepare(scores, mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """One member's contribution: float32 logits, or softmax probabilities for `proba`; written
    into `out` (float32, the scores' shape) when given: a streamed scorer reuses its buffers, as
    fresh ones per block of rows start cold in cache and fragment the heap."""
    if out is not None:
        z = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
        return torch.softmax(z, -1, dtype=torch.float32, out=out) if mode == "proba" else out.copy_(z)
    z = scores.float() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    return torch.softmax(z, dim=-1) if mode == "proba" else z


def combine(prepared: Sequence[torch.Tensor], weights=None, mode: str = "logits",
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum of prepared members (equal weights when None; a weight tensor keeps its
    gradient, as `fit_late_weights` needs); for `proba`, its log. With `out` (a buffer that is
    none of the members; weights as numbers) it is summed there in place."""
    w = [1 / len(prepared)] * len(prepared) if weights is None else list(weights)
    if out is not None:
        torch.mul(prepared[0], float(w[0]), out=out)
        for wi, part in zip(w[1:], prepared[1:], strict=True):
            out.add_(part, alpha=float(wi))
        return out.clamp_min_(1e-30).log_() if mode == "proba" else out
    fused = None
    for wi, part in zip(w, prepared, strict=True):
        term = part * wi
        fused = term if fused is None else fused + term
    return fused.clamp_min(1e-30).log() if mode == "proba" else fused


def running_combine(prepared: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
                    subsets: Sequence[tuple[int, ...]], mode: str = "logits", ranks_only: bool = False,
                    scratch: list[torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index into `subsets`, `combine` of its members with equal weights) for every subset, each
    sum one addition away from an earlier one: the subsets (any order, any selection) are walked
    as a trie of their sorted members, a node's sum its parent's plus one member (the 26 subsets
    of two or more of five members: 26 additions; summed afresh, 49). Nothing is subtracted, as a
    Gray-code walk would: removing a term near 1 (a softmax) or a masked logit leaves float32
    error in the small scores that rank the top 5; each sum here is exactly the fresh float32 sum
    in member order. `ranks_only` yields that sum, which orders each row's classes as `combine`
    does (argmax, top-k) without a pass to scale it. A yielded tensor is a buffer that later
    steps overwrite, or a member's own scores: read it, do not keep or modify it. `scratch`, a
    list kept by the caller, lends the sums' buffers from one call to the next."""
    check_mode(mode)
    order = sorted(range(len(subsets)), key=lambda i: sorted(set(subsets[i])))
    path: list[int] = []           # members of the trie node whose sums `stack` holds, per depth
    stack: list[torch.Tensor] = []
    buffers = [] if scratch is None else scratch  # one per depth beyond the first
    for i in order:
        members = sorted(set(subsets[i]))
        shared = 0  # the trie node shared with the previous subset: its sums are kept
        while shared < min(len(path), len(members)) and path[shared] == members[shared]:
            shared += 1
        del path[shared:], stack[shared:]
        for m in members[shared:]:
            if not stack:
                total = prepared[m]    # a single member's sum is its own scores: no copy
            else:
                total = torch.add(stack[-1], prepared[m], out=reuse_buffer(buffers, len(stack) - 1, prepared[m]))
            path.append(m)
            stack.append(total)
        total = stack[-1]
        if ranks_only:
            yield i, total
        else:
            fused = total * (1 / len(members))
            yield i, fused.clamp_min_(1e-30).log_() if mode == "proba" else fused


def reuse_buffer(buffers: list[torch.Tensor], depth: int, like: torch.Tensor) -> torch.Tensor:
    """buffers[depth] as a buffer of `like`'s shape (its first rows), made or grown where it is
    missing or too small: streamed callers keep their scratch from one block of rows to the next."""
    if depth == len(buffers):
        buffers.append(torch.empty_like(like))
    elif buffers[depth].shape[1:] != like.shape[1:] or len(buffers[depth]) < len(like):
        buffers[depth] = torch.empty_like(like)
    return buffers[depth][:len(like)]


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
