"""Run directories, ensembles and reports on a store with known structure."""
from __future__ import annotations

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from sklearn import metrics as skm

from fgembed.ensemble import Combination, plan, score
from fgembed.errors import FgembedError
from fgembed.fusion import SumProjection
from fgembed.report import compare, entry_record, format_table, write_report
from fgembed.runs import Run, RunConfig, fit_run
from fgembed.store import FeatureStore

from .formats import write_feature_store

FAST = dict(epochs=15, batch_size=64)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_feature_store(tmp_path_factory.mktemp("runs") / "f.zarr")


def test_run_directory_layout_weights_and_metrics(store, tmp_path):
    run = fit_run(store, RunConfig(features=("a",), seeds=(0, 1), **FAST), tmp_path)
    names = {p.name for p in run.path.iterdir()}
    assert names == {"config.json", "head-seed0.safetensors", "head-seed1.safetensors", "history.json",
                     "metrics.json", "logits.zarr"}
    assert json.loads((run.path / "config.json").read_text())["config"]["seeds"] == [0, 1]
    assert len(run.history()["1"]) == 15
    rows, test = run.logits("test")
    assert test.shape == (2, len(rows), 6)
    # plain zarr reads the logits; the weights reload into the head and give the same logits
    assert zarr.open_group(run.path / "logits.zarr", mode="r")["val"].shape[0] == 2
    head = run.config.make_head([24], "cpu")._network(24, 6)
    head.load_state_dict(load_file(str(run.path / "head-seed1.safetensors")))
    head.eval()
    X = store.features("a")[rows]
    np.testing.assert_allclose(head(torch.as_tensor(X)).detach().numpy(), test[1], rtol=1e-4, atol=1e-4)
    # metrics.json: per-seed numbers equal scikit-learn's; flat keys are their mean, _std their spread
    y = store.labels()[rows]
    f1s = [skm.f1_score(y, z.argmax(1), average="weighted") for z in test]
    assert [m["f1"] for m in run.metrics["per_seed"]] == pytest.approx(f1s)
    assert run.metrics["f1"] == pytest.approx(np.mean(f1s))
    assert run.metrics["f1_std"] == pytest.approx(np.std(f1s, ddof=1))
    assert run.metrics["accuracy"] == pytest.approx(np.mean([skm.accuracy_score(y, z.argmax(1)) for z in test]))
    assert run.metrics["f1"] > 0.5  # the classes are learnable


def test_same_config_is_reused_force_retrains_identically(store, tmp_path):
    config = RunConfig(features=("b",), **FAST)
    first = fit_run(store, config, tmp_path)
    again = fit_run(store, config, tmp_path)
    assert again.reused and again.path == first.path
    forced = fit_run(store, config, tmp_path, force=True)
    assert not forced.reused and forced.metrics["per_seed"] == first.metrics["per_seed"]  # same seed, same numbers
    other = fit_run(store, dataclasses.replace(config, lr=3e-3), tmp_path)
    assert other.path != first.path
    # settings that cannot matter do not split a configuration
    assert RunConfig(features=("b",), project="linear", l2=True) == RunConfig(features=("b",))


def test_an_interrupted_fit_leaves_no_run_and_its_leftovers_go(store, tmp_path):
    config = RunConfig(features=("a",), **FAST)
    run = fit_run(store, config, tmp_path)
    stale = run.path.with_name(f".{run.path.name}.tmp-999999999")  # a pid no process has
    stale.mkdir()
    (run.path / "metrics.json").unlink()  # as if killed before the run was complete
    again = fit_run(store, config, tmp_path)
    assert not again.reused and (again.path / "metrics.json").is_file() and not stale.exists()


def test_reextraction_invalidates_runs(tmp_path):
    store = write_feature_store(tmp_path / "s.zarr")
    run = fit_run(store, RunConfig(features=("a",), **FAST), tmp_path / "runs")
    store.prepare("a", {"source": "test", "member": "a", "pooling": "mean"}, 24, dtype="float32", overwrite=True)
    fresh = FeatureStore.open(store.path, "r+")
    for shard in range(fresh.n_shards):
        rows = fresh.shard_slice(shard)
        fresh.write_shard("a", shard, np.ones((rows.stop - rows.start, 24)), np.zeros(rows.stop - rows.start, np.uint8))
    assert fit_run(fresh, RunConfig(features=("a",), **FAST), tmp_path / "runs").path != run.path


def test_fusion_runs(store, tmp_path):
    pca = fit_run(store, RunConfig(features=("a", "c"), fusion="sum", **FAST), tmp_path)
    assert pca.metrics["input_dim"] == 24 and (pca.path / "projection.safetensors").is_file()
    assert pca.metrics["test_rows_dropped"] == 1  # the row that failed in c
    linear = fit_run(store, RunConfig(features=("a", "c"), fusion="sum", project="linear", project_dim=8, **FAST),
                     tmp_path)
    weights = load_file(str(linear.path / "head-seed0.safetensors"))
    assert weights["0.projections.0.weight"].shape == (8, 24) and weights["0.projections.1.weight"].shape == (8, 32)
    assert isinstance(linear.config.make_head([24, 32], "cpu")._network(56, 6)[0], SumProjection)
    concat = fit_run(store, RunConfig(features=("a", "b"), fusion="concat", l2=True, **FAST), tmp_path)
    assert concat.metrics["input_dim"] == 40
    level = fit_run(store, RunConfig(features=("a",), level="group", **FAST), tmp_path)
    assert level.logits("test")[1].shape[2] == 3


