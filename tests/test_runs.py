"""Run directories, ensembles and reports on a store with known structure."""
from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from sklearn import metrics as skm

import fgembed
from fgembed.analysis.ensemble import late_entries, score
from fgembed.analysis.plan import Combination, plan
from fgembed.analysis.interval_cells import interval_text
from fgembed.analysis.report import compare, entry_record, format_table, write_report
from fgembed.classify import fitting, rundir
from fgembed.classify._logits import create_logits, write_logits
from fgembed.classify.fusion import SumProjection
from fgembed.classify.config import ALWAYS_KEYED, HeadConfig, keyed_fields, run_key, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.rundir import FORMAT_VERSION, HOST, Run
from fgembed.classify.views import ViewConfig
from fgembed.errors import FgembedError
from fgembed.store import FeatureStore

from .formats import write_feature_store

FAST = {"epochs": 15, "batch_size": 64}


def config(*features: str, fusion: str = "single", view: dict | None = None, **head) -> RunConfig:
    return RunConfig(ViewConfig(features=features, fusion=fusion, **(view or {})), HeadConfig(**{**FAST, **head}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_feature_store(tmp_path_factory.mktemp("runs") / "f.zarr")


def test_run_directory_layout_weights_and_metrics(store, tmp_path):
    run = fit_run(store, config("a", seeds=(0, 1)), tmp_path)
    names = {p.name for p in run.path.iterdir()}
    assert names == {"config.json", "head-seed0.safetensors", "head-seed1.safetensors", "history.json",
                     "metrics.json", "logits.zarr"}
    meta = json.loads((run.path / "config.json").read_text())
    assert meta["config"]["head"]["seeds"] == [0, 1] and meta["format_version"] == FORMAT_VERSION
    assert len(run.history()["1"]) == 15
    rows, test = run.logits("test")
    assert test.shape == (2, len(rows), 6) and test.dtype == np.float16
    # plain zarr reads the logits, chunked by rows; streaming gives the same values
    array = zarr.open_group(run.path / "logits.zarr", mode="r")["val"]
    assert array.shape[0] == 2 and array.chunks[0] == 1
    np.testing.assert_array_equal(np.concatenate([z for _, z in run.iter_logits("test", 16)], axis=1), test)
    # the weights reload into the head and give the same logits (float16 storage: its rounding)
    heads = run.load_heads()
    X = store.features("a")[rows]
    np.testing.assert_allclose(heads[1].predict_logits(X), test[1].astype(np.float32), rtol=2e-3, atol=2e-2)
    # metrics.json: per-seed numbers equal scikit-learn's; flat keys are their mean, _std their spread
    y = store.labels()[rows]
    f1s = [skm.f1_score(y, z.astype(np.float32).argmax(1), average="weighted") for z in test]
    assert [m["f1"] for m in run.metrics["per_seed"]] == pytest.approx(f1s)
    assert run.metrics["f1"] == pytest.approx(np.mean(f1s))
    assert run.metrics["f1_std"] == pytest.approx(np.std(f1s, ddof=1))
    assert run.metrics["accuracy"] == pytest.approx(np.mean([skm.accuracy_score(y, z.argmax(1)) for z in test]))
    assert run.metrics["f1"] > 0.5  # the classes are learnable
    assert run.metrics["dropped"] == {"train": 0, "val": 0, "test": 0}
    assert run.metrics["chosen"] == [{"lr": 1e-3, "weight_decay": 0.01}] * 2 and "grid" not in run.metrics


def test_grid_keeps_the_best_setting_per_seed(store, tmp_path):
    run = fit_run(store, config("a", seeds=(0, 1), lr=(1e-3, 1e-2), weight_decay=(0.0, 0.05), epochs=4), tmp_path)
    for chosen, grid in zip(run.metrics["chosen"], run.metrics["grid"]):
        assert len(grid) == 4
        best = max(grid, key=lambda g: g["best_val_f1"])
        assert chosen == {"lr": best["lr"], "weight_decay": best["weight_decay"]}
    assert run.metrics["best_val_f1"] == [max(g["best_val_f1"] for g in grid) for grid in run.metrics["grid"]]


def test_same_config_is_reused_force_retrains_identically(store, tmp_path):
    cfg = config("b")
    first = fit_run(store, cfg, tmp_path)
    again = fit_run(store, cfg, tmp_path)
    assert again.reused and again.path == first.path
    forced = fit_run(store, cfg, tmp_path, force=True)
    assert not forced.reused and forced.metrics["per_seed"] == first.metrics["per_seed"]  # same seed, same numbers
    other = fit_run(store, dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, lr=3e-3)), tmp_path)
    assert other.path != first.path
    # settings that cannot matter do not split a configuration
    assert ViewConfig(features=("b",), project="linear", l2=True) == ViewConfig(features=("b",))
    assert HeadConfig(head="linear", hidden=(7,), dropout=0.1) == HeadConfig(head="linear")
    assert HeadConfig(level="species") == HeadConfig(level="label") == HeadConfig()
    assert ViewConfig(features=("b",), holdout_seed=3, draw=2) == ViewConfig(features=("b",))


