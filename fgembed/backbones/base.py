"""What every adapter returns: a model with its own preprocessing and embedding function."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..errors import FgembedError
from ..images import IMAGE_POLICY

POOLINGS = ("pooled", "cls", "mean", "cls+mean")


@dataclass
class LoadOptions:
    """How to materialise a spec: these all change the numbers and enter the fingerprint."""

    pretrained: bool = True
    weights: Path | None = None  # a local checkpoint (file, or a directory for Hugging Face)
    image_size: int | None = None
    pooling: str | None = None  # None: the spec's own output
    cache_dir: Path | None = None


@dataclass
class Backbone:
    """A frozen model ready for extraction.

    `transform` maps one decoded RGB PIL image to the model's input tensor (the source library's
    own eval preprocessing); `embed` maps a batch of those to [B, dim] embeddings.
    """

    name: str
    model: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    input_shape: tuple[int, ...]
    convolutional: bool
    fingerprint: dict = field(default_factory=dict)
    # The transform split for a uint8 feed: `geometric` is the library's own resize/crop ending in
    # a uint8 CHW tensor (None when the library's transform cannot be split that way: then the
    # float `transform` is used); `mean`/`std` normalise on the device after scaling to [0, 1].
    geometric: Callable[[Image.Image], torch.Tensor] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def preprocessing_key(self) -> str:
        """Equal keys mean equal transforms: the fingerprint describes the preprocessing fully."""
        fp = self.fingerprint
        return json.dumps([fp["source"], fp["preprocessing"], fp["input_shape"]], sort_keys=True)


def library_versions(*names: str) -> dict[str, str]:
    return {n: importlib.metadata.version(n) for n in ("torch", *names)}


def weights_id(options: LoadOptions, tag: str | None) -> str:
    """Name the weights: random init, a local file (by content hash) or the library's tag."""
    if not options.pretrained:
        return "random-init:seed0"
    if options.weights is not None:
        path = Path(options.weights)
        if not path.exists():
            raise FgembedError(f"weights not found: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256()
        for f in files:
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return f"file:{path.name}:sha256:{h.hexdigest()[:16]}"
    return tag or "default"


def check_pooling(pooling: str, has_tokens: bool, name: str) -> None:
    if pooling not in POOLINGS:
        raise FgembedError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if pooling != "pooled" and not has_tokens:
        raise FgembedError(f"pooling {pooling!r} needs a token model; {name} gives pooled features only")


def pool_tokens(tokens: torch.Tensor, pooling: str, n_prefix: int) -> torch.Tensor:
    """CLS, mean of patch tokens (prefix/register tokens excluded), or both concatenated."""
    cls = tokens[:, 0]
    mean = tokens[:, n_prefix:].mean(dim=1)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pooling]


def finish(name: str, model: torch.nn.Module, transform, embed, convolutional: bool,
           fingerprint: dict) -> Backbone:
    """Probe the transform and model once: the exact input shape and output dim, not a guess."""
    model.eval().requires_grad_(False)
    probe = transform(Image.new("RGB", (97, 71), (128, 128, 128)))
    with torch.inference_mode():
        dim = int(embed(probe.unsqueeze(0)).shape[-1])
    fingerprint = {**fingerprint, "image_policy": IMAGE_POLICY, "input_shape": list(probe.shape)}
    return Backbone(name, model, transform, embed, dim, tuple(probe.shape), convolutional, fingerprint)
