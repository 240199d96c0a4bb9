"""The command line as a user meets it: one clear line and a non-zero exit on bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fgembed

from .conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


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
    _one_line_error(run_cli(*base, "--dtype", "float32"), 2, "--overwrite")  # (another --image-size is its own group)
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


def test_classifier_stage_end_to_end(tmp_path, manifest_csv):
    """extract → fit → ensemble → export → import → fit on the import, all as a user types them."""
    store, runs = tmp_path / "s.zarr", tmp_path / "runs"
    run_cli("extract", "--dataset", "manifest", "--root", manifest_csv, "--store", store, "--backbone",
            "timm:test_vit", "--backbone", "timm:test_resnet", "--no-pretrained", "--workers", "0", "--quiet",
            check=True)
    fast = ["--epochs", "10", "--runs", runs, "--quiet"]
    fitted = json.loads(run_cli("fit", "--store", store, "--features", "timm:test_vit", "--seeds", "0,1", *fast,
                                "--json", check=True).stdout)
    assert fitted["seeds"] == [0, 1] and fitted["n_test"] == 18 and not fitted["reused"]
    again = run_cli("fit", "--store", store, "--features", "timm:test_vit", "--seeds", "0,1", *fast, check=True)
    assert "reused finished run" in again.stdout
    table = json.loads(run_cli("ensemble", "--store", store, "--members", "timm:test_vit,timm:test_resnet",
                               "--format", "json", *fast, check=True).stdout)
    assert {r["key"] for r in table} == {"single:timm:test_vit", "single:timm:test_resnet",
                                         "late:timm:test_vit+timm:test_resnet", "concat:timm:test_vit+timm:test_resnet",
                                         "sum:timm:test_vit+timm:test_resnet"}
    assert [r["f1"] for r in table] == sorted((r["f1"] for r in table), reverse=True)
    for ext in ("md", "csv", "tex", "json", "png"):
        assert (runs / f"ensemble.{ext}").is_file()
    run_cli("export", store, "--to", tmp_path / "f.h5", check=True)
    imported = run_cli("import", tmp_path / "f.h5", "--store", tmp_path / "new.zarr", "--name", "vit",
                       "--key", "features/timm_test_vit", "--dataset", "manifest", "--root", manifest_csv, check=True)
    assert "matched by id" in imported.stdout
    refit = json.loads(run_cli("fit", "--store", tmp_path / "new.zarr", "--features", "vit", "--seeds", "0,1", *fast,
                               "--json", check=True).stdout)
    assert refit["per_seed"] == fitted["per_seed"]  # the same numbers through HDF5 and back


def test_classifier_bad_input_one_line_nonzero(tmp_path, manifest_csv):
    store = tmp_path / "s.zarr"
    run_cli("extract", "--dataset", "manifest", "--root", manifest_csv, "--store", store, "--backbone",
            "timm:test_resnet", "--no-pretrained", "--workers", "0", "--quiet", check=True)
    _one_line_error(run_cli("fit", "--store", store, "--features", "timm:test_vit", "--runs", tmp_path), 2,
                    "no features 'timm:test_vit'")
    _one_line_error(run_cli("fit", "--store", store, "--features", "timm:test_resnet", "--seeds", "a"), 2,
                    "--seeds takes comma-separated integers")
    _one_line_error(run_cli("fit", "--store", store, "--features", "timm:test_resnet", "--head", "svm"), 2,
                    "unknown head 'svm'")
    _one_line_error(run_cli("fit", "--store", store, "--features", "timm:test_resnet", "--device", "cuda:0"), 2,
                    "torch sees no CUDA") if not _has_cuda() else None
    _one_line_error(run_cli("ensemble", "--store", store, "--members", "timm:test_resnet,x", "--combinations",
                            "x+y"), 2, "combination 'x+y'")
    _one_line_error(run_cli("import", tmp_path / "none.h5", "--store", store, "--name", "n"), 2, "no such file")
    _one_line_error(run_cli("import", tmp_path / "none.h5", "--store", tmp_path / "new.zarr", "--name", "n"), 2,
                    "give --dataset and --root")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_demo_runs_the_whole_pipeline(tmp_path):
    from fgembed.demo import DEMO_BACKBONES, run_demo

    result = run_demo(tmp_path, progress=False, epochs=10)
    assert len(result.entries) == 3 + 4 * 4  # singles, and late/gated/concat/sum of 3 pairs and the triple
    assert {e.combination.strategy for e in result.entries} == {"single", "late", "gated", "concat", "sum"}
    assert set(result.extraction.backbones) == set(DEMO_BACKBONES)
    assert [p.suffix for p in result.report] == [".md", ".csv", ".tex", ".json", ".png"]
    assert len(list(result.runs.iterdir())) == 3 + 4 * 3  # late fusion reuses the single runs; a gate is a run


@pytest.mark.parametrize("name", fgembed.__all__)
def test_top_level_api(name):
    value = getattr(fgembed, name)
    if name != "__version__":
        assert value.__module__.startswith(fgembed._API[name]), (name, value.__module__)
    assert name in dir(fgembed)


def test_extraction_entry_point_is_not_shadowed_by_its_module():
    import fgembed.extraction.extract

    assert fgembed.extract_features is fgembed.extraction.extract.extract and callable(fgembed.extract_features)


def test_import_and_cli_stay_light():
    """`import fgembed` and the CLI's import pull in no model or array library (commands import them when run)."""
    code = ("import sys, fgembed, fgembed.cli.main; heavy = ('torch', 'timm', 'open_clip', 'transformers', 'zarr'); "
            "print(','.join(m for m in heavy if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fgembed.nope  # noqa: B018


def test_license_matches_pyproject():
    declared = re.search(r'^license = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    text = (REPO / "LICENSE").read_text()
    assert declared == "MIT" and text.startswith("MIT License") and "Copyright (c) 2026 the fgembed authors" in text


HEAVY = ("numpy", "scipy", "sklearn", "PIL", "torch", "torchvision", "timm", "open_clip", "transformers", "zarr",
         "h5py", "matplotlib", "ot")


def test_every_command_starts_without_array_or_model_libraries():
    """`fgembed --help`, `fgembed extract --help` and every command's start cost typer and rich only:
    each CLI module imports numpy, scikit-learn, torch… inside the command that uses them."""
    code = ("import contextlib, io, sys\n"
            "from fgembed.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as help_text:\n"
            "    codes = [main(['--help']), main(['extract', '--help'])]\n"
            f"print(codes, [m for m in {HEAVY!r} if m in sys.modules], 'Dataset format' in help_text.getvalue())")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert shown == "[0, 0] [] True"


def test_extract_help_lists_the_dataset_registry():
    """The formats `fgembed extract --help` names are spelled in the CLI (importing the registry
    costs numpy and scikit-learn at start-up); they must be the registry's, in its order."""
    from fgembed.cli.extraction import DATASET_KINDS

    from fgembed.datasets import KINDS

    assert DATASET_KINDS == KINDS
