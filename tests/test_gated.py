"""Input-gated late fusion (`--strategies gated`): the gated run's logits against a numpy
recomputation, the untrained gate against late fusion, the rows its gate saw, the table, predict,
and the error paths."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.numpy import load_file
from scipy.special import softmax
from sklearn.metrics import accuracy_score, f1_score

from fgembed.backbones import LoadOptions
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.gate import GateConfig
from fgembed.classify.gated import fit_gated
from fgembed.classify.views import ViewConfig
from fgembed.cli.main import main
from fgembed.datasets import load_dataset
from fgembed.datasets.table import SPLIT_NAMES
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.predict import predict
from fgembed.store import FeatureStore

from .formats import write_feature_store
from .test_usage_errors import _one_error_line

MEMBERS = ("a", "b", "c")
HEAD = HeadConfig(epochs=5, seeds=(0, 1))
GATE = GateConfig(epochs=30)


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """A generated store (the third member lacks one test image) and a single run per member."""
    tmp = tmp_path_factory.mktemp("gated")
    store = write_feature_store(tmp / "s.zarr")
    runs = {m: fit_run(store, RunConfig(ViewConfig(features=(m,)), HEAD), tmp / "runs", device="cpu") for m in MEMBERS}
    return tmp, store, runs


@pytest.fixture(scope="module")
def gated(singles):
    tmp, store, runs = singles
    return {mode: fit_gated(store, [runs[m] for m in MEMBERS], tmp / "runs", mode=mode, config=GATE, device="cpu")
            for mode in ("logits", "proba")}


def _gate_input(store: FeatureStore, names, rows) -> np.ndarray:
    parts = [store.embeddings(n)[rows].astype(np.float64) for n in names]
    return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)


def _numpy_gate(run, seed: int, x: np.ndarray) -> np.ndarray:
    """The gate's forward in numpy from its saved weights (Linear → ReLU → Linear → softmax)."""
    w = load_file(str(run.path / f"gate-seed{seed}.safetensors"))
    hidden = np.maximum(x @ w["net.0.weight"].T + w["net.0.bias"], 0)
    return softmax(hidden @ w["net.3.weight"].T + w["net.3.bias"], axis=1)


def _member_logits(runs, rows, split="test") -> np.ndarray:
    """[members, seeds, rows, classes] float64 of the members' stored logits at store `rows`."""
    out = []
    for m in MEMBERS:
        own, z = runs[m].logits(split)
        out.append(z[:, np.searchsorted(own, rows)].astype(np.float64))
    return np.stack(out)


