"""Multi-level runs (`fgembed fit --levels`) and `fgembed novelty` on finished runs: metrics.json
against scikit-learn on the stored logits, the novelty table against scikit-learn on the stored
per-row scores, and the one-line errors users hit."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fgembed.cli.main import app, main
from sklearn.metrics import accuracy_score, roc_auc_score
from typer.testing import CliRunner

from fgembed.hierarchy import predict_levels
from fgembed.novelty import read_scores
from fgembed.runs import HeadConfig, Run, summarise

from .formats import write_feature_store

runner = CliRunner()
FIT = ["fit", "--features", "a", "--epochs", "3", "--quiet"]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("levels") / "f.zarr"
    write_feature_store(path)
    return path


def _fit(store_path, runs, *extra):
    result = runner.invoke(app, [*FIT, "--store", str(store_path), "--runs", str(runs), "--json", *extra])
    assert result.exit_code == 0, result.output
    return Run.load(json.loads(result.stdout)["run"])


@pytest.mark.parametrize("hierarchy", ["shared", "disentangled"])
def test_level_metrics_equal_sklearn_on_stored_logits(store_path, tmp_path, hierarchy):
    run = _fit(store_path, tmp_path, "--levels", "group,species", "--hierarchy", hierarchy, "--seeds", "0,1")
    m = run.metrics
    from fgembed.store import FeatureStore
    store = FeatureStore.open(store_path)
    for level, key in (("group", "group"), ("label", None)):
        rows, z = run.logits("test", level)
        y = store.labels(level=key)[rows]
        accs = [accuracy_score(y, z[s].astype(np.float32).argmax(1)) for s in range(2)]
        assert m["levels"][level]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-9)
        assert m["levels"][level]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-9)
    assert m["accuracy"] == m["levels"]["label"]["accuracy"]  # fine level's keys at the top
    assert m["avg_accuracy"] == pytest.approx(np.mean([m["levels"][lv]["accuracy"] for lv in ("group", "label")]))
    assert 0 <= m["consistency"] <= 1 and "consistency_std" in m
    stored = [run.logits("test", level)[1][1].astype(np.float32) for level in ("group", "label")]
    for z, ref in zip(predict_levels(run.load_heads()[1], store.features("a")[rows]), stored):  # weights reload
        np.testing.assert_allclose(z, ref, rtol=2e-3, atol=2e-3)


def test_single_level_key_is_unchanged_by_the_new_fields():
    assert HeadConfig(hierarchy="disentangled", level_weights=(1, 2)) == HeadConfig()
    assert HeadConfig(levels=("order", "species")).levels == ("order", "label")


def test_summarise_skips_seeds_without_a_value_at_every_depth():
    out = summarise([{"levels": {"a": {"x": 1.0}}, "s": None}, {"levels": {"a": {"x": 3.0}}, "s": 2.0},
                     {"levels": {"a": {"x": 2.0}}, "s": 4.0}])
    assert out["levels"]["a"] == {"x": 2.0, "x_std": 1.0} and out["s"] == 3.0
    assert out["s_std"] == pytest.approx(np.std([2.0, 4.0], ddof=1))
    assert summarise([{"s": None}, {"s": None}]) == {"s": None, "s_std": None}


def test_novelty_table_auroc_equals_sklearn_on_stored_scores(store_path, tmp_path):
    run = _fit(store_path, tmp_path, "--holdout", "0.34", "--holdout-level", "group")
    plot = tmp_path / "roc.png"
    result = runner.invoke(app, ["novelty", str(run.path), "--scores", "msp,energy,knn,mahalanobis",
                                 "--format", "json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    scores, rows, novel = read_scores(run.path)
    assert novel.any() and not novel.all() and plot.is_file()
    np.testing.assert_array_equal(rows, run.rows("test"))
    for record in records:
        assert record["auroc"] == pytest.approx(roc_auc_score(novel, scores[record["score"]]), abs=1e-9)
    assert {r["score"] for r in records} == {"msp", "energy", "knn", "mahalanobis"}
    # a multi-level run of the same view is scored on its fine level, and fuses with the first
    levels = _fit(store_path, tmp_path, "--holdout", "0.34", "--holdout-level", "group", "--levels", "group,species")
    fused = runner.invoke(app, ["novelty", str(run.path), str(levels.path), "--scores", "msp,knn", "--format", "json"])
    assert fused.exit_code == 0, fused.output
    scores, _, novel = read_scores(run.path)
    assert [r["auroc"] for r in json.loads(fused.stdout)] == pytest.approx(
        [roc_auc_score(novel, scores[name]) for name in ("msp", "msp", "knn")], abs=1e-9)
    # alone, the multi-level run also gets 001's rows at the coarse level, from the coarse head
    alone = runner.invoke(app, ["novelty", str(levels.path), "--scores", "msp,energy", "--format", "json"])
    assert alone.exit_code == 0, alone.output
    coarse = [r for r in json.loads(alone.stdout) if r["level"] == "group"]
    scores, _, novel = read_scores(levels.path, level="group")
    assert coarse and novel.any()
    for record in coarse:
        assert record["auroc"] == pytest.approx(roc_auc_score(novel, scores[record["score"]]), abs=1e-9)


def _one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "Traceback" not in captured.err + captured.out and len(lines) == 1, captured.err
    return lines[0]


def test_one_line_errors(store_path, tmp_path, capsys):
    base = [*FIT, "--store", str(store_path), "--runs", str(tmp_path)]
    assert "unknown --hierarchy 'tree'" in _one_error_line(capsys, [*base, "--levels", "group,species",
                                                                    "--hierarchy", "tree"])
    assert "--level-weights needs 2" in _one_error_line(capsys, [*base, "--levels", "group,species",
                                                                 "--level-weights", "1,1,1"])
    run = _fit(store_path, tmp_path)
    assert "held no classes out" in _one_error_line(capsys, ["novelty", str(run.path)])
    assert "unknown novelty score odin" in _one_error_line(capsys, ["novelty", str(run.path), "--scores", "msp,odin"])
