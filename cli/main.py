"""Assemble the typer app from its command modules; `run` is the console-script entry point."""
from . import extraction, classifier, interchange, analysis  # noqa: F401,I001  (registers commands, in help order)
from ._common import app, run

__all__ = ["app", "run"]
