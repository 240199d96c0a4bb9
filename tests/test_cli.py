"""The command line as a user meets it: one clear line and a non-zero exit on bad input."""
from __future__ import annotations

import json

import pytest

from .conftest import run_cli


def _one_line_error(proc, code, pattern):
    assert proc.returncode == code, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [l for l in lines if l.startswith("error:")] == lines[-1:], proc.stderr  # one error line, last
    assert pattern in lines[-1], lines[-1]


def test_bad_input_one_line_nonzero(tmp_path, manifest_csv):
    _one_line_error(run_cli("extract", "--dataset", "cub", "--root", tmp_path, "--store", tmp_path / "s.zarr",
                            "--backbone", "timm:test_vit"), 2, "missing dataset file")
    _one_line_error(run_cli("extract", "--dataset", "foo", "--root", tmp_path, "--store", tmp_path / "s.zarr",
                            "--backbone", "x"), 2, "unknown dataset kind 'foo'")
    _one_line_error(run_cli("info", tmp_path / "none.zarr"), 2, "no feature store")
    proc = run_cli("extract", "--dataset", "manifest", "--root", manifest_csv, "--store", tmp_path / "s.zarr",
                   "--backbone", "dinov3_vitl", "--no-pretrained", "--quiet")
    assert proc.returncode == 2 and "did you mean dinov3_vitl16" in proc.stderr and "Traceback" not in proc.stderr


def test_extract_info_and_refusal(tmp_path, manifest_csv):
    base = ["extract", "--dataset", "manifest", "--root", manifest_csv, "--store", tmp_path / "s.zarr",
            "--backbone", "timm:test_resnet", "--no-pretrained", "--workers", "0", "--quiet"]
    first = run_cli(*base, check=True)
    assert "60 rows" in first.stdout and "random-initialised" in first.stderr
    _one_line_error(run_cli(*base, "--image-size", "64"), 2, "--overwrite")
    info = json.loads(run_cli("info", tmp_path / "s.zarr", "--json", check=True).stdout)
    assert info["rows"] == 60 and info["backbones"][0]["rows_done"] == 60
    assert info["splits"] == {"train": 34, "val": 8, "test": 18}
    table = run_cli("info", tmp_path / "s.zarr", check=True).stdout
    assert "timm:test_resnet" in table and "random-init" in table


def test_help_and_backbones():
    assert "Decode" not in run_cli("--help", check=True).stderr
    help_text = run_cli("extract", "--help", check=True).stdout
    for option in ("--backbone", "--no-pretrained", "--pooling", "--strict", "--overwrite", "--weights"):
        assert option in help_text
    specs = json.loads(run_cli("backbones", "--json", check=True).stdout)
    assert [s["name"] for s in specs] == ["dinov3_vitl16", "dinov2_vitl14", "convnextv2_large", "openclip_vitl14",
                                          "siglip_vitl16_256"]
