"""`make paper-cub` end to end on a generated CUB_200_2011 folder, with tiny random-init backbones
standing in for the paper's five (the make recipe is otherwise the one a user runs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_paper_cub_runs_every_step_and_compares(cub_root, tmp_path):
    stamp = tmp_path / "installed"
    stamp.touch()  # this interpreter already has fgembed: skip the venv step of the Makefile
    out = tmp_path / "paper"
    args = ["make", "-s", "-C", str(REPO), "paper-cub", f"CUB_ROOT={cub_root}", f"PAPER_DIR={out}",
            f"STAMP={stamp}", f"BIN={Path(sys.executable).parent}", f"FGEMBED={sys.executable} -m fgembed",
            "PAPER_FIVE=timm:test_vit timm:test_convnext timm:test_resnet",
            "EXTRACT_FLAGS=--no-pretrained --workers 0 --quiet", "FIT_FLAGS=--epochs 3"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table1 = json.loads((out / "runs-cub" / "table1.json").read_text())
    table2 = json.loads((out / "runs-cub" / "table2.json").read_text())
    assert len(table1) == 3
    # late: full (= the trio here) and 3 pairs; concat: 3 pairs and full; sum: 3 pairs; plus the 3 singles
    assert len(table2) == 3 + 4 + 4 + 3
    assert "## cub table2: ours beside the paper" in proc.stdout and "late:dinov3_vitl16+" in proc.stdout
    # a second run finds every step done: nothing is extracted or trained again
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    assert again.returncode == 0 and "fgembed" not in again.stderr
