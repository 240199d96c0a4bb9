"""Every bad invocation of every command: one line on stderr, exit code 2, no traceback.

The cases are built from the typer app at collection time, so a command added later is covered
without touching this file. They go through `fgembed.cli.main.main` — the function the console
script and `python -m fgembed` call — not through typer's own standalone handler, which prints a
framed usage block instead of our one line.
"""
from __future__ import annotations

import inspect
import sys
import types
import typing
from dataclasses import dataclass

import pytest
import typer
from fgembed.cli.main import app, main, run

from fgembed import __version__
from fgembed.errors import FgembedError

NUMBERS = (int, float)


@dataclass
class Param:
    name: str
    flag: str | None  # `--epochs`; None for a positional argument
    required: bool
    kind: type  # int, float, bool, str, Path… (list[X] and Optional[X] unwrapped)


def _unwrap(hint: object) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _unwrap(args[0]) if args else hint  # Optional[int] → int, list[Path] → Path


def _params(callback) -> list[Param]:
    hints = typing.get_type_hints(callback)
    params = []
    for name, p in inspect.signature(callback).parameters.items():
        if hints[name] is typer.Context:  # the command's own context, not an option
            continue
        info = p.default
        decls = [d for d in (getattr(info, "param_decls", None) or ()) if d.startswith("--")]
        flag = None if isinstance(info, typer.models.ArgumentInfo) else \
            (decls[0].split("/")[0] if decls else f"--{name.replace('_', '-')}")
        params.append(Param(name, flag, info.default is ..., _unwrap(hints[name])))
    return params


COMMANDS = {info.name or info.callback.__name__.replace("_", "-"): _params(info.callback)
            for info in app.registered_commands}


def _dummy(p: Param) -> list[str]:
    value = "1" if p.kind in NUMBERS else "x"
    return [value] if p.flag is None else [p.flag, value]


def _required(params: list[Param], skip: Param | None = None) -> list[str]:
    return [tok for p in params if p.required and p is not skip for tok in _dummy(p)]


def _bad_value(params: list[Param]) -> list[str]:
    """A number option given a word; else a flag given a value; else an option left without one."""
    number = next((p for p in params if p.flag and p.kind in NUMBERS), None)
    if number:
        return _required(params, number) + [number.flag, "notanumber"]
    flag = next((p for p in params if p.flag and p.kind is bool and not p.required), None)
    if flag:
        return _required(params) + [f"{flag.flag}=maybe"]
    valued = next(p for p in params if p.flag)
    return _required(params, valued) + [valued.flag]


def _cases() -> list:
    cases = []
    for name, params in COMMANDS.items():
        if any(p.required for p in params):
            cases.append(pytest.param([name], id=f"{name}-missing-required"))
        if any(p.flag for p in params):
            cases.append(pytest.param([name, *_bad_value(params)], id=f"{name}-bad-value"))
        cases.append(pytest.param([name, *_required(params), "--no-such-option"], id=f"{name}-unknown-option"))
    return cases + [pytest.param(["no-such-command"], id="unknown-command"),
                    pytest.param(["--no-such-option"], id="unknown-top-level-option")]


def _one_error_line(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("argv", _cases())
def test_usage_error_is_one_line_and_exit_2(capsys, argv):
    line = _one_error_line(capsys, argv)
    assert "--help" in line  # says where the usage is


def test_cases_reach_every_command():
    """The enumeration sees the commands (an empty app would pass the test above vacuously)."""
    named = {case.values[0][0] for case in _cases()}
    assert {"extract", "info", "fit", "ensemble", "demo", "export", "import"} <= set(COMMANDS) <= named


def test_messages_name_the_problem(capsys):
    assert "Missing option '--store'" in _one_error_line(capsys, ["fit", "--features", "a"])
    assert "'--epochs'" in _one_error_line(capsys, ["fit", "--store", "s", "--features", "a", "--epochs", "0"])
    assert "No such command 'bogus'" in _one_error_line(capsys, ["bogus"])
    assert "--bogus" in _one_error_line(capsys, ["fit", "--bogus"])


def test_console_script_path_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fgembed", "fit", "--epochs", "x"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1


def test_no_arguments_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    captured = capsys.readouterr()
    assert "Usage" in captured.out and "ensemble" in captured.out and "Traceback" not in captured.err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fgembed {__version__}\n"


def _demo_raising(monkeypatch, exc: BaseException) -> None:
    """Stand a module in for fgembed.demo whose run_demo raises (the command imports it when run)."""
    def raising(*args, **kwargs):
        raise exc

    fake = types.ModuleType("fgembed.demo")
    fake.DEMO_BACKBONES, fake.run_demo = ("a", "b"), raising
    monkeypatch.setitem(sys.modules, "fgembed.demo", fake)


def test_library_error_is_one_unwrapped_line(capsys, monkeypatch, tmp_path):
    """A long FgembedError stays on one line whatever the terminal width (rich would wrap it)."""
    message = "no such file: " + "/very/long/path" * 20
    _demo_raising(monkeypatch, FgembedError(message))
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == f"error: {message}" and sum(line.startswith("error") for line in lines) == 1


def test_ctrl_c_says_how_to_resume(capsys, monkeypatch, tmp_path):
    _demo_raising(monkeypatch, KeyboardInterrupt())
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"fgembed demo --out {tmp_path} --quiet" in err and "resume" in err