def test_a_new_release_reuses_runs_and_unreadable_ones_retrain(store, tmp_path, monkeypatch):
    cfg = config("a")
    first = fit_run(store, cfg, tmp_path)
    # a run written by another fgembed release is reused: the version is recorded, not keyed
    meta = json.loads((first.path / "config.json").read_text())
    assert meta["fgembed_version"] == fgembed.__version__
    (first.path / "config.json").write_text(json.dumps(meta | {"fgembed_version": "0.0.1"}))
    monkeypatch.setattr("fgembed.classify.fitting.__version__", "99.0")
    again = fit_run(store, cfg, tmp_path)
    assert again.reused and again.path == first.path and again.metrics == first.metrics
    # a format this fgembed cannot read, or a config.json that is no run's: one line, and retrained
    for broken in (meta | {"format_version": 99}, meta | {"format_version": "garbage"}, [meta], "text"):
        (first.path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(FgembedError, match=f"{re.escape(first.path.name)} cannot be read as a run"):
            Run.load(first.path)
        retrained = fit_run(store, cfg, tmp_path)
        assert not retrained.reused and retrained.path == first.path
        written = json.loads((first.path / "config.json").read_text())
        assert written["format_version"] == FORMAT_VERSION and written["fgembed_version"] == "99.0"
        assert Run.load(first.path).config == cfg
    (first.path / "config.json").write_text("{not json")
    assert not fit_run(store, cfg, tmp_path).reused


def test_a_config_json_without_the_store_is_one_line_and_retrained(store, tmp_path):
    cfg = config("a")
    run = fit_run(store, cfg, tmp_path)
    meta = json.loads((run.path / "config.json").read_text())
    del meta["store"]
    (run.path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FgembedError, match=f"{re.escape(run.path.name)} cannot be read as a run .*store"):
        Run.load(run.path)
    again = fit_run(store, cfg, tmp_path)
    assert not again.reused and Run.load(again.path).store == run.store


def _as_format1(run: Run) -> None:
    """Rewrite a run directory as format 1 wrote it (the first release of runs): no format_version, a flat
    RunConfig, no dims / n_classes / excluded classes, float32 logits."""
    view, head = run.config.to_json()["view"], run.config.to_json()["head"]
    flat = {k: view[k] for k in ("features", "fusion", "project", "project_dim", "l2")} | {
        k: head[k] for k in ("head", "level", "epochs", "batch_size", "dropout", "hidden", "seeds")} | {
        "lr": head["lr"][0], "weight_decay": head["weight_decay"][0]}
    (run.path / "config.json").write_text(json.dumps({"config": flat, "store": run.store,
                                                      "store_path": run.meta["store_path"]}))
    group = zarr.open_group(run.path / "logits.zarr", mode="a")
    for split in ("val", "test"):
        values = group[split][:].astype(np.float32)
        del group[split]
        group.create_array(split, data=values)


@pytest.mark.parametrize("fusion, view", [("single", {}), ("sum", {"project": "linear", "project_dim": 8})])
def test_a_format1_run_is_read_and_reused(store, tmp_path, fusion, view):
    """A format-1 directory is read by `Run.load` (as `fgembed predict --run DIR` reads it): config,
    float32 logits, heads that reproduce them; and one at the path today's key gives is reused.
    Format 1 was keyed by an older formula (with fgembed's version), so a real format-1 run is not
    at that path: `fit` retrains it once (`runs.run_key`)."""
    features = ("a",) if fusion == "single" else ("a", "c")
    cfg = config(*features, fusion=fusion, view=view, epochs=3)
    run = fit_run(store, cfg, tmp_path)
    rows, z16 = run.logits("test")
    _as_format1(run)
    old = Run.load(run.path)
    assert old.config == cfg and old.meta["format_version"] == 1 and old.meta["n_classes"] == 6
    old_rows, z32 = old.logits("test")
    assert z32.dtype == np.float32 and np.array_equal(old_rows, rows) and np.array_equal(z32, z16.astype(np.float32))
    X = old.load_fusion([store.backbone_info(n).dim for n in features]).transform(
        [store.features(n)[rows] for n in features])
    np.testing.assert_allclose(old.load_heads()[0].predict_logits(X), z32[0], rtol=2e-3, atol=2e-2)
    reused = fit_run(store, cfg, tmp_path)  # at the path today's key gives: reused as it is
    assert reused.reused and reused.metrics == run.metrics


class Killed(Exception):
    pass


def test_a_publish_killed_between_its_renames_loses_no_run(store, tmp_path, monkeypatch):
    cfg = config("a")
    run = fit_run(store, cfg, tmp_path)
    rename, rmtree = os.rename, shutil.rmtree
    newer = {}

    def rename_tmp_dies(src, dst):
        if ".tmp-" in Path(src).name:
            newer.update(json.loads((Path(src) / "metrics.json").read_text()))
            raise Killed
        rename(src, dst)

    with monkeypatch.context() as m:  # killed after the old run went aside, before the new one came in
        m.setattr("fgembed.classify.rundir.os.rename", rename_tmp_dies)
        with pytest.raises(Killed):
            fit_run(store, cfg, tmp_path, force=True)
    assert not run.path.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        f".{run.path.name}.{kind}-{HOST}-{os.getpid()}" for kind in ("old", "tmp")]  # this host's, this process's
    recovered = fit_run(store, cfg, tmp_path)
    # the killed publish's run was whole (metrics.json is written last): it is the one put in place
    assert recovered.reused and recovered.path == run.path and recovered.metrics == newer
    assert newer["train_seconds"] != run.metrics["train_seconds"]  # the newer run, not the one set aside
    assert [p.name for p in tmp_path.iterdir()] == [run.path.name]  # the aside and the temp folder are gone
    (run.path / "metrics.json").unlink()  # a temp folder without metrics.json is no run: the aside comes back
    aside, dead = (run.path.with_name(f".{run.path.name}.{kind}-{HOST}-999999999") for kind in ("old", "tmp"))
    run.path.rename(aside)
    (aside / "metrics.json").write_text(json.dumps(run.metrics))
    dead.mkdir()
    restored = fit_run(store, cfg, tmp_path)
    assert restored.reused and restored.metrics == run.metrics and [p.name for p in tmp_path.iterdir()] == [
        run.path.name]

    def rmtree_aside_dies(path, *args, **kwargs):
        if ".old-" in Path(path).name:
            raise Killed
        rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:  # killed after the new run came in, before the old one was removed
        m.setattr("fgembed.classify.rundir.shutil.rmtree", rmtree_aside_dies)
        with pytest.raises(Killed):
            fit_run(store, cfg, tmp_path, force=True)
    assert (run.path / "metrics.json").is_file() and len(list(tmp_path.iterdir())) == 2
    assert fit_run(store, cfg, tmp_path).reused
    assert [p.name for p in tmp_path.iterdir()] == [run.path.name]


