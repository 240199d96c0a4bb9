"""The training loop every head uses: a grid of heads trained as one batched model.

Seeds × learning rates × weight decays of one view train in one pass. Their weights are stacked
(`[heads, out, in]`, `stacked_heads.py`) and every layer runs as one grouped matmul over all
heads, with one AdamW (one parameter group per (lr, weight decay) setting). The training matrix
lives on the device in its own dtype (float16 from a view stays float16); each batch is gathered
by a permuted index and cast to float32 on the fly — no per-sample DataLoader, no float32 copy of the matrix.

Each head keeps its own random streams, so a head trained in a grid equals the same head trained
alone: its initial weights come from `torch.manual_seed(seed)`, and one generator seeded with
`seed` draws its batch order and then its dropout masks (for `MASK_STEPS` steps at a time, a
fixed protocol that does not depend on the grid). Heads that share a seed share those draws.

Every epoch, each head's weighted validation F1 is computed on the device and the best epoch's
state kept there (`torch.where`, no host round-trip); the history is read back once at the end.

`balance` (a name in `BALANCES`, Cui et al.'s long-tail study) re-balances every head of the grid
the same way, keeping each head's own random streams: `loss` weights the cross-entropy by class
(`longtail.class_balanced_weights`, normalised as `nn.CrossEntropyLoss(weight=…)` does); `sampler`
draws each head's epoch order class-balanced with its own generator; `logit-adjust` adds the
log prior to the training logits only; `second-stage` trains normally, then resumes from each
head's best state for `SECOND_STAGE_EPOCHS` epochs of balanced batches at lr × `SECOND_STAGE_LR_FACTOR`
(fresh AdamW state). Any balance selects the best epoch by macro F1 — a weighted F1 would reward
the head classes that re-balancing trades away.
On CUDA the full-batch step (forward, backward, fused AdamW) is captured once as a CUDA graph and
replayed: a small head is launch-bound on a GPU otherwise. The CPU keeps the eager step.

`soft_targets` (`soft_targets.SoftTargets`, made by `fgembed distill`) adds knowledge distillation:
each head's per-row loss becomes α·T²·KL(teacher ‖ student) + (1 − α)·cross-entropy, the head of
seed s against seed s's targets, gathered by the same batch indices (no host sync: it is captured
in the CUDA graph like the rest of the step). α = 0 leaves exactly the plain loss.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..cpu import available_cores, torch_threads
from ..errors import FgembedError
from .longtail import (
    SECOND_STAGE_EPOCHS,
    SECOND_STAGE_LR_FACTOR,
    balanced_order,
    class_balanced_weights,
    log_prior,
)
from .soft_targets import SoftTargets
from .stacked_heads import StackedHeads, predict_all

MASK_STEPS = 16           # dropout masks are drawn per seed for this many steps at once
WARMUP_STEPS = 3          # eager steps before the CUDA graph is captured (optimizer state exists)


@dataclass(frozen=True)
class Balance:
    """What one `--balance` mode changes in training (all off = plain cross-entropy)."""

    loss_weights: bool = False
    sampler: bool = False
    logit_adjust: bool = False
    second_stage: bool = False


BALANCES: dict[str, Balance] = {
    "none": Balance(),
    "loss": Balance(loss_weights=True),
    "sampler": Balance(sampler=True),
    "logit-adjust": Balance(logit_adjust=True),
    "second-stage": Balance(second_stage=True),
}


def selection(balance: str) -> str:
    """The validation metric that picks the best epoch and setting under `balance`."""
    return "f1_weighted" if balance == "none" else "f1_macro"


@dataclass
class TrainResult:
    """One head of the grid: its best-epoch state (same keys as the module's `state_dict`)."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_f1: float
    history: list[dict[str, float]] = field(default_factory=list)
    seed: int = 0
    lr: float = 0.0
    weight_decay: float = 0.0


def weighted_f1(y_true: torch.Tensor, pred: torch.Tensor, n_classes: int, average: str = "weighted") -> torch.Tensor:
    """Weighted (or macro) F1 of each row of `pred` [G, N] against `y_true` [N], as a [G] tensor
    on the device: per-class counts by scatter-add (no host sync, no C×C matrix); the same numbers
    as `metrics.f1_torch` / scikit-learn (macro: over classes present in y_true or the prediction,
    as scikit-learn's labels=None does)."""
    G = pred.shape[0]
    offset = torch.arange(G, device=pred.device).unsqueeze(1) * n_classes
    flat_true = (y_true.unsqueeze(0) + offset).reshape(-1)
    count = lambda index, values: torch.zeros(G * n_classes, dtype=torch.float64, device=pred.device).scatter_add_(
        0, index, values).view(G, n_classes)
    ones = torch.ones(flat_true.shape, dtype=torch.float64, device=pred.device)
    tp = count(flat_true, (pred == y_true).reshape(-1).double())
    support = count(flat_true, ones)
    predicted = count((pred + offset).reshape(-1), ones)
    precision, recall = tp / predicted.clamp(min=1), tp / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-300)
    if average == "macro":
        present = ((support > 0) | (predicted > 0)).double()
        return (f1 * present).sum(1) / present.sum(1)
    return (f1 * support).sum(1) / support.sum(1)


