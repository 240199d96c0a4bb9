"""`fgembed ensemble --levels`: late fusion of multi-level runs level by level, checked against a
numpy reference on the members' stored float16 logits (softmax-average or logit-average per
level, argmax, compared with the store's labels at that level), and the per-level columns of
the tables it writes."""
from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fgembed.cli.main import app
from scipy.special import softmax
from typer.testing import CliRunner

from fgembed.analysis import late_stream
from fgembed.analysis.ensemble import fused_levels, late_entries
from fgembed.analysis.plan import Combination
from fgembed.classify.longtail import by_frequency
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.rundir import Run
from fgembed.classify.views import ViewConfig
from fgembed.errors import FgembedError
from fgembed.store import FeatureStore

from .formats import write_feature_store

runner = CliRunner()
LEVELS = ("group", "label")
ENSEMBLE = ["ensemble", "--members", "a,b,c", "--strategies", "late", "--combinations", "all", "--levels",
            "group,species", "--epochs", "3", "--seeds", "0,1", "--quiet"]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A store (member c lost one test image), and `fgembed ensemble --levels … --late-mode proba`
    over its three members: (store path, runs dir, CLI result)."""
    root = tmp_path_factory.mktemp("ensemble-levels")
    write_feature_store(root / "f.zarr")
    result = runner.invoke(app, [*ENSEMBLE, "--store", str(root / "f.zarr"), "--runs", str(root / "runs"),
                                 "--late-mode", "proba", "--format", "json"])
    assert result.exit_code == 0, result.output
    return root / "f.zarr", root / "runs", result


def reference(runs: list[Run], store: FeatureStore, level: str, mode: str) -> list[float]:
    """Per seed: accuracy of the argmax of the members' averaged probabilities (or logits) at
    `level`, on the test rows every member has."""
    parts = [run.logits("test", level) for run in runs]
    common = parts[0][0]
    for rows, _ in parts[1:]:
        common = np.intersect1d(common, rows)
    y = store.labels(level=None if level == "label" else level)[common]
    accuracies = []
    for k in range(parts[0][1].shape[0]):
        picked = [z[k][np.searchsorted(rows, common)].astype(np.float32) for rows, z in parts]
        fused = np.mean([softmax(z, 1) if mode == "proba" else z for z in picked], 0)
        accuracies.append(float((fused.argmax(1) == y).mean()))
    return accuracies


def test_late_fusion_per_level_equals_numpy_on_stored_logits(fused):
    store_path, _, result = fused
    store = FeatureStore.open(store_path)
    records = json.loads(result.stdout)
    late = [r for r in records if r["strategy"] == "late"]
    assert len(late) == 4 and len(records) == 7  # 3 pairs + the trio, beside the 3 single runs
    for record in late:
        runs = [Run.load(p) for p in record["runs"]]
        assert [r.config.head.levels for r in runs] == [LEVELS] * len(runs)
        n = record["n_test"]  # the rows every member has (c lost one test image)
        assert n == len(functools.reduce(np.intersect1d, [r.rows("test") for r in runs]))
        per_seed = [m["levels"] for m in late_per_seed(runs, record)]
        for level in LEVELS:
            ref = reference(runs, store, level, "proba")
            ours = [seed[level]["accuracy"] for seed in per_seed]
            # float16 ties may flip an argmax: a couple of rows of tolerance
            np.testing.assert_allclose(ours, ref, atol=2.5 / n)
            assert record["levels"][level]["accuracy"] == pytest.approx(np.mean(ours), abs=1e-12)
            assert record["levels"][level]["accuracy_std"] == pytest.approx(np.std(ours, ddof=1), abs=1e-12)
            assert {"f1", "f1_std", "f1_macro", "top5"} <= set(record["levels"][level])
        assert record["accuracy"] == record["levels"]["label"]["accuracy"]  # the finest level on top
        assert record["avg_accuracy"] == pytest.approx(np.mean([record["levels"][lv]["accuracy"] for lv in LEVELS]))
        assert record["level_order"] == list(LEVELS)
    singles = [r for r in records if r["strategy"] == "single"]
    assert all(r["levels"] and r["avg_accuracy"] is not None for r in singles)


def late_per_seed(runs: list[Run], record: dict) -> list[dict]:
    """The late row's per-seed metrics, recomputed through the library (the JSON table keeps means)."""
    store = FeatureStore.open(runs[0].store_path)
    singles = {m: r for m, r in zip(record["members"], runs)}
    entry, = late_entries(store, singles, [Combination("late", tuple(record["members"]))], None, "proba", "equal")
    assert entry.metrics["levels"]["group"]["accuracy"] == pytest.approx(record["levels"]["group"]["accuracy"])
    return entry.metrics["per_seed"]