def test_a_fit_that_publishes_second_reuses_the_first_ones_run(store, tmp_path, monkeypatch):
    """Two fits of one key on this host both find its place empty (or both set a run aside): the
    second one's rename onto the place fails (ENOTEMPTY/EEXIST), and it returns the first's run."""
    cfg = config("a")
    theirs = fit_run(store, cfg, tmp_path / "theirs")
    path = tmp_path / "runs" / theirs.path.name
    rename = os.rename

    def another_fit_publishes_first(src, dst):
        if ".tmp-" in Path(src).name and not Path(dst).exists():
            shutil.copytree(theirs.path, dst)  # the other fit's rename lands between our check and ours
        rename(src, dst)

    for force in (False, True):  # the place empty; a run there, set aside by both
        with monkeypatch.context() as m:
            m.setattr("fgembed.classify.rundir.os.rename", another_fit_publishes_first)
            ours = fit_run(store, cfg, tmp_path / "runs", force=force)
        assert ours.reused and ours.path == path and ours.metrics == theirs.metrics
        assert Run.load(path).metrics == theirs.metrics and [p.name for p in path.parent.iterdir()] == [path.name]
        if not force:
            (path / "metrics.json").write_text(json.dumps(theirs.metrics | {"train_seconds": -1.0}))

    def disk_fails(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    with monkeypatch.context() as m, pytest.raises(OSError, match="Input/output"):  # any other failure raises
        m.setattr("fgembed.classify.rundir.os.rename", disk_fails)
        fit_run(store, cfg, tmp_path / "runs", force=True)


def test_a_run_published_while_this_fit_trained_is_kept_unless_forced(store, tmp_path, monkeypatch):
    """The ordinary race: another fit of the same key publishes while this one trains. Without
    --force this fit keeps theirs (a reader of it is not pulled from under); --force replaces it."""
    cfg = config("a")
    theirs = fit_run(store, cfg, tmp_path / "theirs")
    path = tmp_path / "runs" / theirs.path.name
    write = fitting.write_run_logits

    def another_fit_finishes_meanwhile(*args, **kwargs):
        if not path.exists():
            shutil.copytree(theirs.path, path)
        return write(*args, **kwargs)

    monkeypatch.setattr(fitting, "write_run_logits", another_fit_finishes_meanwhile)
    ours = fit_run(store, cfg, tmp_path / "runs")
    assert ours.reused and Run.load(path).metrics == theirs.metrics
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # our temp folder is gone
    forced = fit_run(store, cfg, tmp_path / "runs", force=True)
    assert not forced.reused and Run.load(path).metrics == forced.metrics != theirs.metrics


def test_another_hosts_leftovers_stay_until_a_day_old(store, tmp_path, monkeypatch):
    """A pid is only alive or dead on its own host: another host's temp folder or aside (a runs
    folder shared over the network) is left alone unless untouched for FOREIGN_ABANDONED_S."""
    cfg = config("a")
    run = fit_run(store, cfg, tmp_path)
    foreign_tmp = run.path.with_name(f".{run.path.name}.tmp-node-7.cluster-999999999")
    foreign_old = run.path.with_name(f".{run.path.name}.old-node-7.cluster-999999999")
    shutil.copytree(run.path, foreign_old)
    foreign_tmp.mkdir()
    shutil.rmtree(run.path)  # as if node-7 were between its renames right now
    assert fit_run(store, cfg, tmp_path).reused is False  # its aside is not taken: retrained in place
    assert foreign_tmp.is_dir() and foreign_old.is_dir()
    monkeypatch.setattr(rundir, "FOREIGN_ABANDONED_S", -1)  # now they count as untouched for a day
    assert fit_run(store, cfg, tmp_path).reused
    assert not foreign_tmp.exists() and not foreign_old.exists()


def test_stray_temp_names_are_left_alone_dead_ones_go(store, tmp_path):
    cfg = config("a")
    run = fit_run(store, cfg, tmp_path)
    stray = run.path.with_name(f".{run.path.name}.tmp-notapid")  # not a name fgembed writes
    dead = run.path.with_name(f".{run.path.name}.tmp-999999999")  # a pid no process has
    huge = run.path.with_name(f".{run.path.name}.tmp-{10 ** 30}")  # a number no pid can be
    for d in (stray, dead, huge):
        d.mkdir()
    forced = fit_run(store, cfg, tmp_path, force=True)
    assert not forced.reused and stray.is_dir() and not dead.exists() and not huge.exists()
    dead.mkdir()
    assert fit_run(store, cfg, tmp_path).reused  # reusing a run clears dead leftovers too
    assert stray.is_dir() and not dead.exists()


def test_an_interrupted_fit_leaves_no_run_and_its_leftovers_go(store, tmp_path):
    cfg = config("a")
    run = fit_run(store, cfg, tmp_path)
    stale = run.path.with_name(f".{run.path.name}.tmp-999999999")  # a pid no process has
    stale.mkdir()
    (run.path / "metrics.json").unlink()  # as if killed before the run was complete
    again = fit_run(store, cfg, tmp_path)
    assert not again.reused and (again.path / "metrics.json").is_file() and not stale.exists()


def test_reextraction_invalidates_runs(tmp_path):
    store = write_feature_store(tmp_path / "s.zarr")
    run = fit_run(store, config("a"), tmp_path / "runs")
    store.prepare("a", {"source": "test", "member": "a", "pooling": "mean"}, 24, dtype="float32", overwrite=True)
    fresh = FeatureStore.open(store.path, "r+")
    for shard in range(fresh.n_shards):
        rows = fresh.shard_slice(shard)
        fresh.write_shard("a", shard, np.ones((rows.stop - rows.start, 24)), np.zeros(rows.stop - rows.start, np.uint8))
    assert fit_run(fresh, config("a"), tmp_path / "runs").path != run.path


def test_fusion_runs(store, tmp_path):
    pca = fit_run(store, config("a", "c", fusion="sum"), tmp_path)
    assert pca.metrics["input_dim"] == 24 and (pca.path / "projection.safetensors").is_file()
    assert pca.metrics["test_rows_dropped"] == 1 and pca.metrics["dropped"]["test"] == 1  # failed in c
    assert pca.load_fusion().width() == 24
    # the saved projection and heads reproduce the stored logits from the members' embeddings
    rows, z = pca.logits("test")
    X = pca.load_fusion().transform([store.features(n)[rows] for n in ("a", "c")])
    assert (pca.load_heads()[0].predict_logits(X).argmax(1) != z[0].astype(np.float32).argmax(1)).sum() <= 2
    linear = fit_run(store, config("a", "c", fusion="sum", view={"project": "linear", "project_dim": 8}), tmp_path)
    weights = load_file(str(linear.path / "head-seed0.safetensors"))
    assert weights["0.projections.0.weight"].shape == (8, 24) and weights["0.projections.1.weight"].shape == (8, 32)
    assert isinstance(linear.load_heads()[0].module_[0], SumProjection)
    concat = fit_run(store, config("a", "b", fusion="concat", view={"l2": True}), tmp_path)
    assert concat.metrics["input_dim"] == 40
    level = fit_run(store, config("a", level="group"), tmp_path)
    assert level.logits("test")[1].shape[2] == 3


def test_holdout_runs_mask_and_record_novel_classes(store, tmp_path):
    run = fit_run(store, config("a", view={"holdout": 0.34, "holdout_level": "group"}, epochs=4), tmp_path)
    held = run.metrics["holdout_classes"]
    assert len(held) == 2 and held[0] // 2 == held[1] // 2  # one whole group of two classes
    assert json.loads((run.path / "config.json").read_text())["holdout_classes"] == held
    rows, test = run.logits("test")
    y = store.labels()[rows]
    novel = np.isin(y, held)
    assert run.metrics["n_novel"] == novel.sum() and run.metrics["n_test"] == (~novel).sum()
    assert (test[:, :, held] == np.finfo(np.float16).min).all()  # columns are store ids, masked
    assert set(held) == set(run.excluded_classes())
    acc = skm.accuracy_score(y[~novel], test[0][~novel].astype(np.float32).argmax(1))
    assert run.metrics["accuracy"] == pytest.approx(acc)  # scored on seen test rows only


def test_bad_configs_are_refused(store, tmp_path):
    with pytest.raises(FgembedError, match="need a fusion"):
        ViewConfig(features=("a", "b"))
    with pytest.raises(FgembedError, match="unknown fusion"):
        ViewConfig(features=("a", "b"), fusion="mean")
    with pytest.raises(FgembedError, match="distinct"):
        HeadConfig(seeds=(1, 1))
    with pytest.raises(FgembedError, match="distinct"):
        HeadConfig(lr=(1e-3, 1e-3))
    with pytest.raises(FgembedError, match="unknown head"):
        HeadConfig(head="mpl")
    with pytest.raises(FgembedError, match="no taxonomy level"):
        fit_run(store, config("a", level="genus"), tmp_path)


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
    base = config("a", seeds=(0, 1))
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
            parts.append(z[k][np.isin(r, rows)].astype(np.float32))
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
    run_a = fit_run(store, config("a"), tmp_path / "runs")
    run_b = fit_run(other, config("b"), tmp_path / "runs")
    with pytest.raises(FgembedError, match="different stores"):
        late_entries(store, {"a": run_a, "b": run_b}, [Combination("late", ("a", "b"))], None, "logits", "equal")


def test_reports_in_every_format(store, tmp_path):
    entries = score(store, tmp_path, plan(["a", "b"], ["late", "concat"], ["full"]), config("a"))
    md = format_table(entries, "md")
    assert md.splitlines()[0].startswith("| # | Method") and "F1 (w)" in md and len(md.splitlines()) == 2 + 4
    rows = list(csv.DictReader(io.StringIO(format_table(entries, "csv"))))
    assert [float(r["f1"]) for r in rows] == pytest.approx([e.metrics["f1"] for e in entries])
    assert "\\toprule" in format_table(entries, "latex") and "late fusion" in format_table(entries, "latex")
    assert json.loads(format_table(entries, "json"))[0]["key"] == entry_record(entries[0])["key"]
    written = write_report(entries, tmp_path / "report", "t")
    assert written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads((tmp_path / "report" / "t.json").read_text())
    # the paper's values are fractions (expected.json's units); the table prints percent
    table = compare(records, {"single:a": {"accuracy": 0.5, "f1": None}, "sum:a+b": {"accuracy": 0.01}})
    a = next(r for r in records if r["key"] == "single:a")
    ours = f"{100 * a['accuracy']:.2f}{interval_text(a['accuracy_ci'])} | "  # with its bootstrap interval
    assert ours in table and f"{100 * a['accuracy'] - 50:+.2f}" in table
    assert "| sum:a+b | sum:a+b | – | 1.0 | – |" in table  # a row we did not run
    with pytest.raises(FgembedError, match="unknown format"):
        format_table(entries, "xlsx")


# ---- logits writing and run keys ------------------------------------------------------------------

class _TwoLevels(torch.nn.Module):
    """A multi-output module (one logit tensor per level), as a hierarchy head's forward gives."""

    def __init__(self) -> None:
        super().__init__()
        self.coarse, self.fine = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5)

    def forward(self, x):
        return [self.coarse(x) * 5, self.fine(x) * 5]


