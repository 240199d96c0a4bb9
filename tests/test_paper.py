"""The paper's published tables (examples/paper/expected.json) and `make paper-cub` end to end on a
generated CUB_200_2011 folder, with tiny random-init backbones standing in for the paper's five
(the make recipe is otherwise the one a user runs)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fgembed.analysis.plan import plan
from fgembed.analysis.report import compare, row_key

REPO = Path(__file__).resolve().parents[1]
EXPECTED = json.loads((REPO / "examples" / "paper" / "expected.json").read_text())
FIVE = EXPECTED["members"]


def test_expected_holds_the_papers_tables_as_fractions():
    assert EXPECTED["units"] == "fraction"
    assert FIVE == ["dinov3_vitl16", "dinov2_vitl14", "convnextv2_large", "openclip_vitl14", "siglip_vitl16_256"]
    sizes = {(d, t): len(rows) for d in ("cub", "inat") for t, rows in EXPECTED[d].items()}
    assert sizes == {("cub", "table1"): 5, ("cub", "table2"): 10, ("inat", "table1"): 5, ("inat", "table3"): 9}
    for dataset in ("cub", "inat"):
        for name, rows in EXPECTED[dataset].items():
            for key, row in rows.items():
                values = {k: v for k, v in row.items() if k != "label"}
                assert set(values) == ({"accuracy", "f1"} if name == "table1" else
                                       {"accuracy", "f1", "precision", "recall"}), key
                assert all(isinstance(v, float) and 0 <= v <= 1 for v in values.values()), key
                strategy, _, members = key.partition(":")
                assert strategy in {"single", "late", "concat", "sum"} and set(members.split("+")) <= set(FIVE)
    # the same configuration printed twice: each value in its own table
    assert EXPECTED["cub"]["table1"]["single:dinov3_vitl16"] == {"label": "DINOv3", "accuracy": 0.897, "f1": 0.897}
    reference = EXPECTED["cub"]["table2"]["single:dinov3_vitl16"]
    assert (reference["accuracy"], reference["f1"]) == (0.897, 0.895)
    # "Ensemble All" / "Concat All" are all five backbones; the trio has its own row
    assert row_key("late", FIVE) in EXPECTED["cub"]["table2"] and row_key("concat", FIVE) in EXPECTED["cub"]["table2"]
    assert row_key("late", FIVE[:3]) in EXPECTED["inat"]["table3"]


def test_compare_prints_the_papers_rows_first_in_its_order():
    table2 = EXPECTED["cub"]["table2"]
    def record(key: str, accuracy: float, f1: float, precision: float) -> dict:  # as entry_record writes it
        values = {"accuracy": accuracy, "f1": f1, "precision": precision, "recall": accuracy}
        return {"key": key, "seeds": [0], **values, **{f"{k}_std": 0.0 for k in values}}

    ours = [record("sum:x+y", 0.5, 0.5, 0.5), record(row_key("late", FIVE), 0.93, 0.925, 0.9)]
    lines = compare(ours, table2).splitlines()[2:]
    assert [line.split(" | ")[0].lstrip("| ") for line in lines] == \
        [row["label"] for row in table2.values()] + ["(not in the paper)"]
    first = [c.strip() for c in lines[0].strip("|").split("|")]
    # accuracy ours, paper (as printed), Δ in points; then F1 …
    assert first[:5] == ["Ensemble All (Late Fusion)", row_key("late", FIVE), "93.00", "92.1", "+0.90"]
    assert lines[-1].split(" | ")[1] == "sum:x+y" and lines[1].count("–") == 2 * 4  # a row we did not run
    assert "| accuracy ours | accuracy paper | accuracy Δ | f1 ours |" in compare(ours, table2)  # paper's column order
    renamed = compare([{**ours[1], "key": "late:a+b+c+d+e"}], table2, dict(zip(FIVE, "abcde")))
    assert "| late:a+b+c+d+e | 93.00 | 92.1 | +0.90 |" in renamed
    assert "precision" not in compare(ours, EXPECTED["cub"]["table1"])  # Table I: accuracy and F1 only


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("dataset, table", [("cub", "table2"), ("inat", "table3")])
def test_make_targets_train_every_row_the_paper_has(dataset, table, tmp_path):
    """Read the ensemble commands `make paper-*` would run (dry run) and plan their rows."""
    stamp = tmp_path / "installed"
    stamp.touch()
    proc = subprocess.run(["make", "-n", "-s", "-C", str(REPO), f"paper-{dataset}", f"STAMP={stamp}",
                           f"PAPER_DIR={tmp_path}", f"{dataset.upper()}_ROOT=/data"],
                          capture_output=True, text=True, timeout=60, check=True)
    command = next(line for line in proc.stdout.replace("\\\n", " ").splitlines() if f"--name {table}" in line)
    strategies = re.search(r"--strategies (\S+)", command).group(1).split(",")
    combinations = re.search(r"--combinations (\S+)", command).group(1).split(",")
    members = re.search(r"--members (\S+)", command).group(1).split(",")
    assert members == FIVE
    planned = {row_key(c.strategy, c.members) for c in plan(members, strategies, combinations)}
    assert set(EXPECTED[dataset][table]) <= planned


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
    assert "## cub table2: ours beside the paper" in proc.stdout
    # the stand-ins take the paper's places: DINOv3 → test_vit, DINOv2 → test_convnext, ConvNeXt → test_resnet
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| Ens. (DINOv3 + DINOv2) |"))
    assert "| late:timm:test_vit+timm:test_convnext |" in row and "| 91.4 |" in row
    # a second run finds every step done: nothing is extracted or trained again
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    assert again.returncode == 0 and "fgembed" not in again.stderr
