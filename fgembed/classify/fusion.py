"""Embedding fusions: how member embeddings of the same rows become one design row.

Each fusion is one class in one registry (`FUSIONS`, timm-style: the dict is both the list of
choices and the dispatch; `register_fusion` adds one from any module). One object per view:
`create_fusion(view_config, member_dims)` builds it; a fusion with state (`stateful`) is fitted
on the training rows one member at a time (`start_fit`, `fit_member`); `apply` turns any rows of
the members into design rows; `state` / `load` save it beside a run's heads and rebuild it;
`torch_module` is `apply` in torch, for a model file (`fgembed export-model`). The
same object serves the training view (`views.build_view`), `fgembed predict` (`transform` on new
images' embeddings), `fgembed ensemble` (every registered fusion but `single` is a strategy) and
the report (`title`, `colour`), so a fusion written in one file trains, scores, reports and
predicts: a class registered from any module (a plug-in, a test) is a `--fusion` choice and an
ensemble strategy at once. The view settings it reads are its `settings` (`l2` by default; `sum`
adds `project`, `project_dim`); the view resets the others.

Built in:
- `single`: one member as it is;
- `concat`: the members side by side (each optionally L2-normalised first: their scales differ);
- `sum`: each member projected to one dimension and added — by PCA fitted on the training rows
  only (`pca.PCASum`), or (`project="linear"`) the concatenation, projected by the head's own
  learned `SumProjection`.

Late fusion (logits of separately trained heads) is not an embedding fusion: see `late.py`, and
`gate.py` for its input-gated form.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import FgembedError
from .blocks import blocks
from .pca import PCASum

if TYPE_CHECKING:
    from .views import ViewConfig

PROJECTIONS = ("pca", "linear")
FUSIONS: dict[str, type[Fusion]] = {}


def register_fusion(name: str) -> Callable[[type], type]:
    """Class decorator: make a fusion available as `--fusion name` and as an ensemble strategy."""
    def add(cls: type) -> type:
        FUSIONS[name] = cls
        cls.name = name
        return cls
    return add


def create_fusion(config: ViewConfig, dims: Sequence[int], device: str | torch.device = "cpu") -> Fusion:
    """The fusion of a view of members with these dims; `device` is where a fit may compute."""
    return FUSIONS[config.fusion](config, dims, device)


def fusion_strategies() -> tuple[str, ...]:
    """What `fgembed ensemble` can score beside single heads: every fusion of several members, late
    fusion, and gated late fusion (`gated.py`: per-image member weights from a gate)."""
    return (*[name for name, cls in FUSIONS.items() if cls.min_members > 1], "late", "gated")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concat(features: list[np.ndarray], l2: bool = False) -> np.ndarray:
    return np.concatenate([l2_normalise(f) if l2 else f for f in features], axis=1)


class Fusion:
    """One view's embedding fusion (see the module docstring). Subclasses give `apply`, and the
    rest where they differ: `width`, a fit, a saved state, settings for the head."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""         # how tables and charts name its rows
    colour: ClassVar[str] = "#8c564b"  # its bars and points in charts
    min_members: ClassVar[int] = 2
    # the view settings it reads (`ViewConfig` fields): the rest are reset, so a setting that
    # cannot change its numbers cannot split one run into two run keys
    settings: ClassVar[tuple[str, ...]] = ("l2",)

    def __init__(self, config: ViewConfig, dims: Sequence[int], device: str | torch.device = "cpu") -> None:
        self.config, self.dims, self.device = config, [int(d) for d in dims], device

    @property
    def stateful(self) -> bool:
        """Whether `start_fit` / `fit_member` must see the training rows before `apply`."""
        return False

    def width(self) -> int:
        """Columns of a design row (after `start_fit` for a stateful fusion)."""
        return sum(self.dims)

    def members(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The member blocks as the fusion sees them: L2-normalised first with the view's `l2`."""
        return [l2_normalise(np.asarray(p, np.float32)) if self.config.l2 else p for p in parts]

    def start_fit(self, n_train: int) -> None:
        raise NotImplementedError

    def fit_member(self, i: int, train: np.ndarray) -> None:
        """Fit member i's part of the state on its training rows (float32, already `members`-prepared)."""
        raise NotImplementedError

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Design rows [rows, width] of one block of the members' rows."""
        raise NotImplementedError

    def apply_into(self, parts: Sequence[np.ndarray], out: np.ndarray) -> None:
        """`apply`, written into `out` (a float16 slice of the view's matrix)."""
        out[...] = self.apply(parts)

    def transform(self, embeddings: Sequence[np.ndarray], block_rows: int = 4096) -> np.ndarray:
        """Design rows (float16) of whole member matrices, block by block (`fgembed predict`)."""
        if len(embeddings) != len(self.dims):
            raise FgembedError(f"{len(embeddings)} member embeddings for a view of {len(self.dims)}")
        n = len(embeddings[0])
        out = np.empty((n, self.width()), np.float16)
        for rows in blocks(n, block_rows):
            self.apply_into([np.asarray(e[rows]) for e in embeddings], out[rows])
        return out

    def head_params(self) -> dict:
        """Settings the head takes from the fusion (a projection it learns itself)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """What `load` rebuilds a fitted fusion from (saved as a run's `projection.safetensors`)."""
        return {}

    def load(self, arrays: dict[str, np.ndarray]) -> Fusion:
        return self

    def torch_module(self) -> nn.Module | None:
        """`apply` of the fitted fusion as a torch module over float32 member rows (a list of
        [rows, d_i] tensors), for `fgembed export-model`; None: no torch form, not exportable."""
        return None


@register_fusion("single")
class Single(Fusion):
    title, colour, min_members, settings = "single", "#7f7f7f", 1, ()

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(parts[0], np.float32)

    def torch_module(self) -> nn.Module:
        return FusionModule()

    def apply_into(self, parts: Sequence[np.ndarray], out: np.ndarray) -> None:
        out[...] = parts[0]  # the stored dtype as it is: no float32 copy


@register_fusion("concat")
class Concat(Fusion):
    title, colour = "concat", "#1f77b4"

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(self.members(parts), axis=1, dtype=np.float32)

    def apply_into(self, parts: Sequence[np.ndarray], out: np.ndarray) -> None:
        """Each member into its own columns: float16 members are never widened to a float32 block."""
        offset = 0
        for part in self.members(parts):
            out[:, offset:offset + part.shape[1]] = part
            offset += part.shape[1]

    def torch_module(self) -> nn.Module:
        return FusionModule(self.config.l2)


@register_fusion("sum")
class Sum(Fusion):
    """PCA per member (fitted on training rows), summed; or, with `project="linear"`, the
    concatenation, which the head projects and sums itself (`SumProjection`)."""

    title, colour, settings = "sum", "#2ca02c", ("l2", "project", "project_dim")

    def __init__(self, config: ViewConfig, dims: Sequence[int], device: str | torch.device = "cpu") -> None:
        super().__init__(config, dims, device)
        self.pca = None if config.project == "linear" else PCASum(config.project_dim, device)

    @property
    def stateful(self) -> bool:
        return self.pca is not None

    def width(self) -> int:
        return sum(self.dims) if self.pca is None else self.pca.n_components_

    def start_fit(self, n_train: int) -> None:
        self.pca.prepare(self.dims, n_train)

    def fit_member(self, i: int, train: np.ndarray) -> None:
        self.pca.fit_member(i, train)

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        members = self.members(parts)
        return concat(members) if self.pca is None else self.pca.transform(members)

    def head_params(self) -> dict:
        return {} if self.pca is not None else {"sum_blocks": tuple(self.dims), "sum_dim": self.config.project_dim}

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.pca is None else self.pca.arrays()

    def load(self, arrays: dict[str, np.ndarray]) -> Fusion:
        if self.pca is not None:
            if not arrays:
                raise FgembedError("a PCA sum view needs its fitted projection (projection.safetensors)")
            self.pca = PCASum.from_arrays(arrays)
        return self

    def torch_module(self) -> nn.Module:
        return FusionModule(self.config.l2, self.pca)


class FusionModule(nn.Module):
    """The built-in fusions' `apply` in torch: the members (L2-normalised first with `l2`) side by
    side (single, concat, a learned sum's input), or, given the fitted `PCASum`, each projected by
    its own PCA and summed."""

    def __init__(self, l2: bool = False, pca: PCASum | None = None) -> None:
        super().__init__()
        self.l2, self.projected = l2, pca is not None
        for i, (mean, components) in enumerate(zip(pca.means_, pca.components_) if pca is not None else ()):
            self.register_buffer(f"mean{i}", torch.from_numpy(np.array(mean, np.float32)))
            self.register_buffer(f"components{i}", torch.from_numpy(np.array(components, np.float32)))

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.l2:
            parts = [nn.functional.normalize(p, dim=1, eps=1e-12) for p in parts]  # as `l2_normalise`
        if not self.projected:
            return torch.cat(parts, 1)
        terms = [(p - getattr(self, f"mean{i}")) @ getattr(self, f"components{i}").T for i, p in enumerate(parts)]
        return torch.stack(terms).sum(0)


class SumProjection(nn.Module):
    """Learned `sum` fusion: input is the members' concatenation; each block gets its own
    Linear(d_i, dim) and the projections are summed."""

    def __init__(self, blocks: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.projections = nn.ModuleList(nn.Linear(d, dim) for d in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, list(self.blocks), dim=1)
        return torch.stack([p(part) for p, part in zip(self.projections, parts)]).sum(0)