def test_write_logits_stores_masked_float16_per_output_in_whole_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("fgembed.classify._logits.LOGIT_ROWS", 16)  # 50 rows: three whole blocks and a part
    torch.manual_seed(0)
    modules = [_TwoLevels(), _TwoLevels()]
    X = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float16)
    group = zarr.open_group(tmp_path / "l.zarr", mode="w")
    arrays = [create_logits(group, "coarse/test", 2, 50, 3), create_logits(group, "fine/test", 2, 50, 5)]
    given = []
    write_logits(arrays, modules, X, [np.array([1]), np.array([], np.int64)],
                 on_block=lambda k, start, blocks: given.append((k, start, [b.copy() for b in blocks])))
    stored = zarr.open_group(tmp_path / "l.zarr", mode="r")  # plain zarr reads them back
    for k, module in enumerate(modules):
        # the previous path per block: float32 forward on the host, masked, numpy's float16 cast
        with torch.no_grad():
            ref = [np.concatenate(z) for z in zip(*[[o.numpy() for o in module(torch.from_numpy(X[i:i + 16]).float())]
                                                    for i in range(0, 50, 16)])]
        ref[0][:, 1] = np.finfo(np.float16).min
        for name, r in zip(("coarse/test", "fine/test"), ref):
            np.testing.assert_array_equal(stored[name][k], r.astype(np.float16))
    assert stored["fine/test"].dtype == np.float16 and stored["fine/test"].chunks == (1, 16, 5)
    assert stored["fine/test"].compressors == ()
    # on_block saw every block once, in order, holding the values as stored
    assert [(k, s) for k, s, _ in given] == [(k, s) for k in range(2) for s in (0, 16, 32, 48)]
    for k, start, blocks in given:
        np.testing.assert_array_equal(blocks[1], stored["fine/test"][k, start:start + 16])


