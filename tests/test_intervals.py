"""Bootstrap intervals wired through runs (`fit`), ensemble tables (every row, every fused row's
paired difference to its best member) and every report format — each checked against an
independent computation: scipy.stats.bootstrap with scikit-learn's metrics on the very resamples
(`Resamples` draws what scipy draws from the same seed), and a numpy recomputation of the paired
differences from the runs' stored logits."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import zarr
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from fgembed.analysis.ensemble import Entry, score
from fgembed.analysis.plan import Combination, plan
from fgembed.analysis.report import FORMATS, compare, format_table, ranking_table
from fgembed.analysis.table_intervals import table_intervals
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.intervals import BootstrapConfig, RowPredictions
from fgembed.classify.rundir import Run
from fgembed.classify.views import ViewConfig
from fgembed.datasets.table import SPLIT_NAMES
from fgembed.errors import FgembedError

from .formats import write_feature_store

FAST = {"epochs": 4, "batch_size": 64}
KEYS = {"accuracy": "accuracy", "f1": "f1", "f1_macro": "f1_macro", "balanced_accuracy": "mean_class_accuracy"}


def config(*features: str, fusion: str = "single", view: dict | None = None, **head) -> RunConfig:
    return RunConfig(ViewConfig(features=features, fusion=fusion, **(view or {})), HeadConfig(**{**FAST, **head}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_feature_store(tmp_path_factory.mktemp("intervals") / "f.zarr")


def sk(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        if metric == "accuracy":
            return accuracy_score(y, pred)
        if metric == "balanced_accuracy":
            return balanced_accuracy_score(y, pred)
        return f1_score(y, pred, average="weighted" if metric == "f1" else "macro", zero_division=0)


def scipy_interval(metric: str, y: np.ndarray, preds: np.ndarray, n_resamples: int, seed: int) -> list[float]:
    """scipy's percentile interval of the seed-averaged metric (rows resampled jointly)."""
    res = stats.bootstrap((y, *preds), lambda t, *p: np.mean([sk(metric, t, q) for q in p]), paired=True,
                          vectorized=False, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    return list(res.confidence_interval)


def stored(run, prefix: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test rows, float32 logits, stored predictions) of a run, read with plain zarr."""
    group = zarr.open_group(run.path / "logits.zarr", mode="r")
    return group["test_rows"][:], group[f"{prefix}test"][:].astype(np.float32), group[f"{prefix}test_pred"][:]


def test_run_intervals_equal_scipy_bootstrap_and_are_kept_with_the_predictions(store, tmp_path):
    run = fit_run(store, config("a", seeds=(0, 1)), tmp_path, bootstrap=BootstrapConfig(150, seed=3))
    rows, logits, preds = stored(run)
    assert preds.dtype == np.int32 and preds.shape == logits.shape[:2]
    np.testing.assert_array_equal(preds, logits.argmax(2))  # what every reader of the logits sees
    y = store.labels()[rows]
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["bootstrap"] == {"n_resamples": 150, "seed": 3, "confidence": 0.95, "method": "percentile",
                              "rows": len(rows)}
    for metric, key in KEYS.items():
        np.testing.assert_allclose(m[f"{key}_ci"], scipy_interval(metric, y, preds, 150, 3), rtol=1e-6)
        assert m[f"{key}_ci"][0] <= m[key] <= m[f"{key}_ci"][1]


def test_held_out_and_multi_level_runs_resample_the_rows_they_score(store, tmp_path):
    held = fit_run(store, config("a", view={"holdout": 0.34}), tmp_path, bootstrap=BootstrapConfig(100, seed=1))
    rows, _, preds = stored(held)
    seen = ~np.isin(store.labels()[rows], held.metrics["holdout_classes"])
    assert 0 < seen.sum() < len(rows) and held.metrics["bootstrap"]["rows"] == held.metrics["n_test"] == seen.sum()
    expected = scipy_interval("accuracy", store.labels()[rows][seen], preds[:, seen], 100, 1)
    np.testing.assert_allclose(held.metrics["accuracy_ci"], expected, rtol=1e-6)

    levels = fit_run(store, config("a", levels=("group", "label")), tmp_path, bootstrap=BootstrapConfig(100, seed=2))
    rows, _, coarse = stored(levels, "group/")
    _, _, fine = stored(levels, "label/")
    m = levels.metrics
    np.testing.assert_allclose(m["levels"]["group"]["f1_ci"],
                               scipy_interval("f1", store.labels(level="group")[rows], coarse, 100, 2), rtol=1e-6)
    np.testing.assert_allclose(m["levels"]["label"]["f1_ci"], m["f1_ci"])  # the top level is the finest
    np.testing.assert_allclose(m["f1_ci"], scipy_interval("f1", store.labels()[rows], fine, 100, 2), rtol=1e-6)


def test_intervals_are_not_in_the_key_and_a_reused_run_gets_them_from_what_it_stored(store, tmp_path):
    plain = fit_run(store, config("b", seeds=(0, 1)), tmp_path, bootstrap=BootstrapConfig(0))
    assert not any(k.endswith("_ci") for k in plain.metrics) and "bootstrap" not in plain.metrics
    again = fit_run(store, config("b", seeds=(0, 1)), tmp_path, bootstrap=BootstrapConfig(120, seed=5))
    assert again.reused and again.path == plain.path
    on_disk = json.loads((again.path / "metrics.json").read_text())
    assert on_disk == again.metrics and on_disk["bootstrap"]["n_resamples"] == 120
    rows, _, preds = stored(again)
    expected = scipy_interval("f1_macro", store.labels()[rows], preds, 120, 5)
    np.testing.assert_allclose(on_disk["f1_macro_ci"], expected, rtol=1e-6)
    assert {k: v for k, v in on_disk.items() if not k.endswith("_ci") and k != "bootstrap"} == plain.metrics
    # a run written before predictions were kept: its logits are read back, to the same intervals
    shutil.rmtree(again.path / "logits.zarr" / "test_pred")
    older = fit_run(store, config("b", seeds=(0, 1)), tmp_path, bootstrap=BootstrapConfig(120, seed=6))
    assert older.metrics["bootstrap"]["seed"] == 6
    np.testing.assert_allclose(older.metrics["f1_macro_ci"],
                               scipy_interval("f1_macro", store.labels()[rows], preds, 120, 6), rtol=1e-6)
    # the same settings again: nothing recomputed, nothing rewritten
    stamp = (again.path / "metrics.json").stat().st_mtime_ns
    assert fit_run(store, config("b", seeds=(0, 1)), tmp_path, bootstrap=BootstrapConfig(120, seed=6)).metrics == \
        older.metrics
    assert (again.path / "metrics.json").stat().st_mtime_ns == stamp


def _resampled(metric: str, y: np.ndarray, preds: np.ndarray, drawn: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per resample (rows `drawn[b]` of the table), the seed-mean metric on the drawn rows in `keep`."""
    return np.array([np.mean([sk(metric, y[d[keep[d]]], p[d[keep[d]]]) for p in preds]) for d in drawn])


def test_ensemble_rows_and_paired_deltas_equal_a_numpy_recomputation(store, tmp_path):
    B, seed = 120, 4
    base = config("a", "b", "c", fusion="sum", seeds=(0, 1))
    entries = score(store, tmp_path, plan(["a", "b", "c"], ["late", "concat"], ["all"]), base, device="cpu",
                    bootstrap=BootstrapConfig(B, seed=seed))
    by = {(e.combination.strategy, e.combination.members): e for e in entries}
    singles = {m: by["single", (m,)] for m in "abc"}
    test = {m: stored(Run.load(singles[m].runs[0])) for m in "abc"}
    union = np.union1d(test["a"][0], test["c"][0])   # the table's test rows: c lacks one
    y = store.labels()[union]
    drawn = np.random.default_rng(seed).integers(0, len(union), (B, len(union)))

    def on_union(rows, preds):
        out = np.full((preds.shape[0], len(union)), -1)
        out[:, np.searchsorted(union, rows)] = preds
        return out, np.isin(union, rows)

    # a single row's interval is scipy's percentile interval on the table's resamples
    pa, keep_a = on_union(test["a"][0], test["a"][2])
    np.testing.assert_allclose(singles["a"].metrics["accuracy_ci"],
                               np.quantile(_resampled("accuracy", y, pa, drawn, keep_a), [0.025, 0.975]), rtol=1e-6)
    # the late row of all three, fused from the stored logits by numpy, against its best member
    common = test["c"][0]
    fused = np.mean([test[m][1][:, np.searchsorted(test[m][0], common)] for m in "abc"], axis=0).argmax(2)
    row = by["late", ("a", "b", "c")]
    assert row.metrics["bootstrap"]["rows"] == len(common)
    pf, keep = on_union(common, fused)
    members = {m: on_union(common, test[m][2][:, np.searchsorted(test[m][0], common)])[0] for m in "abc"}
    for metric, key in KEYS.items():
        points = {m: np.mean([sk(metric, y[keep], p[keep]) for p in members[m]]) for m in "abc"}
        best = row.metrics[f"delta_{key}_vs"]   # the best member's (equal points: either may be read against)
        assert points[best] >= max(points.values()) - 1e-12
        point = np.mean([sk(metric, y[keep], p[keep]) for p in pf]) - points[best]
        delta = _resampled(metric, y, pf, drawn, keep) - _resampled(metric, y, members[best], drawn, keep)
        assert row.metrics[f"delta_{key}"] == pytest.approx(point, abs=1e-9)
        np.testing.assert_allclose(row.metrics[f"delta_{key}_ci"], np.quantile(delta, [0.025, 0.975]), atol=1e-6)
        beyond = min((delta <= 1e-9).sum(), (delta >= -1e-9).sum())
        assert row.metrics[f"delta_{key}_p"] == pytest.approx(min(1.0, 2 * (1 + beyond) / (B + 1)))
    # an embedding fusion's row is paired through its own run's predictions
    concat = by["concat", ("a", "b")]
    assert {"delta_f1", "delta_f1_ci", "delta_f1_p", "f1_ci"} <= set(concat.metrics)
    assert "delta_f1" not in singles["b"].metrics


def test_identical_predictions_differ_by_nothing(store):
    rows = np.flatnonzero(store.split_codes() == SPLIT_NAMES["test"])
    y = store.labels()[rows]
    rng = np.random.default_rng(0)
    good = np.where(rng.random((2, len(rows))) < 0.8, y, (y + 1) % 6).astype(np.int32)
    bad = np.where(rng.random((2, len(rows))) < 0.4, y, (y + 2) % 6).astype(np.int32)
    entries = [Entry(Combination("single", ("a",)), {}, [], predictions=RowPredictions(rows, good)),
               Entry(Combination("single", ("b",)), {}, [], predictions=RowPredictions(rows, bad)),
               Entry(Combination("late", ("a", "b")), {}, [], predictions=RowPredictions(rows, good.copy()))]
    table_intervals(entries, {}, store, None, BootstrapConfig(300))
    fused = entries[2].metrics
    for key in KEYS.values():
        assert fused[f"delta_{key}_vs"] == "a"
        assert fused[f"delta_{key}"] == 0 and fused[f"delta_{key}_ci"] == [0.0, 0.0]
        assert fused[f"delta_{key}_p"] == 1.0
        assert fused[f"{key}_ci"] == entries[0].metrics[f"{key}_ci"]  # same rows, same resamples, same values


def _table_entries(with_intervals: bool = True) -> list[Entry]:
    """Five members, every subset late-fused, three seeds: the widest table a terminal shows."""
    import itertools

    five = ("dinov3_vitl16", "dinov2_vitl14", "convnextv2_large", "openclip_vitl14", "siglip_vitl16_256")
    entries = []
    for k in range(1, 6):
        for subset in itertools.combinations(five, k):
            v = 0.5 + 0.004 * len(entries)
            m = {key: v for key in ("accuracy", "precision", "recall", "f1", "f1_macro", "top5")}
            m |= {f"{key}_std": 0.0123 for key in list(m)} | {"seeds": [0, 1, 2], "mean_class_accuracy": v}
            if with_intervals:
                m |= {f"{key}_ci": [v - 0.0081, v + 0.0093] for key in KEYS.values()}
                m["bootstrap"] = BootstrapConfig().block(5794)
                if k > 1:
                    m |= {f"delta_{key}{s}": val for key in KEYS.values()
                          for s, val in (("", -0.0133), ("_ci", [-0.0214, -0.0041]), ("_p", 0.004),
                                         ("_vs", subset[0]))}
            entries.append(Entry(Combination("single" if k == 1 else "late", subset), m, []))
    return sorted(entries, key=lambda e: -e.metrics["f1"])


def test_every_format_shows_the_intervals_and_deltas():
    entries = _table_entries()
    md = format_table(entries, "md")
    top = entries[0].metrics
    assert f"{100 * top['f1']:.2f} ± 1.23 [{100 * top['f1_ci'][0]:.2f}, {100 * top['f1_ci'][1]:.2f}]" in md
    assert "| -1.33 [-2.14, -0.41] p=0.004 |" in md and "Δ F1 (w) vs best member" in md
    fused = [e for e in entries if len(e.combination.members) > 1]
    assert md.count("p=0.004") == len(fused) == 26  # a single member has no difference to itself: –
    latex = format_table(entries, "latex")
    assert r"$\Delta$ F1 (w) vs best member" in latex and "[-2.14, -0.41] p=0.004" in latex
    rows = list(csv.DictReader(io.StringIO(format_table(entries, "csv"))))
    assert float(rows[0]["f1_ci_lo"]) == pytest.approx(top["f1_ci"][0])
    assert float(rows[0]["delta_f1_p"]) == 0.004 and rows[0]["delta_f1_vs"] == entries[0].combination.members[0]
    assert rows[-1]["delta_f1"] == "" and rows[-1]["f1_ci_hi"] != ""
    record = json.loads(format_table(entries, "json"))[0]
    assert record["f1_ci"] == top["f1_ci"] and record["delta_f1_ci"] == [-0.0214, -0.0041]
    assert record["bootstrap"]["n_resamples"] == 1000
    assert set(FORMATS) == {"md", "csv", "latex", "json"}


def test_terminal_table_fits_80_columns_with_intervals():
    from rich.console import Console

    entries = _table_entries()
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    table, legend = ranking_table(entries)
    console.print(table)
    for line in legend:
        console.print(f"  {line}", highlight=False, markup=False)
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines) and not any("…" in line for line in lines)
    assert any(re.search(r"-1\.33 p=0\.004$", line) for line in lines)
    assert any(line.rstrip().endswith("[-2.14,-0.41]") for line in lines)
    assert any("bootstrap interval over the test images (1000 resamples)" in line for line in lines)


