"""Input-gated late fusion: a small network reads an image's member embeddings and says how much
each member's scores count for that image (a softmax over members), instead of one weight per
member for every image — the gating network of Jacobs, Jordan, Nowlan & Hinton, "Adaptive
Mixtures of Local Experts" (1991), over frozen experts: the member heads are not retrained.

The fusion itself stays `late.combine` (the one late-fusion rule) with per-row weights: a
`[rows, 1]` weight per member broadcasts over the classes, so `logits` mode sums weighted
logits and `proba` mode takes the log of weighted probabilities, exactly as late fusion does.

The gate's input is every member backbone's embedding, each L2-normalised (their scales differ)
and concatenated (`fusion.concat(l2=True)`, in float32). Its last layer starts at zero, so an
untrained gate gives every member the same weight on every image: epoch 0 of its training *is*
late fusion, and selection on held-out validation rows can only keep a gate that beats it there.
`gated.py` trains one gate per seed on validation rows and publishes the run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import FgembedError
from .fusion import concat
from .late import combine, prepare
from .metrics import f1_torch
from .train import cpu_threads

EVAL_ROWS = 1024  # rows per forward when scoring the selection rows: float32 scratch of members × rows × classes


@dataclass(frozen=True)
class GateConfig:
    """How a gate is trained. The optimiser settings are the reference head's recipe (AdamW lr
    1e-3, weight decay 0.01, batch 128, dropout 0.5); `epochs` 0 keeps the untrained gate, equal
    weights on every image (late fusion). All of it is in a gated run's key."""

    hidden: int = 128
    dropout: float = 0.5
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    select_fraction: float = 0.2      # of the validation rows: held out of training, they pick the epoch
    max_elements: int = 2 ** 29       # members' float16 validation logits held for training (1 GiB)

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 0 or self.batch_size < 2 or self.max_elements < 1:
            raise FgembedError(f"a gate needs hidden ≥ 1, epochs ≥ 0, batch size ≥ 2 and max elements ≥ 1; got "
                               f"{self.hidden}, {self.epochs}, {self.batch_size}, {self.max_elements}")
        if not 0 < self.select_fraction < 1 or not 0 <= self.dropout < 1:
            raise FgembedError(f"the gate's select fraction must be in (0, 1) and its dropout in [0, 1); got "
                               f"{self.select_fraction}, {self.dropout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise FgembedError(f"the gate's lr must be > 0 and weight decay ≥ 0; got {self.lr}, {self.weight_decay}")


class Gate(nn.Module):
    """Embeddings [rows, in_dim] → member weights [rows, members] (each row sums to 1)."""

    def __init__(self, in_dim: int, n_members: int, hidden: int = 128, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_members))
        nn.init.zeros_(self.net[-1].weight)  # equal weights until trained: late fusion
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def gate_input(parts: Sequence[np.ndarray]) -> np.ndarray:
    """What a gate reads of some rows: each member backbone's embedding L2-normalised, side by side."""
    return concat([np.asarray(p, np.float32) for p in parts], l2=True)


def gated_combine(prepared: Sequence[torch.Tensor], weights: torch.Tensor, mode: str) -> torch.Tensor:
    """`late.combine` of prepared members with a weight per row and member (`weights` [rows, members])."""
    return combine(prepared, [weights[:, i:i + 1] for i in range(weights.shape[1])], mode)


@dataclass
class GateFit:
    """A trained gate: its kept state (the epoch best on the selection rows), the epoch, and per
    epoch the training loss and the selection rows' loss and weighted F1 (epoch 0: untrained)."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def fit_gate(x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, select: torch.Tensor,
             mode: str, config: GateConfig, seed: int, n_classes: int,
             on_epoch: Callable[[], None] | None = None) -> GateFit:
    """Train a gate on rows `fit` of `x` [rows, in_dim] (float32), `logits` [members, rows, classes]
    (the members' stored float16 scores) and `y`, all on one device; keep the epoch with the best
    weighted F1 on rows `select` (ties: the lower loss, then the earlier epoch — epoch 0 first)."""
    device = x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG untouched
        torch.manual_seed(seed)
        gate = Gate(x.shape[1], logits.shape[0], config.hidden, config.dropout).to(device)
        order = torch.Generator(device=device).manual_seed(seed)
        optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        macs = config.batch_size * (x.shape[1] * config.hidden + logits.shape[0] * n_classes)
        with cpu_threads(device, macs):
            best = (*_score(gate, x, logits, y, select, mode, n_classes), 0)
            history = [{"epoch": 0, "train_loss": None, "select_loss": best[1], "select_f1": best[0]}]
            state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
            for epoch in range(1, config.epochs + 1):
                gate.train()
                total = 0.0
                for batch in fit[torch.randperm(len(fit), generator=order, device=device)].split(config.batch_size):
                    loss = _loss(gate, x[batch], logits[:, batch], y[batch], mode)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                f1, select_loss = _score(gate, x, logits, y, select, mode, n_classes)
                history.append({"epoch": epoch, "train_loss": total / len(fit), "select_loss": select_loss,
                                "select_f1": f1})
                if (f1, -select_loss) > (best[0], -best[1]):
                    best = (f1, select_loss, epoch)
                    state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
                if on_epoch is not None:
                    on_epoch()
    return GateFit({k: v.cpu() for k, v in state.items()}, best[2], history)


def _fused(gate: Gate, x: torch.Tensor, logits: torch.Tensor, mode: str) -> torch.Tensor:
    return gated_combine([prepare(z, mode) for z in logits.float()], gate(x), mode)


def _loss(gate: Gate, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    """Cross-entropy of the fused scores (for `proba`, the negative log of the fused probability)."""
    return F.cross_entropy(_fused(gate, x, logits, mode), y)


@torch.no_grad()
def _score(gate: Gate, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, mode: str,
           n_classes: int) -> tuple[float, float]:
    """(weighted F1, mean loss) of the gated fusion on `rows`, in pieces of EVAL_ROWS."""
    gate.eval()
    preds, loss = [], 0.0
    for piece in rows.split(EVAL_ROWS):
        fused = _fused(gate, x[piece], logits[:, piece], mode)
        loss += float(F.cross_entropy(fused, y[piece], reduction="sum"))
        preds.append(fused.argmax(1))
    return f1_torch(y[rows], torch.cat(preds), n_classes), loss / len(rows)