def test_bad_configs_are_refused(store, tmp_path):
    with pytest.raises(FgembedError, match="need a fusion"):
        RunConfig(features=("a", "b"))
    with pytest.raises(FgembedError, match="unknown fusion"):
        RunConfig(features=("a", "b"), fusion="mean")
    with pytest.raises(FgembedError, match="distinct"):
        RunConfig(features=("a",), seeds=(1, 1))
    with pytest.raises(FgembedError, match="no taxonomy level"):
        fit_run(store, RunConfig(features=("a",), level="genus", **FAST), tmp_path)


def test_plan_tokens():
    rows = plan(["a", "b", "c"], ["late", "concat"], ["pairs", "sum:full"])
    assert rows[:3] == [Combination("single", (m,)) for m in "abc"]
    assert Combination("sum", ("a", "b", "c")) in rows and Combination("late", ("a", "b", "c")) not in rows
    assert len(rows) == 3 + 3 * 2 + 1
    assert len(plan(["a", "b", "c"], ["late"], ["all"])) == 3 + 4
    with pytest.raises(FgembedError, match="combination 'a\\+x'"):
        plan(["a", "b"], ["late"], ["a+x"])
    with pytest.raises(FgembedError, match="unknown strategy"):
        plan(["a", "b"], ["vote"], ["all"])


def test_ensemble_scores_late_fusion_from_single_runs(store, tmp_path):
    base = RunConfig(features=("a",), seeds=(0, 1), **FAST)
    entries = score(store, tmp_path, plan(["a", "b", "c"], ["late", "concat", "sum"], ["full"]), base)
    assert [e.metrics["f1"] for e in entries] == sorted((e.metrics["f1"] for e in entries), reverse=True)
    late = next(e for e in entries if e.combination.strategy == "late")
    singles = [Run.load(p) for p in late.runs]
    # independent recomputation: common test rows, seed-wise logit average, scikit-learn F1
    rows = np.intersect1d(np.intersect1d(singles[0].logits("test")[0], singles[1].logits("test")[0]),
                          singles[2].logits("test")[0])
    y = store.labels()[rows]
    f1s = []
    for k in range(2):
        parts = []
        for run in singles:
            r, z = run.logits("test")
            parts.append(z[k][np.isin(r, rows)])
        f1s.append(skm.f1_score(y, np.mean(parts, 0).argmax(1), average="weighted"))
    assert late.metrics["f1"] == pytest.approx(np.mean(f1s))
    assert late.metrics["n_test"] == len(rows)
    best_single = max(e.metrics["f1"] for e in entries if e.combination.strategy == "single")
    assert late.metrics["f1"] >= best_single - 0.05  # complementary members: fusion is not worse
    # val-chosen weights are reported and sum to one
    weighted = score(store, tmp_path, [Combination("late", ("a", "b"))], base, late_weights="val")[0]
    assert sum(weighted.weights) == pytest.approx(1.0)


def test_late_fusion_refuses_runs_of_another_store(store, tmp_path):
    other = write_feature_store(tmp_path / "other.zarr", seed=1, per_class=30)
    base = RunConfig(features=("a",), **FAST)
    run_a = fit_run(store, base, tmp_path / "runs")
    run_b = fit_run(other, dataclasses.replace(base, features=("b",)), tmp_path / "runs")
    from fgembed.ensemble import _late
    with pytest.raises(FgembedError, match="different stores"):
        _late(store, [run_a, run_b], None, "logits", "equal")


def test_reports_in_every_format(store, tmp_path):
    base = RunConfig(features=("a",), **FAST)
    entries = score(store, tmp_path, plan(["a", "b"], ["late", "concat"], ["full"]), base)
    md = format_table(entries, "md")
    assert md.splitlines()[0].startswith("| # | Method") and "F1 (w)" in md and len(md.splitlines()) == 2 + 4
    rows = list(csv.DictReader(io.StringIO(format_table(entries, "csv"))))
    assert [float(r["f1"]) for r in rows] == pytest.approx([e.metrics["f1"] for e in entries])
    assert "\\toprule" in format_table(entries, "latex") and "late fusion" in format_table(entries, "latex")
    assert json.loads(format_table(entries, "json"))[0]["key"] == entry_record(entries[0])["key"]
    written = write_report(entries, tmp_path / "report", "t")
    assert written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads((tmp_path / "report" / "t.json").read_text())
    table = compare(records, {"single:a": {"accuracy": 50.0, "f1": None}, "sum:a+b": {"accuracy": 1.0}})
    a = next(r for r in records if r["key"] == "single:a")
    assert f"{100 * a['accuracy']:.2f} | " in table and f"{100 * a['accuracy'] - 50:.2f}" in table
    assert "| sum:a+b | – | – | 1.00 |" in table  # a row we did not run
    with pytest.raises(FgembedError, match="unknown format"):
        format_table(entries, "xlsx")