def test_logit_average_and_validation_weights_per_level(fused):
    store_path, _, result = fused
    store = FeatureStore.open(store_path)
    trio = next(r for r in json.loads(result.stdout) if r["strategy"] == "late" and len(r["members"]) == 3)
    runs = [Run.load(p) for p in trio["runs"]]
    singles = dict(zip(trio["members"], runs))
    entry, = late_entries(store, singles, [Combination("late", tuple(trio["members"]))], None, "logits", "equal")
    for level in LEVELS:
        ours = [m["levels"][level]["accuracy"] for m in entry.metrics["per_seed"]]
        np.testing.assert_allclose(ours, reference(runs, store, level, "logits"), atol=2.5 / entry.metrics["n_test"])
    calls = []
    fit_late_weights = late_stream.fit_late_weights

    def spy(parts, labels, mode):
        calls.append((parts, labels, fit := fit_late_weights(parts, labels, mode)))
        return fit

    with pytest.MonkeyPatch.context() as m:
        m.setattr(late_stream, "fit_late_weights", spy)
        weighted, = late_entries(store, singles, [Combination("late", tuple(trio["members"]))], None, "logits", "val")
    assert len(weighted.weights) == 3 and weighted.metrics["levels"].keys() == {"group", "label"}
    # per level, per seed: weights fitted on that level's validation logits and labels (every val row
    # the members share: fewer than WEIGHT_ROWS), in level order, coarse → fine
    val = {lv: [run.logits("val", lv) for run in runs] for lv in LEVELS}
    common = functools.reduce(np.intersect1d, [rows for rows, _ in val["label"]])
    assert len(calls) == len(LEVELS) * 2 and weighted.metrics["late_weight_rows"] == len(common)
    weights = {}
    for (parts, labels, fitted), (lv, k) in zip(calls, [(lv, k) for lv in LEVELS for k in range(2)], strict=True):
        np.testing.assert_array_equal(labels, store.labels(level=None if lv == "label" else lv)[common])
        for part, (rows, z) in zip(parts, val[lv], strict=True):
            np.testing.assert_array_equal(part, z[k][np.searchsorted(rows, common)].astype(np.float32))
        assert fitted.shape == (3,) and fitted.sum() == pytest.approx(1.0)
        weights[lv, k] = fitted
    assert weighted.weights == pytest.approx(np.mean([weights["label", k] for k in range(2)], 0), abs=1e-4)
    assert not np.allclose(weights["group", 0], weights["label", 0], atol=1e-3)  # the levels' own weights
    # the fused metrics: each level's logits weighted by that level's weights, against numpy
    test = {lv: [run.logits("test", lv) for run in runs] for lv in LEVELS}
    rows = functools.reduce(np.intersect1d, [r for r, _ in test["label"]])
    n = len(rows)
    for lv in LEVELS:
        y = store.labels(level=None if lv == "label" else lv)[rows]
        for k in range(2):
            fused = sum(w * z[k][np.searchsorted(r, rows)].astype(np.float32)
                        for w, (r, z) in zip(weights[lv, k], test[lv]))
            got = weighted.metrics["per_seed"][k]["levels"][lv]["accuracy"]
            assert got == pytest.approx(float((fused.argmax(1) == y).mean()), abs=2.5 / n)


