"""`fgembed predict`: new images through a run's recorded members, projection and heads."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fgembed.backbones import LoadOptions
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.views import ViewConfig
from fgembed.datasets import load_dataset
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.predict import format_predictions, image_table, predict
from fgembed.store import FeatureStore

from .conftest import run_cli

MEMBERS = ("timm:test_vit", "timm:test_resnet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, manifest_csv):
    """A store of the manifest images and three runs: two singles (two seeds) and a PCA sum."""
    tmp = tmp_path_factory.mktemp("predict")
    table = load_dataset("manifest", manifest_csv)
    extract(table, tmp / "s.zarr", list(MEMBERS),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp / "s.zarr")
    head = HeadConfig(epochs=3, seeds=(0, 1))
    runs = {name: fit_run(store, RunConfig(view=ViewConfig(features=(name,)), head=head), tmp / "runs", device="cpu")
            for name in MEMBERS}
    runs["sum"] = fit_run(store, RunConfig(view=ViewConfig(features=MEMBERS, fusion="sum"), head=head),
                          tmp / "runs", device="cpu")
    return tmp, table, store, runs


def _test_images(table, run):
    rows, _ = run.logits("test")
    return rows, [Path(table.root) / table.paths[r] for r in rows]


def _stored_top1(run) -> np.ndarray:
    _, logits = run.logits("test")
    return np.asarray(logits, np.float32).mean(0).argmax(1)


@pytest.mark.parametrize("which", ["timm:test_vit", "sum"])
def test_top1_equals_stored_test_logits(trained, which):
    _, table, _, runs = trained
    run = runs[which]
    rows, files = _test_images(table, run)
    predictions = predict([run.path], files, top_k=3, device="cpu", workers=0, progress=False)
    assert predictions.paths and len(predictions.paths) == len(rows)
    assert set(predictions.status) == {"ok"}
    # float16 logits may flip a near-tie: a few rows of tolerance (CONVENTIONS)
    assert (predictions.top_ids[:, 0] != _stored_top1(run)).sum() <= 2
    assert np.all(np.diff(predictions.top_probs, axis=1) <= 1e-9)  # best first
    assert np.all((predictions.top_probs > 0) & (predictions.top_probs <= 1))


def test_late_fusion_of_runs_and_bad_image(trained, tmp_path):
    _, table, store, runs = trained
    rows, files = _test_images(table, runs["timm:test_vit"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    folder = tmp_path / "new"
    folder.mkdir()
    for f in files[:4]:
        shutil.copy(f, folder / f.name)
    shutil.copy(bad, folder / bad.name)
    fused = predict([runs[m].path for m in MEMBERS], [folder], top_k=2, device="cpu", workers=0, progress=False)
    status = dict(zip(fused.paths, fused.status))
    assert status["broken.jpg"] == "unreadable" and list(status.values()).count("ok") == 4
    broken = fused.paths.index("broken.jpg")
    assert fused.top_ids[broken, 0] == -1
    # the fused top-1 equals averaging the two runs' stored test logits of the same images
    index = {Path(table.paths[r]).name: i for i, r in enumerate(rows)}
    stored = sum(np.asarray(runs[m].logits("test")[1], np.float32).mean(0) for m in MEMBERS)
    for path, top in zip(fused.paths, fused.top_ids[:, 0]):
        if path != "broken.jpg":
            assert top == stored[index[path]].argmax()
    records = list(csv.DictReader(io.StringIO(format_predictions(fused, "csv"))))
    assert list(records[0])[:4] == ["path", "status", "pred_1", "prob_1"]
    assert {r["pred_1"] for r in records if r["status"] == "ok"} <= set(store.class_names)
    assert [r["pred_1"] for r in records if r["status"] != "ok"] == [""]


def test_mismatched_recording_is_refused(trained, tmp_path):
    _, table, _, runs = trained
    copy = tmp_path / "run"
    shutil.copytree(runs["timm:test_vit"].path, copy)
    meta = json.loads((copy / "config.json").read_text())
    meta["store"]["features"]["timm:test_vit"]["fingerprint"]["pooling"] = "cls"
    meta["store"]["features"]["timm:test_vit"]["fingerprint"]["preprocessing"]["crop_pct"] = 0.5
    (copy / "config.json").write_text(json.dumps(meta))
    _, files = _test_images(table, runs["timm:test_vit"])
    with pytest.raises(FgembedError, match="cannot be rebuilt"):
        predict([copy], files[:2], device="cpu", workers=0, progress=False)


def test_image_table_inputs(tmp_path, manifest_csv):
    table = load_dataset("manifest", manifest_csv)
    files = [Path(table.root) / p for p in table.paths[:3]]
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "\n".join(str(f) for f in files) + "\n")
    assert len(image_table([listing])) == 3
    with pytest.raises(FgembedError, match="same image twice"):
        image_table([files[0], listing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FgembedError, match="no images"):
        image_table([tmp_path / "empty"])


def test_cli_writes_csv(trained, tmp_path):
    _, table, _, runs = trained
    _, files = _test_images(table, runs["timm:test_vit"])
    out = tmp_path / "preds.csv"
    proc = run_cli("predict", "--run", runs["timm:test_vit"].path, "--images", files[0], "--images", files[1],
                   "--out", out, "--top-k", "2", "--device", "cpu", "--workers", "0", "--quiet", check=True)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and {"pred_2", "prob_2"} <= set(rows[0]) and "wrote" in proc.stderr
    proc = run_cli("predict", "--run", runs["timm:test_vit"].path, "--images", files[0], "--format", "json",
                   "--device", "cpu", "--workers", "0", "--quiet", check=True)
    assert json.loads(proc.stdout)[0]["status"] == "ok"


@pytest.mark.parametrize("levels", [("family", "label"), ("order", "family")])
def test_a_multi_level_run_predicts_its_finest_level(cub_root, tmp_path, levels):
    """A run fitted with --levels is served like any other: its finest level's top-1 equals the
    stored test logits' argmax at that level, named by that level's names; for a species run the
    coarser levels are the class's ancestors."""
    table = load_dataset("cub", cub_root)
    extract(table, tmp_path / "cub.zarr", ["timm:test_vit"],
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp_path / "cub.zarr")
    head = HeadConfig(epochs=3, seeds=(0, 1), levels=levels, hierarchy="shared")
    run = fit_run(store, RunConfig(view=ViewConfig(features=("timm:test_vit",)), head=head), tmp_path / "runs",
                  device="cpu")
    rows, logits = run.logits("test", level=levels[-1])
    files = [Path(table.root) / table.paths[r] for r in rows]
    predictions = predict([run.path], files, top_k=2, device="cpu", workers=0, progress=False)
    assert (predictions.top_ids[:, 0] != np.asarray(logits, np.float32).mean(0).argmax(1)).sum() <= 2
    if levels[-1] == "label":
        assert predictions.class_names == store.class_names
        family_of = dict(zip(store.labels(), store.labels(level="family")))
        families = store.samples_attrs["levels"]["family"]
        assert predictions.levels["family"] == [families[family_of[c]] for c in predictions.top_ids[:, 0]]
    else:
        assert predictions.class_names == list(store.samples_attrs["levels"]["family"]) and not predictions.levels
