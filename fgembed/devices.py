"""Device choice shared by both stages: `auto` means CUDA when torch sees it (the rank's own GPU
under torchrun), and asking for CUDA on a machine without it is a one-line error, not a crash
deep inside the first `.to()`."""
from __future__ import annotations

import os

import torch

from .errors import FgembedError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FgembedError(f"unknown device {device!r} (try cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FgembedError("--device cuda asked for, but torch sees no CUDA device")
    return resolved
