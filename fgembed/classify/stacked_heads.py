"""A grid of heads of one architecture as one batched model (what `train.train_grid` trains).

G = settings × seeds copies are held as stacked tensors and every layer runs once for all of
them: a Linear as one grouped matmul, a BatchNorm as one BatchNorm over every (head, channel)
pair, a Dropout with each seed's own masks. The module is read as a flat list of the operations
it is made of (`batchable_ops`), so any head built of those layers (and fusion's `SumProjection`)
trains batched without a line of its own.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import BLOCK_ROWS
from .fusion import SumProjection

VAL_ELEMENTS = 1 << 24    # activations per validation block (heads × rows × widest layer): 64 MiB of float32


def batchable_ops(module: nn.Module, prefix: str = "") -> list[tuple]:
    """The module as a flat list of batchable operations, named by their state-dict prefixes."""
    if isinstance(module, nn.Sequential):
        return [op for i, child in enumerate(module) for op in batchable_ops(child, f"{prefix}{i}.")]
    if isinstance(module, nn.Linear):
        return [("linear", prefix)]
    if isinstance(module, nn.ReLU):
        return [("relu",)]
    if isinstance(module, nn.BatchNorm1d) and module.momentum is not None and module.track_running_stats:
        return [("batchnorm", prefix, module.momentum, module.eps)]
    if isinstance(module, nn.Dropout):
        return [("dropout", module.p)]
    if isinstance(module, SumProjection):
        return [("sum", [f"{prefix}projections.{i}." for i in range(len(module.blocks))], list(module.blocks))]
    raise TypeError(f"train_grid cannot batch a {type(module).__name__}")


class StackedHeads:
    """G = settings × seeds copies of one architecture as stacked tensors; head g = k·S + s.

    Parameters are leaves per setting k (`[S, ...]`, so AdamW can give each setting its own lr and
    weight decay); buffers (BatchNorm running statistics) are `[G, ...]`. Linear weights are kept
    as `[in, out]` per head, so the grouped matmul's weight gradient comes out contiguous (the
    `[out, in]` layout made autograd copy every gradient); `state()` gives torch's layout back.
    """

    def __init__(self, templates: list[nn.Module], n_settings: int, device: torch.device) -> None:
        self.ops = batchable_ops(templates[0])
        self.S, self.K = len(templates), n_settings
        self.G = self.S * self.K
        states = [t.state_dict() for t in templates]
        trainable = {name for name, _ in templates[0].named_parameters()}
        linear = {op[1] + "weight" for op in self.ops if op[0] == "linear"}
        linear |= {prefix + "weight" for op in self.ops if op[0] == "sum" for prefix in op[1]}
        self.transposed = linear
        self.params: dict[str, list[torch.Tensor]] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for name in states[0]:
            stacked = torch.stack([state[name] for state in states]).to(device)
            if name in linear:
                stacked = stacked.transpose(1, 2).contiguous()
            if name in trainable:
                self.params[name] = [stacked.clone().requires_grad_() for _ in range(n_settings)]
            else:
                self.buffers[name] = stacked.repeat(n_settings, *[1] * (stacked.ndim - 1)).contiguous()
        self.dropout_widths = self._dropout_widths()
        self.n_weights = sum(p.numel() for p in templates[0].parameters())  # of one head

    def _dropout_widths(self) -> list[tuple[int, float]]:
        """(width, p) of each dropout layer, read from the layer before it."""
        width, out = None, []
        for op in self.ops:
            if op[0] == "linear":
                width = self.params[op[1] + "weight"][0].shape[2]
            elif op[0] == "sum":
                width = self.params[op[1][0] + "weight"][0].shape[2]
            elif op[0] == "dropout" and op[1] > 0:
                out.append((width, op[1]))
        return out

    def param_groups(self, settings: list[tuple[float, float]]) -> list[dict]:
        return [{"params": [p[k] for p in self.params.values()], "lr": lr, "weight_decay": wd}
                for k, (lr, wd) in enumerate(settings)]

    def stacked(self, name: str) -> torch.Tensor:
        parts = self.params[name]
        return parts[0] if self.K == 1 else torch.cat(parts)

    def _linear(self, prefix: str, h: torch.Tensor) -> torch.Tensor:
        W = self.stacked(prefix + "weight")
        b = self.stacked(prefix + "bias") if prefix + "bias" in self.params else None
        if h.shape[0] == self.G:  # one input per head: a grouped matmul
            out = torch.bmm(h, W)
        else:  # the input stage: one input per seed ([S, B, d]) or one for all ([1, B, d])
            out = torch.matmul(h.unsqueeze(0), W.view(self.K, self.S, *W.shape[1:]))
            out = out.reshape(self.G, h.shape[1], W.shape[2])
        return out if b is None else out + b.unsqueeze(1)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
        """x: [S, B, d] (one batch per seed) or [1, B, d] (shared rows); masks: per dropout layer
        `[S, B, width]` (train mode) or None (eval mode). Returns logits [G, B, C]."""
        h, train, dropout = x, masks is not None, iter(masks or [])
        for op in self.ops:
            kind = op[0]
            if kind == "linear":
                h = self._linear(op[1], h)
            elif kind == "sum":
                parts = torch.split(h, op[2], dim=2)
                h = torch.stack([self._linear(prefix, part) for prefix, part in zip(op[1], parts)]).sum(0)
            elif kind == "relu":
                h = torch.relu(h)
            elif kind == "batchnorm":  # every (head, channel) pair is one BatchNorm channel
                prefix, momentum, eps = op[1:]
                G, B, C = h.shape
                flat = F.batch_norm(h.transpose(0, 1).reshape(B, G * C), self.buffers[prefix + "running_mean"].view(-1),
                                    self.buffers[prefix + "running_var"].view(-1), self.stacked(prefix + "weight").view(-1),
                                    self.stacked(prefix + "bias").view(-1), train, momentum, eps)
                if train:
                    self.buffers[prefix + "num_batches_tracked"].add_(1)
                h = flat.view(B, G, C).transpose(0, 1)
            elif kind == "dropout" and train and op[1] > 0:
                G, B, C = h.shape
                h = (h.reshape(self.K, self.S, B, C) * next(dropout)).view(G, B, C)
        return h

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a `state()`-layout dict (e.g. the best epochs') back into the parameters and buffers."""
        for name, parts in self.params.items():
            t = state[name].transpose(1, 2) if name in self.transposed else state[name]
            for k, part in enumerate(parts):
                part.copy_(t[k * self.S:(k + 1) * self.S])
        for name, buffer in self.buffers.items():
            buffer.copy_(state[name])

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor stacked over the G heads in torch's layout (a detached view)."""
        params = {name: self.stacked(name).detach() for name in self.params}
        return {**{name: t.transpose(1, 2) if name in self.transposed else t for name, t in params.items()},
                **self.buffers}


@torch.no_grad()
def predict_all(model: StackedHeads, X: torch.Tensor) -> torch.Tensor:
    """Argmax predictions [G, N] of every head (eval mode), in blocks of rows cast to float32."""
    widest = max([t[0].shape[2] for t in model.params.values() if t[0].ndim == 3] + [1])
    rows = max(1, min(BLOCK_ROWS, VAL_ELEMENTS // (model.G * widest)))
    return torch.cat([model.forward(X[i:i + rows].float().unsqueeze(0), None).argmax(2)
                      for i in range(0, X.shape[0], rows)], dim=1)