def test_tables_carry_per_level_columns(fused):
    store_path, runs_dir, _ = fused
    md = runner.invoke(app, [*ENSEMBLE, "--store", str(store_path), "--runs", str(runs_dir), "--late-mode", "proba"])
    assert md.exit_code == 0, md.output  # every run is reused: only the tables are written again
    header = md.stdout.splitlines()[0]
    assert header.endswith("| Acc group | Acc species | Avg acc | Consistency | Mistake depth |"), header  # as typed
    rows = [line for line in md.stdout.splitlines()[2:] if line.startswith("|")]
    # every level column filled (a single row's – is its difference to itself: the Δ column)
    assert len(rows) == 7 and all("–" not in line.split(" | ", 10)[-1] for line in rows)
    table = list(csv.DictReader(io.StringIO((runs_dir / "ensemble.csv").read_text())))
    records = json.loads((runs_dir / "ensemble.json").read_text())
    for row, record, line in zip(table, records, rows, strict=True):
        assert float(row["levels.group.accuracy"]) == pytest.approx(record["levels"]["group"]["accuracy"])
        assert float(row["avg_accuracy_std"]) == pytest.approx(record["avg_accuracy_std"])
        assert float(row["consistency"]) == pytest.approx(record["consistency"])
        severity = f"{record['mistake_severity']:.2f} ± {record['mistake_severity_std']:.2f}"  # a depth, not %
        assert line.split(" | ")[-1] == severity + " |", line
    assert r"Acc group & Acc species & Avg acc & Consistency & Mistake depth \\" in (runs_dir / "ensemble.tex").read_text()


def hierarchy_reference(runs: list[Run], store: FeatureStore) -> list[dict]:
    """Per seed, from the members' stored float16 logits (softmax average → argmax per level, on
    the test rows every member has): consistency, mistake severity (mean LCA depth over mistakes:
    1 when the wrong class is in the right group, else 0) and `longtail.by_frequency` of the fine
    level (training rows per class counted from the store: no member lost a training image)."""
    parts = {lv: [run.logits("test", lv) for run in runs] for lv in LEVELS}
    common = functools.reduce(np.intersect1d, [rows for rows, _ in parts["label"]])
    fine, group = store.labels(), store.labels(level="group")
    parent = np.zeros(fine.max() + 1, np.int64)
    parent[fine] = group  # each fine class's group, read from the rows
    train = fine[store.group["samples/split"][:] == 0]
    y = fine[common]
    out = []
    for k in range(parts["label"][0][1].shape[0]):
        pred = {}
        for lv, members in parts.items():
            probs = [softmax(z[k][np.searchsorted(rows, common)].astype(np.float32), 1) for rows, z in members]
            pred[lv] = np.mean(probs, 0).argmax(1)
        wrong = pred["label"] != y
        out.append({"consistency": float((parent[pred["label"]] == pred["group"]).mean()),
                    "mistake_severity": float((parent[pred["label"]][wrong] == parent[y][wrong]).mean()),
                    "n_mistakes": int(wrong.sum()),
                    "by_frequency": by_frequency(y, pred["label"], np.bincount(train, minlength=len(parent)))})
    return out


