"""What a user reads at 80 columns (a tmux pane, a laptop terminal): help pages, `info` and
`backbones` keep every identifier whole — no cell cut with an ellipsis, no line past the edge."""
from __future__ import annotations

import re

import pytest
import typer.rich_utils
from fgembed.cli import _common
from fgembed.cli.main import app, main

from fgembed.backbones import spec_table

from .formats import write_feature_store

WIDTH = 80
COMMANDS = sorted(info.name or info.callback.__name__ for info in app.registered_commands
                  if (info.name or info.callback.__name__) not in ("extract", "bench"))  # TODO(lead): being reworked
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CUT = re.compile(r"\w…(?=\s|│|┃|$)", re.M)  # rich's mark of a cell cut short: a word ending in an ellipsis


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", WIDTH)  # typer's help console
    monkeypatch.setattr(_common.out, "width", WIDTH)  # fgembed's results console


def _lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    return [ANSI.sub("", line) for line in (captured.out + captured.err).splitlines()]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_cuts_no_word(capsys, narrow, command):
    assert main([command, "--help"]) == 0
    lines = _lines(capsys)
    assert max(map(len, lines)) <= WIDTH
    text = "\n".join(lines)
    assert not CUT.findall(text)
    assert "<bool>" not in text  # a flag takes no value: no type column for it
    command_info = next(i for i in app.registered_commands if (i.name or i.callback.__name__) == command)
    for name in re.findall(r"--[a-z0-9-]+", str(command_info.callback.__doc__ or "")):
        assert name in text
    assert len(lines) < 120  # grouped into panels, not one long list


def test_info_keeps_backbone_names_whole(capsys, narrow, tmp_path):
    store = write_feature_store(tmp_path / "a-store-with-a-long-name.zarr",
                                names=("timm:vit_large_patch14_dinov2.lvd142m", "hf:facebook/dinov2-large", "c"))
    assert main(["info", str(store.path)]) == 0
    lines = _lines(capsys)
    text = "\n".join(lines)
    assert "timm:vit_large_patch14_dinov2.lvd142m" in text and "hf:facebook/dinov2-large" in text
    assert not CUT.findall("\n".join(line for line in lines if not line.startswith("identity:")))  # (a short hash)
    assert "None" not in text  # a fingerprint without a value shows –, never Python's None


def test_backbones_keeps_names_whole(capsys, narrow):
    assert main(["backbones"]) == 0
    text = "\n".join(_lines(capsys))
    for spec in spec_table():
        assert spec["name"] in text and spec["model"] in text
    assert not CUT.findall(text)
