"""Assemble the typer app from its command modules; `run` is the console-script entry point."""
from . import extraction  # noqa: F401  (registers commands)
from ._common import app, run

__all__ = ["app", "run"]