def test_late_fusion_consistency_severity_and_by_frequency_equal_numpy(fused, monkeypatch):
    store_path, _, result = fused
    store = FeatureStore.open(store_path)
    late = [r for r in json.loads(result.stdout) if r["strategy"] == "late"]
    for record in late:
        runs = [Run.load(p) for p in record["runs"]]
        per_seed = late_per_seed(runs, record)
        n = record["n_test"]
        for ours, ref in zip(per_seed, hierarchy_reference(runs, store), strict=True):
            # float16 ties may flip an argmax: a couple of rows of tolerance
            assert ours["consistency"] == pytest.approx(ref["consistency"], abs=2.5 / n)
            assert ours["mistake_severity"] == pytest.approx(ref["mistake_severity"], abs=2.5 / ref["n_mistakes"])
            for name, bin_ in ref["by_frequency"].items():
                got = ours["by_frequency"][name]
                assert (got["n_classes"], got["n_test"]) == (bin_["n_classes"], bin_["n_test"])
                if bin_["n_test"]:
                    assert got["accuracy"] == pytest.approx(bin_["accuracy"], abs=2.5 / bin_["n_test"])
                else:
                    assert got["accuracy"] is None
        assert record["consistency"] == pytest.approx(np.mean([m["consistency"] for m in per_seed]), abs=1e-12)
        assert record["consistency_std"] == pytest.approx(np.std([m["consistency"] for m in per_seed], ddof=1))
        assert record["mistake_severity"] is not None and record["acc_medium"] is not None
    # streamed: 64-row blocks (the smallest) give the very same counts and sums as one block
    trio = next(r for r in late if len(r["members"]) == 3)
    singles = {m: Run.load(p) for m, p in zip(trio["members"], trio["runs"])}
    combo = [Combination("late", tuple(trio["members"]))]
    whole = late_entries(store, singles, combo, None, "proba", "equal")[0].metrics["per_seed"]
    monkeypatch.setattr(late_stream, "BLOCK_ELEMENTS", 1)
    assert late_stream._block_rows(3, 8) < trio["n_test"]
    assert late_entries(store, singles, combo, None, "proba", "equal")[0].metrics["per_seed"] == whole


def test_single_level_member_fuses_the_finest_level_only(fused):
    store_path, runs_dir, _ = fused
    result = runner.invoke(app, [*ENSEMBLE[:2], "a,b@knn", *ENSEMBLE[3:], "--store", str(store_path), "--runs",
                                 str(runs_dir), "--format", "json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "finest level" in line]
    assert len(warnings) == 1 and "single-level (b@knn)" in warnings[0], result.stderr
    records = {r["strategy"] + ":" + "+".join(r["members"]): r for r in json.loads(result.stdout)}
    late = records["late:a+b@knn"]
    assert late["levels"] is None and late["avg_accuracy"] is None
    runs = [Run.load(p) for p in late["runs"]]
    assert runs[0].config.head.levels == LEVELS and runs[1].config.head.levels == ()
    assert runs[1].config.head.head == "knn" and runs[1].config.head.level is None  # trained on the finest level
    store = FeatureStore.open(store_path)
    rows_a, z_a = runs[0].logits("test", "label")
    rows_b, z_b = runs[1].logits("test")
    assert np.array_equal(rows_a, rows_b)
    y = store.labels()[rows_a]
    fused_p = (softmax(z_a[0].astype(np.float32), 1) + softmax(z_b[0].astype(np.float32), 1)) / 2  # mixed heads: proba
    assert late["accuracy"] == pytest.approx((fused_p.argmax(1) == y).mean(), abs=2.5 / len(y))
    assert records["single:b@knn"]["levels"] is None and records["single:a"]["levels"]


def _fake(levels: tuple[str, ...], level: str | None = None) -> Run:
    head = HeadConfig(levels=levels) if levels else HeadConfig(head="knn", level=level)
    return Run(Path("nowhere"), RunConfig(ViewConfig(features=("a",)), head), {})


def test_members_must_share_levels_and_the_finest_level():
    with pytest.raises(FgembedError, match="must share their --levels: a group,label; b order,label"):
        fused_levels({"a": _fake(("group", "label")), "b": _fake(("order", "label"))}, None)
    with pytest.raises(FgembedError, match="trained on the finest level 'label'; b is not"):
        fused_levels({"a": _fake(("group", "label")), "b": _fake((), level="group")}, None)
    levels, per_level = fused_levels({"a": _fake(("group", "label")), "b": _fake(("group", "label"))}, None)
    assert [(lv.name, lv.groups) for lv in levels] == [("group", ("group", "group")), ("label", ("label", "label"))]
    assert per_level
    levels, per_level = fused_levels({"a": _fake(()), "b": _fake(())}, "group")
    assert [(lv.name, lv.groups) for lv in levels] == [("group", (None, None))] and not per_level
