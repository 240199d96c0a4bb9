"""The fusion plug-in contract, end to end: a fusion defined and registered in this file alone is
trained (`fgembed fit --fusion`), scored and reported (`fgembed ensemble --strategies`), predicted
(`fgembed predict` rebuilds the rows training saw) and scored for novelty — and the registry is
left as it was found.

The toy fusion has fitted state, so that saving and loading it is exercised: each member is
centred on its training-row mean and projected by a seeded Gaussian matrix to `WIDTH` columns;
the members' projections sit side by side. Every number is cross-checked against a numpy
recomputation from the store's embeddings and the run's saved files (safetensors read directly).
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fgembed.cli.main import main
from safetensors.numpy import load_file

from fgembed.backbones import LoadOptions
from fgembed.classify.fusion import FUSIONS, Fusion, fusion_strategies, register_fusion
from fgembed.classify.rundir import Run
from fgembed.classify.views import ViewConfig, build_view
from fgembed.datasets import load_dataset
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.predict import design_rows, predict
from fgembed.store import FeatureStore

NAME, TITLE, WIDTH = "toyproj", "toy projection", 6
MEMBERS = ("timm:test_vit", "timm:test_resnet")
TRAIN = 0  # samples/split code of the training rows


class ToyProjection(Fusion):
    """Each member centred on its training mean, then projected by a seeded Gaussian matrix."""

    title, colour = TITLE, "#17becf"

    @property
    def stateful(self) -> bool:
        return True

    def width(self) -> int:
        return WIDTH * len(self.dims)

    def start_fit(self, n_train: int) -> None:
        self.means: list[np.ndarray | None] = [None] * len(self.dims)
        self.weights: list[np.ndarray | None] = [None] * len(self.dims)

    def fit_member(self, i: int, train: np.ndarray) -> None:
        self.means[i] = train.mean(0).astype(np.float32)
        rng = np.random.default_rng(i)
        self.weights[i] = (rng.standard_normal((self.dims[i], WIDTH)) / np.sqrt(self.dims[i])).astype(np.float32)

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([(np.asarray(p, np.float32) - m) @ w
                               for p, m, w in zip(self.members(parts), self.means, self.weights)], axis=1)

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"mean{i}": m for i, m in enumerate(self.means)},
                **{f"weight{i}": w for i, w in enumerate(self.weights)}}

    def load(self, arrays: dict[str, np.ndarray]) -> Fusion:
        self.means = [arrays[f"mean{i}"] for i in range(len(self.dims))]
        self.weights = [arrays[f"weight{i}"] for i in range(len(self.dims))]
        return self


@pytest.fixture(scope="module")
def plugin():
    """The toy fusion, registered for this module only; the registry is checked restored after."""
    before = dict(FUSIONS)
    register_fusion(NAME)(ToyProjection)
    yield NAME
    del FUSIONS[NAME]
    assert FUSIONS == before


@pytest.fixture(scope="module")
def store(tmp_path_factory, manifest_csv):
    """Two tiny random-init members of the manifest images (CPU extraction: the rows predict
    rebuilds are compared with these)."""
    path = tmp_path_factory.mktemp("plugin") / "s.zarr"
    table = load_dataset("manifest", manifest_csv)
    extract(table, path, list(MEMBERS),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    return table, FeatureStore.open(path)


def cli(*args) -> tuple[int, str, str]:
    """`fgembed ARGS` in-process through the CLI's own guard: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def fitted(plugin, store, tmp_path_factory):
    """`fgembed fit --features A+B --fusion toyproj`: (run, printed metrics, runs folder)."""
    _, opened = store
    runs = tmp_path_factory.mktemp("runs")
    code, stdout, stderr = cli("fit", "--store", opened.path, "--features", "+".join(MEMBERS), "--fusion", plugin,
                               "--epochs", 3, "--runs", runs, "--json", "--quiet")
    assert code == 0, stderr
    printed = json.loads(stdout)
    return Run.load(printed["run"]), printed, runs