def test_a_failed_logits_write_raises_in_the_caller(tmp_path, monkeypatch):
    monkeypatch.setattr("fgembed.classify._logits.LOGIT_ROWS", 16)
    group = zarr.open_group(tmp_path / "l.zarr", mode="w")
    arrays = [create_logits(group, "coarse/test", 1, 50, 3), create_logits(group, "fine/test", 1, 50, 5)]

    def disk_full(k, start, blocks):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_logits(arrays, [_TwoLevels()], np.zeros((50, 8), np.float16), [np.array([], np.int64)] * 2,
                     on_block=disk_full)


KEY_IDENTITY = {"manifest_sha256": "0" * 64,
                "features": {m: {"fingerprint": f"{m}-fingerprint", "dtype": "float16"} for m in ("a", "b")}}


def test_run_keys_of_existing_runs_stay_and_a_new_default_field_keeps_them():
    """Keys as the release that hashed every field computed them: runs written before are found."""
    plain = RunConfig(ViewConfig(features=("a",)), HeadConfig())
    fused = RunConfig(ViewConfig(features=("a", "b"), fusion="concat", l2=True, holdout=0.2, shots=5),
                      HeadConfig(seeds=(0, 1), lr=(1e-3, 3e-3), balance="loss"))
    levels = RunConfig(ViewConfig(features=("a",)), HeadConfig(levels=("group", "species"), hierarchy="disentangled"))
    assert [run_key(c, KEY_IDENTITY) for c in (plain, fused, levels)] == PINNED_KEYS
    # a release that adds a field with a neutral default keeps every key; another value splits it
    NewView = dataclasses.make_dataclass("ViewConfig", [("new_option", int, 0)], bases=(ViewConfig,), frozen=True)
    NewHead = dataclasses.make_dataclass("HeadConfig", [("new_option", str, "off")], bases=(HeadConfig,), frozen=True)
    assert run_key(RunConfig(NewView(features=("a",)), NewHead()), KEY_IDENTITY) == PINNED_KEYS[0]
    assert run_key(RunConfig(NewView(features=("a",), new_option=1), HeadConfig()), KEY_IDENTITY) != PINNED_KEYS[0]
    assert run_key(RunConfig(ViewConfig(features=("a",)), NewHead(new_option="on")), KEY_IDENTITY) != PINNED_KEYS[0]
    # a field keyed from the start is keyed at its default too: its value is in the key
    assert '"epochs": 150' in json.dumps(keyed_fields(plain.head, ALWAYS_KEYED["head"]))