def test_without_intervals_nothing_changes_and_the_paper_table_shows_them():
    plain = _table_entries(with_intervals=False)
    md = format_table(plain, "md")
    assert "[" not in md and "Δ" not in md and "p=" not in md
    assert "_ci" not in format_table(plain, "csv").splitlines()[0] and "_ci" not in format_table(plain, "json")
    entries = _table_entries()
    records = json.loads(format_table(entries, "json"))
    full = next(r for r in records if len(r["members"]) == 5)
    expected = {"late:" + "+".join(full["members"]): {"f1": 0.9, "label": "Ensemble All"}}
    table = compare(records, expected)
    line = next(line for line in table.splitlines() if line.startswith("| Ensemble All"))
    assert f"{100 * full['f1']:.2f} ± 1.23 [{100 * full['f1_ci'][0]:.2f}, " in line
    assert line.rstrip(" |").endswith("-1.33 [-2.14, -0.41] p=0.004") and "gain vs best member" in table


def test_bootstrap_option_default_bad_values_and_off(store, tmp_path, capsys):
    from cli import _options
    from fgembed.cli.main import main

    assert _options.BOOTSTRAP.default == BootstrapConfig().n_resamples == 1000
    for command in (["fit", "--features", "a"], ["ensemble", "--members", "a,b"]):
        capsys.readouterr()
        assert main([*command, "--store", str(store.path), "--runs", str(tmp_path), "--bootstrap", "-1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--bootstrap" in err and "≥ 0" in err
    with pytest.raises(FgembedError, match="number of resamples"):
        BootstrapConfig(-5)
    args = ["--store", str(store.path), "--runs", str(tmp_path), "--epochs", "3", "--quiet", "--device", "cpu"]
    assert main(["fit", "--features", "a", *args, "--bootstrap", "0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "bootstrap" not in printed and not any(k.endswith("_ci") for k in printed)
    assert main(["ensemble", "--members", "a,b", "--strategies", "late", *args, "--bootstrap", "0",
                 "--format", "json", "--name", "off"]) == 0
    table = capsys.readouterr().out
    assert "_ci" not in table and "delta_" not in table and "[" not in (tmp_path / "off.md").read_text()
    assert main(["ensemble", "--members", "a,b", "--strategies", "late", *args, "--bootstrap", "50",
                 "--format", "md", "--name", "on"]) == 0
    assert "Δ F1 (w) vs best member" in capsys.readouterr().out


def test_the_chart_draws_the_intervals(tmp_path, monkeypatch):
    import matplotlib.axes

    from fgembed.analysis.report import bar_chart

    drawn = {}
    barh = matplotlib.axes.Axes.barh
    monkeypatch.setattr(matplotlib.axes.Axes, "barh",
                        lambda self, y, width, **kw: drawn.setdefault("xerr", kw["xerr"]) and barh(self, y, width, **kw))
    entries = _table_entries()[:4]
    bar_chart(entries, tmp_path / "chart.png")
    low, high = drawn["xerr"]  # bottom row first: the chart lists the best row on top
    assert low == pytest.approx([0.81] * 4) and high == pytest.approx([0.93] * 4)
