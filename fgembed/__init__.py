"""fgembed: fine-grained visual classification with frozen foundation models.

The main API is importable from the top level (`from fgembed import FeatureStore, fit_run`), loaded
on first use (PEP 562) so that `import fgembed` — and every `fgembed` command — does not pay for
torch, timm and zarr until it needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# name → the module that defines it, in the order data flows (datasets → store → views → heads → runs)
_API = {
    "FgembedError": "fgembed.errors",
    "load_dataset": "fgembed.datasets",
    "load_backbone": "fgembed.backbones",
    "extract_features": "fgembed.extraction.extract",  # the function `extract`, named for what it makes
    "ExtractOptions": "fgembed.extraction.extract",
    "FeatureStore": "fgembed.store",
    "ViewConfig": "fgembed.classify.views",
    "build_view": "fgembed.classify.views",
    "MLPHead": "fgembed.classify.heads",
    "LinearHead": "fgembed.classify.heads",
    "create_head": "fgembed.classify.registry",
    "list_heads": "fgembed.classify.registry",
    "HeadConfig": "fgembed.classify.config",
    "RunConfig": "fgembed.classify.config",
    "Run": "fgembed.classify.rundir",
    "fit_run": "fgembed.classify.fitting",
    "BootstrapConfig": "fgembed.classify.intervals",  # fit_run's and ensemble's test-set intervals
    "predict_images": "fgembed.predict",  # the function `predict`: the bare name is the module
}

# top-level names of the two entry points: `fgembed.predict` is the module (Python binds it on the
# package whenever it is imported), and `extract_features` says what `extract` makes
_RENAMED = {"extract_features": "extract", "predict_images": "predict"}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # what static tools and IDEs see; at run time __getattr__ imports on demand
    from .backbones import load_backbone
    from .classify.heads import LinearHead, MLPHead
    from .classify.registry import create_head, list_heads
    from .classify.config import HeadConfig, RunConfig
    from .classify.fitting import fit_run
    from .classify.intervals import BootstrapConfig
    from .classify.rundir import Run
    from .classify.views import ViewConfig, build_view
    from .datasets import load_dataset
    from .errors import FgembedError
    from .extraction.extract import ExtractOptions
    from .extraction.extract import extract as extract_features
    from .predict import predict as predict_images
    from .store import FeatureStore


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'fgembed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
