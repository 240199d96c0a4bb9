"""Shared CLI plumbing: the app, the error guard, stdout/stderr consoles."""
from __future__ import annotations

import json
import shlex
import sys
from typing import Any, Optional, Sequence

import typer
from rich.console import Console
from typer.core import TyperGroup

from fgembed import __version__
from fgembed.errors import FgembedError

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)  # results
err = Console(stderr=True, soft_wrap=True)  # progress and announcements

# typer ≤ 0.15 runs on click and re-exports click's classes; typer ≥ 0.16 bundles its own copy
# (`typer._click`) and click may not even be installed. Take the classes typer itself raises, found
# through its public API, so the guard below holds on either line of releases.
CLI_ERRORS = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
EXIT, ABORT = typer.Exit, typer.Abort
INTERRUPTED = 130  # the shell's code for SIGINT; typer ≥ 0.16 turns Ctrl-C into Exit(130) itself

class _Group(TyperGroup):
    """The app's command group: help pages show no type for a flag (`--quiet`, `--help`), which
    takes no value (typer would print `<bool>` in that column)."""

    def get_command(self, ctx, name: str):
        command = super().get_command(ctx, name)
        if command is not None:
            _bare_flags(command, ctx)
        return command

    def format_help(self, ctx, formatter) -> None:
        _bare_flags(self, ctx)
        super().format_help(ctx, formatter)


def _bare_flags(command, ctx) -> None:
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


app = typer.Typer(
    cls=_Group,
    help="fgembed — fine-grained classification with frozen foundation models.\n\n"
         "Stage 1 `extract` writes embeddings to a resumable Zarr store; stage 2 (`fit`, `ensemble`) "
         "trains small heads on them in seconds.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"fgembed {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Options before the command: only --version (and --help)."""


def plural(n: int, word: str) -> str:
    """`1 class`, `2 classes`, `1 row`: counts read as English."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def fits(table, console: Console | None = None) -> bool:
    """Whether a rich table fits the console at its natural width (rich would otherwise cut or
    wrap cells, identifiers included): callers show a stacked view instead."""
    from rich.measure import Measurement

    console = console or out
    natural = Measurement.get(console, console.options.update_width(1 << 16), table)  # unconstrained
    return natural.maximum <= console.width


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _usage_line(exc: Exception, args: list[str]) -> str:
    """click's message on one line, with where to look for help (click itself prints usage + 3 lines)."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)  # the parser's own errors (an option missing its value) carry none
    if ctx is not None:
        command = ctx.command_path
    else:
        command = "fgembed" if args[0].startswith("-") else f"fgembed {args[0]}"
    return f"error: {message} (see '{command} --help')"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; bad input is one line on stderr and exit code 2, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]  # bare `fgembed`: help, exit 0
    try:
        code = app(args=args, prog_name="fgembed", standalone_mode=False)
    except FgembedError as exc:
        # plain write, newlines folded: rich would wrap a long path onto two lines
        sys.stderr.write(f"error: {' '.join(str(exc).splitlines())}\n")
        return exc.exit_code
    except EXIT as exc:
        code = exc.exit_code
    except CLI_ERRORS as exc:
        sys.stderr.write(_usage_line(exc, args) + "\n")
        return exc.exit_code
    except (ABORT, KeyboardInterrupt):
        code = INTERRUPTED
    if code == INTERRUPTED:
        sys.stderr.write(f"\n{_resume_line(args)}\n")
    return code if isinstance(code, int) else 0


def _resume_line(args: list[str]) -> str:
    """What to run after Ctrl-C: the same command, less --force (which would retrain, not resume,
    what this one finished)."""
    kept = [a for a in args if a != "--force"]
    note = " (without --force: it would retrain what this run finished)" if len(kept) < len(args) else ""
    return f"interrupted: finished work is saved; resume with: {shlex.join(['fgembed', *kept])}{note}"


def run() -> None:
    """The console script (`fgembed`) and `python -m fgembed`."""
    sys.exit(main())