class _GraphedStep:
    """The full-batch step captured as one CUDA graph after a few eager warm-up steps, then
    replayed; the batch's indices and dropout masks are copied into static buffers first."""

    def __init__(self, step: Callable, device: torch.device) -> None:
        self.step, self.device, self.graph, self.warm = step, device, None, 0
        self.idx: torch.Tensor | None = None
        self.masks: list[torch.Tensor] = []

    def __call__(self, idx: torch.Tensor, masks: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        if self.idx is None:
            self.idx, self.masks = idx.clone(), [m.clone() for m in masks]
        self.idx.copy_(idx)
        for static, mask in zip(self.masks, masks):
            static.copy_(mask)
        if self.graph is None and self.warm < WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                optimizer.zero_grad(set_to_none=True)
                self.step(self.idx, self.masks)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm += 1
            return
        if self.graph is None:
            optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step(self.idx, self.masks)
        self.graph.replay()


@contextmanager
def tf32_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 tensor cores for the training step's fp32 matmuls on CUDA (restored after). At iNat
    shape (10,000 classes) the output layer makes the step compute-bound: on an H100, TF32 took a
    150-epoch head from 41.5 to 35.4 s and three seeds in one pass from 104 to 49 s (1.39 × one).
    The mantissa it drops (10 bits kept) is below the noise of dropout and minibatch order, but it
    means a head trained in a grid equals the head trained alone to TF32's precision on CUDA, not
    to fp32's (the CPU tests check 1e-5); on the CPU nothing changes."""
    if device.type != "cuda":
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


SMALL_STEP_MACS = 1 << 26  # below this many multiply-adds per step a second CPU thread only waits (benchmarks/threads.py)


@contextmanager
def cpu_threads(device: torch.device, step_macs: int) -> Iterator[None]:
    """On the CPU, train on as many threads as the step is worth: one for a small step (a head of
    a few hundred thousand weights: its kernels are too short to split, and a second thread only
    spins at the barriers — many times slower when another process holds a core), else every
    core this process really has (`cpu.available_cores`: affinity and CPU quota, not the
    machine's count). On a GPU nothing changes."""
    if device.type != "cpu":
        yield
        return
    with torch_threads(1 if step_macs < SMALL_STEP_MACS else available_cores()):
        yield


def train_grid(make_model: Callable[[], nn.Module], X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor,
               y_val: torch.Tensor, n_classes: int, seeds: list[int], lrs: list[float], weight_decays: list[float],
               *, epochs: int, batch_size: int, on_epoch: Callable[[int], None] | None = None,
               cuda_graphs: bool = True, balance: str = "none",
               soft_targets: SoftTargets | None = None) -> list[list[TrainResult]]:
    """Train every (seed, lr, weight decay) as one batched model; results[seed][setting] with
    settings in lr-major order. `X`, `X_val` may be float16 (cast per batch / block);
    `on_epoch(1)` after every epoch (a progress bar's tick; `second-stage` adds
    SECOND_STAGE_EPOCHS epochs); `soft_targets`: one set per seed over the rows of `X`."""
    if balance not in BALANCES:
        raise FgembedError(f"unknown balance {balance!r}; choose from {', '.join(BALANCES)}")
    if soft_targets is not None:
        if balance != "none":
            raise FgembedError("distillation trains on the teacher's targets; it takes no --balance")
        soft_targets.check(len(seeds), X.shape[0], n_classes)
        soft_targets = soft_targets.to(X.device)
    mode = BALANCES[balance]
    average = "weighted" if balance == "none" else "macro"
    device = X.device
    settings = [(lr, wd) for lr in lrs for wd in weight_decays]
    templates = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # caller's RNG untouched
        for seed in seeds:
            torch.manual_seed(seed)
            templates.append(make_model())
    model = StackedHeads(templates, len(settings), device)
    cuda = device.type == "cuda"
    # fused AdamW: one kernel over every tensor (4-6x faster than foreach on a CPU, too)
    optimizer = torch.optim.AdamW(model.param_groups(settings), fused=True, capturable=cuda)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    loss_sum = torch.zeros(model.G, device=device)
    counts = torch.bincount(y, minlength=n_classes).cpu().numpy()
    class_weights = class_balanced_weights(counts).to(device) if mode.loss_weights else None
    offset = log_prior(counts).to(device) if mode.logit_adjust else None

    def step(idx: torch.Tensor, masks: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """idx [S, B]: each seed's batch; masks per dropout layer [S, B, width]."""
        logits = model.forward(X[idx].float(), masks)
        G, B, C = logits.shape
        if offset is not None:
            logits = logits + offset
        targets = y[idx].repeat(model.K, 1).reshape(-1)
        loss = F.cross_entropy(logits.reshape(G * B, C), targets, reduction="none").view(G, B)
        if soft_targets is not None:
            loss = soft_targets.loss(logits, loss, idx)
        if class_weights is None:
            loss = loss.mean(1)
        else:  # CrossEntropyLoss(weight=w)'s mean: Σ w_y·nll / Σ w_y, per head
            w = class_weights[targets].view(G, B)
            loss = (loss * w).sum(1) / w.sum(1)
        loss.sum().backward()
        optimizer.step()
        loss_sum.add_(loss.detach() * B)

    def eager(idx: torch.Tensor, masks: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        step(idx, masks, optimizer)

    def stepper(optimizer: torch.optim.Optimizer) -> Callable:
        return _GraphedStep(lambda idx, masks: step(idx, masks, optimizer), device) if cuda and cuda_graphs else eager

    full_step = stepper(optimizer)
    n, chunk = X.shape[0], MASK_STEPS * batch_size
    history_loss, history_f1 = [], []
    best_f1 = torch.full((model.G,), -1.0, dtype=torch.float64, device=device)
    best_epoch = torch.full((model.G,), -1, dtype=torch.long, device=device)
    best_state = {name: t.clone() for name, t in model.state().items()}
    total = epochs + (SECOND_STAGE_EPOCHS if mode.second_stage else 0)
    with tf32_matmuls(device), cpu_threads(device, model.G * batch_size * model.n_weights):  # the epochs
        for epoch in range(total):
            loss_sum.zero_()
            if epoch == epochs:  # second stage: from each head's best state, balanced, lower lr, fresh AdamW
                model.load(best_state)
                optimizer = torch.optim.AdamW(model.param_groups([(lr * SECOND_STAGE_LR_FACTOR, wd) for lr, wd in settings]),
                                              fused=True, capturable=cuda)
                full_step = stepper(optimizer)
            if mode.sampler or epoch >= epochs:
                order = torch.stack([balanced_order(y, n_classes, g) for g in generators])
            else:
                order = torch.stack([torch.randperm(n, generator=g, device=device) for g in generators])
            for chunk_start in range(0, n, chunk):
                rows = min(chunk, n - chunk_start)
                drawn = [torch.stack([torch.rand(rows, width, generator=g, device=device) for g in generators])
                         .lt_(1 - p).div_(1 - p) for width, p in model.dropout_widths]  # rand < keep: 3x bernoulli_'s speed
                for start in range(chunk_start, chunk_start + rows, batch_size):
                    idx = order[:, start:start + batch_size]
                    if idx.shape[1] < 2:  # BatchNorm cannot train on one sample
                        continue
                    masks = [m[:, start - chunk_start:start - chunk_start + idx.shape[1]] for m in drawn]
                    (full_step if idx.shape[1] == batch_size else eager)(idx, masks, optimizer)
            f1 = weighted_f1(y_val, predict_all(model, X_val), n_classes, average)
            history_loss.append(loss_sum / n)
            history_f1.append(f1)
            improved = f1 > best_f1
            best_f1 = torch.where(improved, f1, best_f1)
            best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
            for name, current in model.state().items():
                keep = improved.view(-1, *[1] * (current.ndim - 1))
                best_state[name] = torch.where(keep, current, best_state[name])
            if on_epoch:
                on_epoch(1)
    return _results(model, seeds, settings, best_state, best_epoch, best_f1, history_loss, history_f1)


def _results(model: StackedHeads, seeds: list[int], settings: list[tuple[float, float]], best_state: dict,
             best_epoch: torch.Tensor, best_f1: torch.Tensor, history_loss: list[torch.Tensor],
             history_f1: list[torch.Tensor]) -> list[list[TrainResult]]:
    """Per seed, per setting: the head's own best state (cloned out of the stack) and history,
    read back to the host once."""
    losses = torch.stack(history_loss).T.tolist() if history_loss else [[] for _ in range(model.G)]
    f1s = torch.stack(history_f1).T.tolist() if history_f1 else [[] for _ in range(model.G)]
    epochs, bests = best_epoch.tolist(), best_f1.tolist()
    out: list[list[TrainResult]] = [[] for _ in seeds]
    for k, (lr, wd) in enumerate(settings):
        for s, seed in enumerate(seeds):
            g = k * model.S + s
            history = [{"epoch": e, "train_loss": loss, "val_f1": f1} for e, (loss, f1) in enumerate(zip(losses[g], f1s[g]))]
            state = {name: t[g].clone(memory_format=torch.contiguous_format) for name, t in best_state.items()}
            out[s].append(TrainResult(state, epochs[g], bests[g],
                                      history, seed, lr, wd))
    return out
