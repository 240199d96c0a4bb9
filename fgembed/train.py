"""The training loop every head uses.

The whole training matrix lives on the device and batches are slices of a permuted index — no
per-sample DataLoader. Several seeds of one head share that device data and train in the same
pass over epochs; each keeps the epoch with its best validation F1 (weighted), as the reference
recipe does (no early stopping).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .metrics import f1_torch


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_f1: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_heads(make_model: Callable[[], nn.Module], X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor,
                y_val: torch.Tensor, n_classes: int, seeds: list[int], *, epochs: int, lr: float,
                weight_decay: float, batch_size: int,
                on_epoch: Callable[[int], None] | None = None) -> list[TrainResult]:
    """Train one model per seed (same architecture, same device-resident data); `on_epoch(n)` is
    called after each epoch of all seeds (a progress bar's tick)."""
    device = X.device
    cuda = [device] if device.type == "cuda" else []
    models, optimizers, generators, rng_states = [], [], [], []
    with torch.random.fork_rng(devices=cuda):  # leave the caller's global RNG as it was
        for seed in seeds:
            torch.manual_seed(seed)
            model = make_model().to(device)
            models.append(model)
            optimizers.append(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay))
            generators.append(torch.Generator(device=device).manual_seed(seed))
            rng_states.append(_rng_state(device))
    results = [TrainResult({}, -1, -1.0) for _ in seeds]
    loss_fn = nn.CrossEntropyLoss()
    n = X.shape[0]
    for epoch in range(epochs):
        for k, (model, optimizer, generator, result) in enumerate(zip(models, optimizers, generators, results)):
            with torch.random.fork_rng(devices=cuda):  # each seed owns its dropout stream,
                _set_rng_state(device, rng_states[k])  # so seeds in one pass equal seeds alone
                total = _epoch(model, optimizer, generator, loss_fn, X, y, batch_size)
                rng_states[k] = _rng_state(device)
            model.eval()
            with torch.no_grad():
                val_f1 = f1_torch(y_val, model(X_val).argmax(1), n_classes)
            result.history.append({"epoch": epoch, "train_loss": float(total) / n, "val_f1": val_f1})
            if val_f1 > result.best_val_f1:
                result.best_val_f1, result.best_epoch = val_f1, epoch
                result.state_dict = {name: v.detach().clone() for name, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(1)
    return results


def _epoch(model: nn.Module, optimizer, generator: torch.Generator, loss_fn, X: torch.Tensor, y: torch.Tensor,
           batch_size: int) -> torch.Tensor:
    """One pass over a fresh permutation, batches sliced from the device-resident matrix."""
    model.train()
    order = torch.randperm(X.shape[0], device=X.device, generator=generator)
    total = torch.zeros((), device=X.device)
    for start in range(0, X.shape[0], batch_size):
        idx = order[start:start + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on one sample
            continue
        loss = loss_fn(model(X[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
    return total


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