def _toy_rows(store: FeatureStore, state: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The toy fusion's design rows, recomputed in numpy from the saved state (float16, as stored)."""
    parts = [(store.features(m)[rows].astype(np.float32) - state[f"mean{i}"]) @ state[f"weight{i}"]
             for i, m in enumerate(MEMBERS)]
    return np.concatenate(parts, axis=1).astype(np.float16)


def test_the_registry_offers_it_as_a_fusion_and_a_strategy(plugin, store, tmp_path):
    assert plugin in fusion_strategies()
    view = ViewConfig(features=MEMBERS, fusion=plugin, l2=True, project="linear", project_dim=3)
    assert (view.l2, view.project, view.project_dim) == (True, "pca", None)  # it reads `l2` only: the rest reset
    _, opened = store
    code, _, stderr = cli("fit", "--store", opened.path, "--features", "+".join(MEMBERS), "--fusion", "nope",
                          "--runs", tmp_path)
    assert code == 2 and stderr.count("\n") == 1 and plugin in stderr  # the choices listed include it


def test_fit_trains_it_and_its_metrics_are_the_stored_logits(fitted, store):
    run, printed, _ = fitted
    _, opened = store
    assert run.config.view.fusion == NAME
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["accuracy"] == printed["accuracy"] and metrics["input_dim"] == WIDTH * len(MEMBERS)
    rows, logits = run.logits("test")
    y = opened.labels()[rows]
    assert len(rows) == metrics["n_test"] == int((opened.split_codes() == 2).sum())
    accuracy = np.mean([(z.astype(np.float32).argmax(1) == y).mean() for z in logits])
    assert metrics["accuracy"] == pytest.approx(accuracy)
    # the state was fitted on the training rows only, and saved where predict finds it
    state = load_file(str(run.path / "projection.safetensors"))
    train = np.flatnonzero(opened.split_codes() == TRAIN)
    for i, name in enumerate(MEMBERS):
        np.testing.assert_allclose(state[f"mean{i}"], opened.features(name)[train].astype(np.float64).mean(0),
                                   rtol=1e-5, atol=1e-6)


def test_ensemble_scores_and_reports_its_row(fitted, store, plugin):
    run, _, runs = fitted
    _, opened = store
    code, stdout, stderr = cli("ensemble", "--store", opened.path, "--members", ",".join(MEMBERS), "--strategies",
                               f"{plugin},late", "--combinations", "full", "--epochs", 3, "--runs", runs, "--quiet")
    assert code == 0, stderr
    members = " + ".join(MEMBERS)
    assert f"| {TITLE} | {members} |" in stdout and f"| late fusion | {members} |" in stdout  # title from the plug-in
    records = {r["key"]: r for r in json.loads((runs / "ensemble.json").read_text())}
    row = records[f"{plugin}:{'+'.join(MEMBERS)}"]
    assert row["runs"] == [str(run.path)]  # the run `fit` trained: same configuration, reused
    assert row["f1"] == pytest.approx(run.metrics["f1"]) and row["accuracy"] == pytest.approx(run.metrics["accuracy"])
    assert (runs / "ensemble.png").stat().st_size > 0  # the chart, in the plug-in's colour


def test_predict_rebuilds_the_rows_training_saw(fitted, store, tmp_path):
    run, _, _ = fitted
    table, opened = store
    rows, logits = run.logits("test")
    files = [Path(table.root) / table.paths[r] for r in rows]
    work = tmp_path / "work"
    predictions = predict([run.path], files, top_k=1, device="cpu", workers=0, progress=False, work_dir=work)
    assert set(predictions.status) == {"ok"}
    at_predict = design_rows(run, FeatureStore.open(work / "features.zarr"))
    at_training = build_view(opened, run.config.view).X("test")
    state = load_file(str(run.path / "projection.safetensors"))
    assert at_predict.shape == at_training.shape == (len(rows), WIDTH * len(MEMBERS))
    np.testing.assert_allclose(at_training.astype(np.float32), _toy_rows(opened, state, rows).astype(np.float32),
                               rtol=2e-3, atol=2e-3)  # float16 rounding of the same float32 product
    np.testing.assert_allclose(at_predict.astype(np.float32), at_training.astype(np.float32), rtol=2e-3, atol=2e-3)
    stored = logits.astype(np.float32).mean(0).argmax(1)
    assert (predictions.top_ids[:, 0] != stored).sum() <= 2  # float16 ties may flip (CONVENTIONS)


def test_novelty_scores_its_view(plugin, store, tmp_path):
    """A toy-fused run with held-out classes: the knn score is the distance to the k-th nearest
    L2-normalised toy row of the (seen) training rows."""
    from fgembed.analysis.novelty_runs import score_runs

    _, opened = store
    code, stdout, stderr = cli("fit", "--store", opened.path, "--features", "+".join(MEMBERS), "--fusion", plugin,
                               "--holdout", 0.34, "--epochs", 3, "--runs", tmp_path, "--json", "--quiet")
    assert code == 0, stderr
    run = Run.load(json.loads(stdout)["run"])
    k = 3
    result = score_runs([run.path], ["knn", "msp"], k=k)
    held = run.meta["holdout_classes"]
    labels, split = opened.labels(), opened.split_codes()
    train = np.flatnonzero((split == TRAIN) & ~np.isin(labels, held))
    state = load_file(str(run.path / "projection.safetensors"))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    reference, test = unit(_toy_rows(opened, state, train).astype(np.float64)), result.rows
    queries = unit(_toy_rows(opened, state, test).astype(np.float64))
    distances = np.sort(np.linalg.norm(queries[:, None] - reference[None], axis=2), axis=1)[:, k - 1]
    np.testing.assert_allclose(result.scores["knn"], distances, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(result.novel, np.isin(labels[test], held))
    assert result.novel.any() and (~result.novel).any()
