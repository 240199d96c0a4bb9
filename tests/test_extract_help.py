"""`fgembed extract --help` and `fgembed bench --help` at 80 columns: options grouped in panels,
common ones first, every word of every help text whole (rich cuts a word with '…' or folds it
when a column is narrower than the word)."""
from __future__ import annotations

import re

import pytest
import typer
from fgembed.cli.main import app
from typer.testing import CliRunner


def _render(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"},
                                terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _words(text: str) -> set[str]:
    return set(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("command, panels", [
    ("extract", ["Options", "Speed", "Precision", "Variants", "Weights", "Store and output"]),
    ("bench", ["Options", "Timing", "Weights", "Output"]),
])
def test_help_fits_80_columns_in_panels_without_cut_words(command, panels):
    text = _render(command)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    titles = [re.match(r"╭─ (.+?) ─", line).group(1) for line in lines if line.startswith("╭─ ")]
    assert [t.split(" (")[0] for t in titles] == panels
    first = text.split("╭─ Options")[1].split("╰")[0]
    if command == "extract":
        assert all(f"--{o}" in first for o in ("dataset", "root", "store", "backbone"))
    rendered = _words(text)
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        for word in (param.help or "").split():
            word = word.replace("`", "")  # markdown code marks render as styling
            assert word in rendered, (param.name, word)
    if command == "extract":
        assert len(lines) < 100  # was ~173, with 19-character description columns