@pytest.mark.parametrize("mode", ["logits", "proba"])
def test_gated_logits_equal_a_numpy_recomputation(singles, gated, mode):
    _, store, runs = singles
    run = gated[mode]
    rows, stored = run.logits("test")
    assert len(rows) == (store.split_codes() == SPLIT_NAMES["test"]).sum() - 1  # the row c lacks is left out
    x = _gate_input(store, MEMBERS, rows)
    z = _member_logits(runs, rows)
    y = store.labels()[rows]
    for k, seed in enumerate(run.config.head.seeds):
        w = _numpy_gate(run, seed, x)
        assert w.std(0).max() > 1e-3  # the gate weighs images differently: not a constant in disguise
        if mode == "logits":
            expected = np.einsum("rm,mrc->rc", w, z[:, k])
        else:
            expected = np.log(np.einsum("rm,mrc->rc", w, softmax(z[:, k], axis=2)))
        np.testing.assert_allclose(stored[k].astype(np.float64), expected, rtol=2e-3, atol=2e-3)
        pred = stored[k].astype(np.float32).argmax(1)
        assert run.metrics["per_seed"][k]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert run.metrics["per_seed"][k]["f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
        mean_w = np.asarray(run.metrics["gate_weights"][k])
        np.testing.assert_allclose(mean_w, w.mean(0), atol=1e-3)


def test_an_untrained_gate_is_late_fusion(singles):
    """epochs 0 keeps the zero-initialised gate: equal weights on every image, i.e. late fusion."""
    tmp, store, runs = singles
    run = fit_gated(store, [runs[m] for m in MEMBERS], tmp / "runs", config=GateConfig(epochs=0), device="cpu")
    rows, stored = run.logits("test")
    late = _member_logits(runs, rows).mean(0)
    np.testing.assert_allclose(stored.astype(np.float64), late, rtol=2e-3, atol=2e-3)
    assert (stored.astype(np.float32).argmax(2) != late.argmax(2)).sum() <= 2  # float16 ties (CONVENTIONS)
    assert run.metrics["best_epoch"] == [0, 0]
    np.testing.assert_allclose(run.metrics["gate_weights"], 1 / 3, atol=1e-4)


def test_the_gate_never_reads_a_test_row(singles, gated, tmp_path):
    """The rows it trained and selected on are validation rows; and with every test embedding and
    every member's test logits replaced by noise, the same gates come out."""
    tmp, store, runs = singles
    run = gated["logits"]
    seen = load_file(str(run.path / "gate_rows.safetensors"))
    split = store.split_codes()
    assert len(seen["fit"]) and len(seen["select"]) and not np.intersect1d(seen["fit"], seen["select"]).size
    both = np.concatenate([seen["fit"], seen["select"]])
    assert (split[both] == SPLIT_NAMES["val"]).all()
    assert set(both) == set(runs["a"].rows("val"))  # every shared validation row, none twice

    noisy = tmp_path / "s.zarr"
    shutil.copytree(store.path, noisy)
    test = np.flatnonzero(split == SPLIT_NAMES["test"])
    rng = np.random.default_rng(7)
    for m in MEMBERS:
        emb = zarr.open_array(noisy / "features" / m / "emb", mode="r+")
        data = emb[:]
        data[test] = rng.normal(size=(len(test), data.shape[1]))
        emb[:] = data
    copies = []
    for m in MEMBERS:
        copy = tmp_path / "runs" / runs[m].path.name
        shutil.copytree(runs[m].path, copy)
        logits = zarr.open_array(copy / "logits.zarr" / "test", mode="r+")
        logits[:] = rng.normal(size=logits.shape).astype(np.float16)
        copies.append(type(runs[m]).load(copy))
    again = fit_gated(FeatureStore.open(noisy), copies, tmp_path / "runs", config=GATE, device="cpu")
    for seed in run.config.head.seeds:
        ours, theirs = (load_file(str(r.path / f"gate-seed{seed}.safetensors")) for r in (run, again))
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert run.history() == again.history()
    assert not np.array_equal(run.logits("test")[1], again.logits("test")[1])  # the noise did reach the test rows


def test_the_table_holds_gated_beside_late_and_late_val(singles, capsys):
    tmp, store, runs = singles
    argv = ["ensemble", "--store", str(store.path), "--runs", str(tmp / "runs"), "--members", ",".join(MEMBERS),
            "--strategies", "late,gated", "--combinations", "full", "--late-weights", "equal,val",
            "--epochs", "5", "--seeds", "0,1", "--device", "cpu", "--quiet"]
    assert main([*argv, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    fused = {r["strategy"]: r for r in records if len(r["members"]) == 3}
    assert set(fused) == {"late", "late-val", "gated"}
    assert [r["f1"] for r in records] == sorted((r["f1"] for r in records), reverse=True)
    gated_run = json.loads((Path(fused["gated"]["runs"][0]) / "metrics.json").read_text())
    assert fused["gated"]["f1"] == gated_run["f1"] and fused["gated"]["accuracy"] == gated_run["accuracy"]
    assert len(fused["gated"]["late_weights"]) == 3 and sum(fused["gated"]["late_weights"]) == pytest.approx(1, abs=1e-3)
    assert fused["late"]["late_weights"] is None and len(fused["late-val"]["late_weights"]) == 3
    assert main([*argv, "--format", "md"]) == 0
    table = capsys.readouterr().out
    assert "| gated late fusion | a + b + c |" in table and "| late fusion, val weights | a + b + c |" in table


@pytest.fixture(scope="module")
def images_runs(tmp_path_factory, manifest_csv):
    """Two tiny random-init backbones extracted from generated images, their single runs and a gated run."""
    tmp = tmp_path_factory.mktemp("gated-images")
    table = load_dataset("manifest", manifest_csv)
    names = ("timm:test_vit", "timm:test_resnet")
    extract(table, tmp / "s.zarr", list(names),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp / "s.zarr")
    members = [fit_run(store, RunConfig(ViewConfig(features=(n,)), HEAD), tmp / "runs", device="cpu") for n in names]
    return tmp, table, store, members, fit_gated(store, members, tmp / "runs", config=GATE, device="cpu")


def test_predict_with_a_gated_run_matches_its_stored_test_predictions(images_runs):
    _, table, _, _, run = images_runs
    rows, logits = run.logits("test")
    files = [Path(table.root) / table.paths[r] for r in rows]
    predictions = predict([run.path], files, top_k=2, device="cpu", workers=0, progress=False)
    assert set(predictions.status) == {"ok"}
    stored = logits.astype(np.float32).mean(0).argmax(1)  # predict fuses the seeds' logits alike
    assert (predictions.top_ids[:, 0] != stored).sum() <= 2  # float16 ties (CONVENTIONS)


def test_predict_without_a_member_run_is_one_line(images_runs, tmp_path, capsys):
    tmp, table, _, members, run = images_runs
    lonely = tmp_path / run.path.name
    shutil.copytree(run.path, lonely)
    config = json.loads((lonely / "config.json").read_text())
    for member in config["gated"]["members"]:
        member["path"] = str(tmp_path / "gone" / member["run"])
    (lonely / "config.json").write_text(json.dumps(config))
    image = Path(table.root) / table.paths[0]
    line = _one_error_line(capsys, ["predict", "--run", str(lonely), "--images", str(image), "--device", "cpu"])
    assert members[0].path.name in line and "copy that run directory beside the gated run" in line


def test_members_a_gate_cannot_weigh_together(singles, tmp_path, capsys):
    tmp, store, runs = singles
    with pytest.raises(FgembedError, match="two or more member runs"):
        fit_gated(store, [runs["a"]], tmp_path)
    other = write_feature_store(tmp_path / "other.zarr", per_class=30)
    foreign = fit_run(other, RunConfig(ViewConfig(features=("b",)), HEAD), tmp_path / "runs", device="cpu")
    with pytest.raises(FgembedError, match="must be runs of store"):
        fit_gated(store, [runs["a"], foreign], tmp_path)
    fewer = fit_run(store, RunConfig(ViewConfig(features=("b",), classes=(0, 1, 2, 3)), HEAD), tmp_path / "runs",
                    device="cpu")
    with pytest.raises(FgembedError, match="select different rows"):
        fit_gated(store, [runs["a"], fewer], tmp_path)
    base = ["ensemble", "--store", str(store.path), "--runs", str(tmp_path / "runs")]
    assert "two or more --members" in _one_error_line(capsys, [*base, "--strategies", "gated", "--members", "a"])
    assert "no features 'zz'" in _one_error_line(capsys, [*base, "--strategies", "gated", "--members", "a,zz"])
    assert "late weights" in _one_error_line(capsys, [*base, "--strategies", "late,gated", "--members", "a,b",
                                                      "--late-weights", "val,val"])
