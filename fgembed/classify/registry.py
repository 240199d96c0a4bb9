"""The head registry (timm-style): `HEADS` is both the list of choices and the dispatch.

A head module registers its classes where it defines them (`@register_head("mlp")`). This module
imports none of them, so no import circle can form through it; `create_head`, `head_class` and
`list_heads` load the built-in head modules (`HEAD_MODULES`) on first use, and a contributor's
module registers its heads simply by being imported. A head is a `base.Head`: it declares what it
takes (`trained`, `architecture`, `learned_projection`, `needs_text`), and the same class serves
training, runs, ensembles and prediction.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import TYPE_CHECKING, Callable

from ..errors import FgembedError

if TYPE_CHECKING:
    from .base import Head

HEADS: dict[str, type[Head]] = {}
HEAD_MODULES = ("fgembed.classify.heads", "fgembed.classify.baselines")


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: make a head available under `name`."""
    def add(cls: type) -> type:
        HEADS[name] = cls
        cls.registered_name = name
        return cls
    return add


def _load() -> None:
    for module in HEAD_MODULES:
        importlib.import_module(module)


def list_heads(pattern: str = "*") -> list[str]:
    _load()
    return sorted(fnmatch.filter(HEADS, pattern))


def head_class(name: str) -> type[Head]:
    """The class registered as `name`; an unknown name is one line with the close ones."""
    _load()
    if name not in HEADS:
        close = difflib.get_close_matches(name, list(HEADS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FgembedError(f"unknown head {name!r}; {hint}choose from {', '.join(sorted(HEADS))}")
    return HEADS[name]


def create_head(name: str, **params) -> Head:
    return head_class(name)(**params)