PINNED_KEYS = ["dc8818c374", "67f0f09a0d", "e2c8cc0b6b"]  # computed by the release that hashed every field
REQUIRED = "<required>"
PINNED_DEFAULTS = {
    ViewConfig: {"features": REQUIRED, "fusion": "single", "project": "pca", "project_dim": None, "l2": False,
                 "classes": None, "holdout": 0.0, "holdout_level": None, "holdout_seed": 0, "shots": None, "draw": 0},
    HeadConfig: {"head": "mlp", "level": None, "epochs": 150, "lr": (1e-3,), "weight_decay": (0.01,),
                 "batch_size": 128, "dropout": 0.5, "hidden": (512, 256), "seeds": (0,), "balance": "none",
                 "shot_bins": (20, 100), "levels": (), "hierarchy": "shared", "level_weights": None,
                 "teacher": (), "temperature": 4.0, "kd_alpha": 0.9, "kd_top_k": 64},
}


@pytest.mark.parametrize("cls", [ViewConfig, HeadConfig], ids=lambda c: c.__name__)
def test_config_defaults_are_pinned(cls):
    declared = {f.name: REQUIRED if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}
    assert declared == PINNED_DEFAULTS[cls], (
        f"{cls.__name__}'s fields or defaults changed. A run key leaves out a field while it holds its default "
        "(fgembed.classify.config.run_key), so changing a default would silently reuse runs trained under the old "
        "default as if trained under the new one. A changed default must come with a key change or migration "
        "(e.g. add the field to runs.ALWAYS_KEYED, or keep the old default and add an option); a new field needs "
        "a default that reproduces the old behaviour. Then update this pin.")
    # a default-constructed config holds its declared defaults (else its key would not be neutral)
    built = cls(features=("a",)) if cls is ViewConfig else cls()
    assert {k: getattr(built, k) for k, v in declared.items() if v is not REQUIRED} == \
        {k: v for k, v in declared.items() if v is not REQUIRED}
