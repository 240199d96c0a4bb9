"""Shared CLI plumbing: the app, the error guard, stdout/stderr consoles."""
from __future__ import annotations

import json
import sys
from typing import Any

import click
import typer
from rich.console import Console

from fgembed.errors import FgembedError

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)  # results
err = Console(stderr=True, soft_wrap=True)  # progress and announcements

app = typer.Typer(
    help="fgembed — fine-grained classification with frozen foundation models.\n\n"
         "Stage 1 `extract` writes embeddings to a resumable Zarr store; stage 2 (`fit`, `ensemble`) "
         "trains small heads on them in seconds.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def run() -> None:
    """Entry point: bad input is one line on stderr and a non-zero exit, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except FgembedError as exc:
        sys.stderr.write(f"error: {exc}\n")  # plain write: rich would wrap a long path onto two lines
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted: finished work is saved; rerun the same command to resume\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
