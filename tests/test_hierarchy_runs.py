"""Multi-level runs (`fgembed fit --levels`) and `fgembed novelty` on finished runs: metrics.json
against scikit-learn on the stored logits, the novelty table against scikit-learn on the stored
per-row scores, and the one-line errors users hit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fgembed.cli.main import app, main
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from typer.testing import CliRunner

from fgembed.analysis.novelty import read_scores
from fgembed.analysis.report import value
from fgembed.classify.hierarchy import predict_levels
from fgembed.classify.hierarchy_metrics import (
    DECODERS,
    SELECTIVE_TAUS,
    Taxonomy,
    consistency_rate,
    decode_path_product,
    mistake_severity,
    selective_curve,
    tau_key,
)
from fgembed.classify.config import HeadConfig
from fgembed.classify.metrics import summarise
from fgembed.classify.rundir import Run

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


def test_consistent_decoders_and_selective_points_in_metrics_equal_hierarchy_on_stored_logits(store_path, tmp_path):
    run = _fit(store_path, tmp_path, "--levels", "group,species", "--hierarchy", "independent", "--seeds", "0,1,2")
    m = run.metrics
    from fgembed.store import FeatureStore
    store = FeatureStore.open(store_path)
    tax = Taxonomy.from_store(store, ["group", "label"])
    rows = run.rows("test")
    ys = [store.labels(level="group")[rows], store.labels()[rows]]
    logits = [[run.logits("test", lv)[1][s].astype(np.float32) for lv in ("group", "label")] for s in range(3)]
    decoded = [decode_path_product(z, tax) for z in logits]
    pp = m["decoder"]["path_product"]
    assert pp["consistency"] == 1.0 and pp["consistency_std"] == 0.0  # consistent by construction
    for k, level in enumerate(("group", "label")):
        accs = [accuracy_score(ys[k], d[k]) for d in decoded]
        f1s = [f1_score(ys[k], d[k], average="weighted") for d in decoded]
        assert pp["levels"][level]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-9)
        assert pp["levels"][level]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-9)
        assert pp["levels"][level]["f1"] == pytest.approx(np.mean(f1s), abs=1e-9)
    assert pp["accuracy"] == pp["levels"]["label"]["accuracy"]
    severities = [mistake_severity(d[1], ys[1], tax) for d in decoded]
    assert pp["mistake_severity"] == pytest.approx(np.nanmean(severities), abs=1e-9)
    assert set(m["decoder"]) == set(DECODERS) and m["decoder"]["top_down"]["consistency"] == 1.0
    argmax = [consistency_rate([zk.argmax(1) for zk in z], tax) for z in logits]
    assert m["consistency"] == pytest.approx(np.mean(argmax), abs=1e-9)  # independent heads: not forced
    curves = [selective_curve(z, ys, SELECTIVE_TAUS) for z in logits]
    assert list(m["selective"]) == [tau_key(t) for t in SELECTIVE_TAUS]
    assert value(m, "selective.tau70.accuracy") == m["selective"]["tau70"]["accuracy"]  # report.py's dotted path
    for i, point in enumerate(m["selective"].values()):
        for key in ("accuracy", "specificity", "fine_fraction"):
            values = [c[key][i] for c in curves]
            assert point[key] == pytest.approx(np.mean(values), abs=1e-9)
            assert point[f"{key}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)


def test_level_grid_keeps_per_seed_the_setting_whose_own_run_validates_best(store_path, tmp_path):
    lrs, levels = ("1e-2", "3e-2"), ["--levels", "group,species", "--seeds", "0,1,2", "--weight-decay", "0.01"]
    grid = _fit(store_path, tmp_path, *levels, "--lr", ",".join(lrs))
    alone = {float(lr): _fit(store_path, tmp_path, *levels, "--lr", lr) for lr in lrs}
    for k, chosen in enumerate(grid.metrics["chosen"]):
        scores = {lr: np.mean(run.metrics["best_val_f1"][k]) for lr, run in alone.items()}  # mean over levels
        assert chosen == {"lr": max(scores, key=scores.get), "weight_decay": 0.01}
        assert [g["best_val_score"] for g in grid.metrics["grid"][k]] == pytest.approx(list(scores.values()))
        for level in ("group", "label"):  # the kept model is the chosen setting's own
            np.testing.assert_array_equal(grid.logits("test", level)[1][k],
                                          alone[chosen["lr"]].logits("test", level)[1][k])
    assert len({c["lr"] for c in grid.metrics["chosen"]}) == 2  # the seeds chose differently: a real choice


def test_hierarchy_cub_example_prints_both_tables(cub_root, tmp_path, capsys, monkeypatch):
    """examples/hierarchy_cub.py (what `make hierarchy-cub` runs after extraction) on a CUB-format
    store whose features are written through the store's API, as extraction writes them."""
    import importlib.util
    from pathlib import Path

    from fgembed.datasets import load_dataset
    from fgembed.store import FeatureStore

    store = FeatureStore.create(tmp_path / "cub.zarr", load_dataset("cub", cub_root), shard_rows=64)
    labels = store.labels()
    emb = np.eye(8)[labels] * 3 + np.random.default_rng(0).normal(size=(len(labels), 8))
    store.prepare("toy", {"source": "test"}, 8, dtype="float32")
    for shard in range(store.n_shards):
        rows = store.shard_slice(shard)
        store.write_shard("toy", shard, emb[rows], np.zeros(len(emb[rows]), np.uint8))
    store.mark_complete("toy", None)
    path = Path(__file__).resolve().parent.parent / "examples" / "hierarchy_cub.py"
    spec = importlib.util.spec_from_file_location("hierarchy_cub", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr("sys.argv", ["hierarchy_cub.py", "--store", str(tmp_path / "cub.zarr"), "--runs",
                                     str(tmp_path / "runs"), "--backbone", "toy", "--seeds", "0,1", "--epochs", "2",
                                     "--scores", "msp,knn", "--quiet", "--plots", str(tmp_path)])
    example.main()
    out = capsys.readouterr().out
    table = next(line for line in out.splitlines() if line.startswith("| independent |"))
    run = Run.load(next((tmp_path / "runs").glob("toy_independent-*")))
    assert f"{100 * run.metrics['levels']['family']['accuracy']:.2f}" in table
    assert "| knn | family |" in out and "| msp | label |" in out  # Zusin's table at both levels
    assert (tmp_path / "hierarchy-cub-selective.png").is_file() and (tmp_path / "hierarchy-cub-roc.png").is_file()


MEMBERS = ("timm:test_vit", "timm:test_resnet")


def test_a_multi_level_pca_sum_run_predicts_its_own_test_images(cub_root, tmp_path):
    """A multi-level run of a PCA sum view saves its fitted projection, as a single-level run does,
    so `predict` rebuilds the design rows: its top-1 equals the stored fine-level test logits'
    argmax on the same images (float16 ties: a couple of rows of tolerance)."""
    from pathlib import Path

    from fgembed.backbones import LoadOptions
    from fgembed.classify.config import RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig
    from fgembed.datasets import load_dataset
    from fgembed.extraction.extract import ExtractOptions, extract
    from fgembed.predict import predict
    from fgembed.store import FeatureStore

    table = load_dataset("cub", cub_root)
    extract(table, tmp_path / "cub.zarr", list(MEMBERS),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp_path / "cub.zarr")
    head = HeadConfig(epochs=3, seeds=(0, 1), levels=("family", "label"))
    run = fit_run(store, RunConfig(ViewConfig(features=MEMBERS, fusion="sum"), head), tmp_path / "runs", device="cpu")
    assert run.load_fusion().state() and Run.load(run.path).load_fusion().state()
    rows, logits = run.logits("test", level="label")
    files = [Path(table.root) / table.paths[r] for r in rows]
    predictions = predict([run.path], files, top_k=2, device="cpu", workers=0, progress=False)
    assert set(predictions.status) == {"ok"}
    assert (predictions.top_ids[:, 0] != np.asarray(logits, np.float32).mean(0).argmax(1)).sum() <= 2


def test_a_learned_projection_with_levels_is_refused(store_path, tmp_path, capsys):
    from fgembed.classify.config import RunConfig
    from fgembed.classify.views import ViewConfig
    from fgembed.errors import FgembedError

    with pytest.raises(FgembedError, match="use --project pca"):
        RunConfig(ViewConfig(features=("a", "c"), fusion="sum", project="linear"), HeadConfig(levels=("group", "label")))
    argv = ["fit", "--store", str(store_path), "--runs", str(tmp_path), "--features", "a+c", "--fusion", "sum",
            "--project", "linear", "--levels", "group,species", "--epochs", "1"]
    assert "--levels trains on a fixed view" in _one_error_line(capsys, argv)
    assert not list(tmp_path.iterdir())  # refused before any training


def test_multi_level_by_frequency_is_the_fine_levels_on_seen_rows(store_path, tmp_path):
    """`by_frequency` of the fine level, as single-level runs have it: per seed, accuracy per
    training-count bin of the argmax of the stored float16 fine logits on the seen test rows
    (held-out classes have no training rows: in no bin), against numpy."""
    from fgembed.store import FeatureStore

    run = _fit(store_path, tmp_path, "--levels", "group,species", "--seeds", "0,1", "--holdout", "0.34",
               "--holdout-level", "group", "--shot-bins", "10,30")
    store = FeatureStore.open(store_path)
    rows, z = run.logits("test", "label")
    held = run.metrics["holdout_classes"]
    y = store.labels()[rows]
    seen = ~np.isin(y, held)
    train = np.bincount(store.labels()[store.group["samples/split"][:] == 0], minlength=6)
    assert set(train) == {20}  # every class has 20 training rows in the store …
    per_seed = [float((z[k][seen].astype(np.float32).argmax(1) == y[seen]).mean()) for k in range(2)]
    for k, ref in enumerate(per_seed):  # … so the seen ones fall in `medium`; held-out ones (none in the view) in no bin
        bins = run.metrics["per_seed"][k]["by_frequency"]
        assert bins["medium"] == {"accuracy": pytest.approx(ref, abs=1e-12), "n_classes": 4,
                                  "n_test": int(seen.sum())}
        assert bins["few"] == bins["many"] == {"accuracy": None, "n_classes": 0, "n_test": 0}
    medium = run.metrics["by_frequency"]["medium"]
    assert medium["accuracy"] == pytest.approx(np.mean(per_seed)) and medium["accuracy_std"] == pytest.approx(
        np.std(per_seed, ddof=1))
    assert value(run.metrics, "by_frequency.medium.accuracy") == medium["accuracy"]  # report.py's dotted path
    assert Run.load(run.path).metrics["by_frequency"] == run.metrics["by_frequency"]


def test_a_format2_multi_level_run_is_retrained_a_single_level_one_reused(store_path, tmp_path):
    """Format 2's multi-level runs may lack `decoder`, `selective` and `by_frequency`: still read
    (predict needs only their weights) but `fit` retrains them (runs.FORMAT_VERSION); its
    single-level runs hold today's content: reused."""
    from fgembed.classify.rundir import FORMAT_VERSION

    levels = _fit(store_path, tmp_path, "--levels", "group,species")
    single = _fit(store_path, tmp_path)
    for run in (levels, single):
        meta = json.loads((run.path / "config.json").read_text())
        assert meta["format_version"] == FORMAT_VERSION == 3
        (run.path / "config.json").write_text(json.dumps(meta | {"format_version": 2}))
    metrics = json.loads((levels.path / "metrics.json").read_text())
    for key in ("decoder", "selective", "by_frequency"):  # as a format-2 run of last week wrote it
        del metrics[key]
    (levels.path / "metrics.json").write_text(json.dumps(metrics))
    old = Run.load(levels.path)  # readable, e.g. by `fgembed predict --run`
    assert old.meta["format_version"] == 2 and "decoder" not in old.metrics
    assert Run.load(single.path).meta["format_version"] == 2
    again = _fit(store_path, tmp_path, "--levels", "group,species")
    assert again.path == levels.path and {"decoder", "selective", "by_frequency"} <= set(again.metrics)
    assert json.loads((levels.path / "config.json").read_text())["format_version"] == FORMAT_VERSION
    result = runner.invoke(app, [*FIT, "--store", str(store_path), "--runs", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"] == str(single.path) and json.loads(result.stdout)["reused"]
    assert Run.load(single.path).meta["format_version"] == 2  # read as it is, not rewritten


def test_the_level_grid_moves_rows_and_labels_to_the_device_once(monkeypatch):
    """Every (lr, weight decay) setting and seed trains on the very same device tensors."""
    from fgembed.classify import hierarchy

    rng = np.random.default_rng(0)
    X, ys = rng.normal(size=(40, 8)).astype(np.float16), [np.arange(40) % 2, np.arange(40) % 4]
    seen, train_one = [], hierarchy._train_one

    def spy(module, X, Y, X_val, Y_val, *args):
        seen.append((X, Y, X_val, Y_val))
        return train_one(module, X, Y, X_val, Y_val, *args)

    monkeypatch.setattr(hierarchy, "_train_one", spy)
    fits = hierarchy.fit_levels_grid("shared", X, ys, X, ys, [2, 4], seeds=(0, 1), lrs=(1e-3, 1e-2),
                                     weight_decays=(0.0,), epochs=1, batch_size=16, hidden=(8,), device="cpu")
    assert len(fits) == 2 and len(seen) == 4  # 2 settings × 2 seeds
    assert all(all(a is b for a, b in zip(call, seen[0])) for call in seen)
    assert seen[0][0].dtype == torch.float16 and seen[0][1].shape == (2, 40)  # rows in their own dtype


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
    # alone, the multi-level run also gets Zusin's rows at the coarse level, from the coarse head
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
