"""The README's Python example runs as printed, on a store with the same member names."""
from __future__ import annotations

import re
from pathlib import Path

from .formats import write_feature_store

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "fit_run(" in b)  # the Python API section's example
    write_feature_store(tmp_path / "cache" / "cub.zarr", dims=(12, 8, 4),
                        names=("dinov3_vitl16", "dinov2_vitl14", "other"))  # the README's member names
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("epochs=150", "epochs=5"), str(README), "exec"), {})
    out = capsys.readouterr().out
    f1, f1_std = map(float, out.splitlines()[0].split())  # print(run.metrics["f1"], run.metrics["f1_std"])
    assert 0 < f1 <= 1 and f1_std >= 0
    methods = sorted(re.findall(r"^\| \d+ \| ([\w ]+) \| ([\w +]+) \|", out, re.M))
    assert methods == [("concat", "dinov3_vitl16 + dinov2_vitl14"), ("late fusion", "dinov3_vitl16 + dinov2_vitl14"),
                       ("single", "dinov2_vitl14"), ("single", "dinov3_vitl16")], out
    assert (tmp_path / "runs").is_dir()
