"""Baseline heads against scikit-learn: cosine kNN votes, logistic regression, zero-shot scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from fgembed.classify.baselines import (
    KNNHead,
    LogRegHead,
    ZeroShotHead,
    minimise_logreg,
)
from fgembed.classify.registry import create_head, list_heads
from fgembed.errors import FgembedError


def _data(n=300, d=16, classes=5, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (classes, d))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


def test_registered():
    assert {"knn", "logreg", "zeroshot"} <= set(list_heads())
    assert isinstance(create_head("knn", ks=(5,), device="cpu"), KNNHead)


def test_knn_equals_sklearn_weighted_votes():
    X, y = _data()
    Xv, yv = _data(seed=1)
    T, k = 0.07, 7
    head = KNNHead(ks=(k,), temperature=T, device="cpu").fit(X, y, Xv, yv)
    ours = np.exp(head.predict_logits(Xv))
    reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                     weights=lambda dist: np.exp((1 - dist) / T)).fit(X, y)
    np.testing.assert_allclose(ours, reference.predict_proba(Xv), atol=1e-4)


def test_knn_chooses_k_on_validation_and_accepts_float16():
    X, y = _data(spread=0.6)
    Xv, yv = _data(seed=1, spread=0.6)
    ks = (1, 5, 25)
    heads = KNNHead(ks=ks, device="cpu").fit_grid(X.astype(np.float16), y, Xv.astype(np.float16), yv,
                                                   seeds=[0, 1])
    expected = {}
    for k in ks:
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                   weights=lambda dist: np.exp((1 - dist) / 0.07)).fit(X, y)
        expected[k] = f1_score(yv, ref.predict(Xv), average="weighted")
    got = {g["k"]: g["best_val_f1"] for g in heads[0].grid_}
    assert got == pytest.approx(expected, abs=0.02)  # float16 rows may flip a near tie
    assert heads[0].chosen_["k"] == max(got, key=got.get)
    assert len(heads) == 2 and heads[1].random_state == 1
    np.testing.assert_array_equal(heads[0].predict(Xv), heads[1].predict(Xv))


def _sklearn_objective(model: LogisticRegression, X, y, C) -> float:
    proba = model.predict_proba(X)
    return C * -np.log(proba[np.arange(len(y)), y]).sum() + 0.5 * (model.coef_ ** 2).sum()


def test_logreg_minimises_sklearns_objective():
    X, y = _data(d=8, spread=0.8)
    C = 0.5
    reference = LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(X, y)
    linear = torch.nn.Linear(X.shape[1], 5)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    ours, _ = minimise_logreg(linear, torch.as_tensor(X), torch.as_tensor(y), C, 500, 1e-9)
    theirs = _sklearn_objective(reference, X, y, C) / (C * len(X))
    assert ours == pytest.approx(theirs, rel=1e-4)
    pred = linear(torch.as_tensor(X)).argmax(1).numpy()
    assert (pred == reference.predict(X)).mean() >= 0.98


def test_logreg_grid_and_round_trip():
    X, y = _data(spread=0.5)
    Xv, yv = _data(seed=1, spread=0.5)
    head = LogRegHead(Cs=(1e-4, 1.0), device="cpu").fit(X, y, Xv, yv)
    assert [g["C"] for g in head.grid_] == [1e-4, 1.0]
    assert head.chosen_["C"] == max(head.grid_, key=lambda g: g["best_val_f1"])["C"]
    again = LogRegHead.from_state(head.get_params(), X.shape[1], 5, head.module_.state_dict())
    np.testing.assert_allclose(again.predict_logits(Xv), head.predict_logits(Xv))
    knn = KNNHead(ks=(3,), device="cpu").fit(X, y, Xv, yv)
    again = KNNHead.from_state(knn.get_params(), X.shape[1], 5, knn.module_.state_dict())
    np.testing.assert_allclose(again.predict_logits(Xv), knn.predict_logits(Xv))


def test_zeroshot_scores_are_scaled_cosines():
    X, y = _data(d=12)
    Xv, yv = _data(seed=1, d=12)
    text = np.random.default_rng(3).normal(size=(5, 12)).astype(np.float32)
    head = ZeroShotHead(text_embeddings=text, logit_scale=50.0, device="cpu").fit(X, y, Xv, yv)
    cos = (Xv / np.linalg.norm(Xv, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
    np.testing.assert_allclose(head.predict_logits(Xv), 50.0 * cos, rtol=1e-5, atol=1e-4)
    again = ZeroShotHead.from_state(head.get_params(), 12, 5, head.module_.state_dict())
    np.testing.assert_allclose(again.predict_logits(Xv), head.predict_logits(Xv))
    with pytest.raises(FgembedError, match="--text"):
        ZeroShotHead(device="cpu").fit(X, y, Xv, yv)
    with pytest.raises(FgembedError, match="need"):
        ZeroShotHead(text_embeddings=text[:, :4], device="cpu").fit(X, y, Xv, yv)


def test_baselines_are_runs_tables_and_late_fusion_members(tmp_path):
    """knn / logreg heads train as runs, `member@head` joins late fusion (probability averaging),
    and `--shots K --draws N` repeats the few-shot view."""
    import json
    import warnings

    from fgembed.cli.main import app
    from typer.testing import CliRunner

    from fgembed.analysis.ensemble import score
    from fgembed.analysis.plan import plan
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig, build_view

    from .formats import write_feature_store

    store = write_feature_store(tmp_path / "f.zarr")
    base = RunConfig(ViewConfig(features=("a",)), HeadConfig(epochs=2))
    run = fit_run(store, RunConfig(ViewConfig(features=("a",)), HeadConfig(head="logreg", seeds=(0, 1))),
                  tmp_path / "runs", device="cpu")
    view = build_view(store, ViewConfig(features=("a",)))
    reference = LogRegHead(device="cpu").fit(view.X("train"), view.labels("train"), view.X("val"),
                                             view.labels("val"))  # scikit-learn's face: its classes are the store's
    rows, logits = run.logits("test")
    np.testing.assert_array_equal(np.asarray(logits[0], np.float32).argmax(1), reference.predict(view.X("test")))
    assert run.metrics["accuracy_std"] == 0.0 and run.metrics["chosen"][0]["C"] == reference.chosen_["C"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = score(store, tmp_path / "runs", plan(["a@knn", "b"], ["late"], ["all"]), base, device="cpu")
    assert any("probabilities" in str(w.message) for w in caught)
    late = next(e for e in entries if e.combination.strategy == "late")
    knn = next(e for e in entries if e.combination.members == ("a@knn",))
    assert json.loads((knn.runs[0] / "config.json").read_text())["config"]["head"]["head"] == "knn"
    assert 0 <= late.metrics["accuracy"] <= 1
    with pytest.raises(FgembedError, match="late fusion only"):
        score(store, tmp_path / "runs", plan(["a@knn", "b"], ["concat"], ["all"]), base, device="cpu")

    result = CliRunner().invoke(app, ["fit", "--store", str(tmp_path / "f.zarr"), "--features", "a", "--head", "knn",
                                      "--shots", "5", "--draws", "3", "--device", "cpu", "--runs",
                                      str(tmp_path / "runs"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["draws"]) == 2 and out["n_train"] == 5 * 6
    assert len({out["run"], *(d["run"] for d in out["draws"])}) == 3  # three draws, three runs
