"""Assemble the typer app from its command modules; `run` is the console-script entry point."""
from . import extraction, classifier, distill, interchange, analysis, predict, export_model, novelty  # noqa: F401,I001  (registers commands, in help order)
from ._common import app, main, run

__all__ = ["app", "main", "run"]
