"""Novelty scores, their metrics and Zusin's open-set table, on generated features where a held-out
family is far from the trained ones, cross-checked against scikit-learn / scipy / brute force."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
import zarr
from fgembed.cli.main import app
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fgembed.analysis import novelty
from fgembed.analysis.novelty import (
    calibrate_threshold,
    create_scorer,
    default_tau,
    detection_metrics,
    ensemble_logits,
    format_table,
    fuse_scores,
    level_rows,
    list_scores,
    novel_at_level,
    open_set_accuracy,
    plot_roc,
    read_scores,
    write_scores,
)
from fgembed.classify.views import ViewConfig, build_view
from fgembed.errors import FgembedError
from fgembed.images import UNREADABLE

from .formats import write_feature_store
from .test_hierarchy import make_features

HELD_OUT_FAMILY = 5


@pytest.fixture(scope="module")
def open_set():
    """Train on every family but one; test rows = fresh rows of all classes; novel = held-out family."""
    X, codes = make_features(n_per_class=20, seed=3)
    Xt, ct = make_features(n_per_class=10, seed=4)
    seen = codes["family"] != HELD_OUT_FAMILY
    return X[seen], codes["species"][seen], Xt, ct["species"], ct["family"] == HELD_OUT_FAMILY


def test_registry_and_logit_scores_follow_the_sign_convention():
    assert list_scores() == ["energy", "gmm", "knn", "mahalanobis", "maxlogit", "msp"]
    assert list_scores("m*") == ["mahalanobis", "maxlogit", "msp"]
    with pytest.raises(FgembedError, match="unknown novelty score 'odin'; choose from energy"):
        create_scorer("odin")
    with pytest.raises(FgembedError, match="bad parameters for the knn score"):
        create_scorer("knn", neighbours=3)
    with pytest.raises(FgembedError, match="temperature must be > 0"):
        create_scorer("energy", temperature=0)
    z = np.random.default_rng(0).normal(0, 3, (50, 7)).astype(np.float32)
    np.testing.assert_allclose(create_scorer("msp").score(z), -softmax(z, 1).max(1), rtol=1e-6)
    np.testing.assert_allclose(create_scorer("maxlogit").score(logits=z), -z.max(1))
    np.testing.assert_allclose(create_scorer("energy", temperature=2.0).score(z), -2 * logsumexp(z / 2, 1), rtol=1e-6)
    confident, flat = np.array([[10.0, 0, 0]]), np.zeros((1, 3))
    for name in ("msp", "maxlogit", "energy"):  # higher = more novel
        s = create_scorer(name)
        assert s.score(flat)[0] > s.score(confident)[0]
    with pytest.raises(FgembedError, match="needs logits"):
        create_scorer("msp").score(embeddings=z)


def test_embedding_scores_find_a_held_out_family(open_set):
    X, y, Xt, _, novel = open_set
    aurocs = {}
    for name, params in (("knn", {"k": 5}), ("mahalanobis", {}), ("gmm", {"n_components": 4})):
        scorer = create_scorer(name, **params).fit(X, y)
        scores = scorer.score(embeddings=Xt.astype(np.float16))
        assert scores.dtype == np.float32 and scores.shape == (len(Xt),)
        aurocs[name] = detection_metrics(scores, novel)["auroc"]
    assert aurocs["knn"] > 0.95 and aurocs["mahalanobis"] > 0.95, aurocs
    assert aurocs["gmm"] > 0.8, aurocs
    # control: a "novel" mask drawn at random among seen rows is not detectable (AUROC ≈ 0.5)
    control = np.random.default_rng(0).random(int((~novel).sum())) < 0.3
    knn = create_scorer("knn", k=5).fit(X, y).score(embeddings=Xt[~novel])
    assert 0.35 < detection_metrics(knn, control)["auroc"] < 0.65


def test_mahalanobis_and_knn_match_their_definitions(open_set, monkeypatch):
    X, y, Xt, _, _ = open_set
    monkeypatch.setattr(novelty, "MAHALANOBIS_ELEMENTS", 100)  # several row chunks
    maha = create_scorer("mahalanobis", shrinkage="empirical").fit(X, y)
    per_class = []
    for c in np.unique(y):  # scikit-learn's own distance to each class mean, shared covariance
        cov = EmpiricalCovariance(assume_centered=True).fit(X - maha.means_[np.searchsorted(maha.classes_, y)])
        per_class.append(cov.mahalanobis(Xt - X[y == c].mean(0)))
    np.testing.assert_allclose(maha.score(embeddings=Xt), np.min(per_class, 0), rtol=1e-4)
    knn = create_scorer("knn", k=3).fit(X)
    unit = lambda a: torch.nn.functional.normalize(torch.as_tensor(a, dtype=torch.float64), dim=1)
    brute = torch.cdist(unit(Xt), unit(X)).sort(1).values[:, 2].numpy()
    np.testing.assert_allclose(knn.score(embeddings=Xt), brute, rtol=1e-4, atol=1e-6)
    with pytest.raises(FgembedError, match="embeddings have 3 features; the score was fitted on 24"):
        knn.score(embeddings=Xt[:, :3])
    with pytest.raises(FgembedError, match="fit the KNN score"):
        create_scorer("knn").score(embeddings=Xt)
    with pytest.raises(FgembedError, match="k must be between 1 and the 5 training rows"):
        create_scorer("knn", k=9).fit(X[:5])
    with pytest.raises(FgembedError, match="needs the training rows' labels"):
        create_scorer("mahalanobis").fit(X)


def test_detection_metrics_equal_brute_force():
    rng = np.random.default_rng(1)
    novel = rng.random(300) < 0.3
    scores = np.round(rng.normal(novel * 1.5, 1.0), 1)  # rounded: ties on purpose
    m = detection_metrics(scores, novel)
    pos, neg = scores[novel], scores[~novel]
    mann_whitney = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert m["auroc"] == pytest.approx(mann_whitney) == pytest.approx(roc_auc_score(novel, scores))
    thresholds = np.unique(scores)[::-1]
    tpr = np.array([(pos >= t).mean() for t in thresholds])
    assert m["fpr95"] == pytest.approx((neg >= thresholds[np.argmax(tpr >= 0.95)]).mean())
    precision = np.array([novel[scores >= t].mean() for t in thresholds])
    assert m["aupr"] == pytest.approx(np.sum(np.diff(np.concatenate([[0], tpr])) * precision))
    with pytest.raises(FgembedError, match="need both novel and seen rows"):
        detection_metrics(scores, np.zeros(300, bool))


def test_calibrated_threshold_keeps_the_target_tpr_on_seen_validation_rows():
    rng = np.random.default_rng(2)
    seen_val = rng.normal(0, 1, 1000)
    for target in (0.9, 0.95, 0.99):
        t = calibrate_threshold(seen_val, target)
        kept = (seen_val <= t).mean()
        assert target <= kept <= target + 1 / len(seen_val)
    fresh = rng.normal(0, 1, 20000)  # the same rule on new seen rows: close to the target
    assert abs((fresh <= calibrate_threshold(seen_val, 0.95)).mean() - 0.95) < 0.02
    with pytest.raises(FgembedError, match="target TPR must be in"):
        calibrate_threshold(seen_val, 1.5)


def test_open_set_accuracy_follows_001():
    y = np.array([0, 1, 2, 0, 1, 9])
    pred = np.array([0, 1, 0, 0, 1, 2])
    novel = np.array([False, False, False, False, True, True])
    flagged = np.array([False, True, False, False, True, False])
    # seen: right+kept, flagged (wrong), wrong class, right+kept → 2/4; novel: flagged, missed → 1/2
    assert open_set_accuracy(pred, y, flagged, novel) == {"overall": 0.5, "seen": 0.5, "unseen": 0.5}
    z = np.array([[3.0, 0, 0], [0.1, 0, 0]])  # MSP 0.91 and 0.36 against τ = 0.5 (001: flagged when max p < τ)
    msp = create_scorer("msp").score(z)
    assert ((msp > -0.5) == (softmax(z, 1).max(1) < 0.5)).all()
    assert novel_at_level(np.array([0, 1, 2, 3]), np.array([0, 0, 2])).tolist() == [False, True, False, True]


def test_scores_round_trip_through_plain_zarr(tmp_path, open_set):
    _, _, Xt, _, novel = open_set
    rows = np.arange(len(Xt)) * 3
    scores = {"msp": np.linspace(0, 1, len(Xt)), "knn": np.arange(len(Xt), dtype=np.float64)}
    path = write_scores(tmp_path, scores, rows, novel)
    group = zarr.open_group(path, mode="r")  # anyone can read it back without fgembed
    assert group["msp"].dtype == np.float32 and (group["rows"][:] == rows).all()
    back, back_rows, back_novel = read_scores(tmp_path)
    assert sorted(back) == ["knn", "msp"] and (back_rows == rows).all() and (back_novel == novel).all()
    np.testing.assert_allclose(back["msp"], scores["msp"], rtol=1e-6)
    with pytest.raises(FgembedError, match="score knn has 3 rows"):
        write_scores(tmp_path, {"knn": np.zeros(3)}, rows)
    per_seed = np.stack([scores["msp"], -scores["msp"]])  # [seeds, rows] of one level, beside the root's
    write_scores(tmp_path, {"msp": per_seed}, rows, ~novel, level="family")
    fam, _, fam_novel = read_scores(tmp_path, level="family")
    assert fam["msp"].shape == (2, len(Xt)) and (fam_novel == ~novel).all()
    assert sorted(read_scores(tmp_path)[0]) == ["knn", "msp"]  # the root's arrays are kept
    write_scores(tmp_path, {"energy": scores["knn"]}, rows)   # rewriting the root drops its stale scores
    assert sorted(read_scores(tmp_path)[0]) == ["energy"] and "msp" in read_scores(tmp_path, "family")[0]
    with pytest.raises(FgembedError, match="no scores for level 'order'; has: family"):
        read_scores(tmp_path, level="order")
    with pytest.raises(FgembedError, match="has no novelty.zarr"):
        read_scores(tmp_path / "elsewhere")


def test_level_rows_table_formats_and_roc_plot(tmp_path, open_set):
    X, y, Xt, yt, novel = open_set
    maha = create_scorer("mahalanobis").fit(X, y).score(embeddings=Xt)
    msp = -np.where(novel, 0.3, 0.9)  # a perfect MSP: 0.9 on seen rows, 0.3 on novel ones
    pred = yt.copy()
    assert (default_tau(2, 3), default_tau(0, 3), default_tau(1, 3)) == (0.5, 0.7, 0.7)
    records = level_rows("species", {"msp": msp, "mahalanobis": maha}, {"msp": msp[~novel], "mahalanobis": maha[~novel]},
                         novel, pred, yt, tau=default_tau(2, 3))
    assert [(r["score"], r["rule"]) for r in records] == [("msp", "τ=0.5"), ("msp", "val-tpr0.95"),
                                                          ("mahalanobis", "val-tpr0.95")]
    assert records[0]["threshold"] == -0.5 and records[2]["seen"] >= 0.95
    rows = json.loads(format_table(records, "json"))
    assert {"score", "level", "auroc", "aupr", "fpr95", "overall", "seen", "unseen", "threshold"} <= set(rows[0])
    assert rows[0]["unseen"] == 1.0 and rows[0]["seen"] == 1.0 and rows[0]["auroc"] == 1.0
    parsed = list(csv.DictReader(io.StringIO(format_table(records, "csv"))))
    assert parsed[2]["score"] == "mahalanobis" and float(parsed[0]["overall"]) == 1.0
    md = format_table(records, "md")
    assert md.splitlines()[0].startswith("| Score | Level | AUROC") and "| 100.00 |" in md
    assert r"\toprule" in format_table([{**records[0], "auroc_std": 0.01}], "latex")
    assert "100.00 ± 1.00" in format_table([{**records[0], "auroc_std": 0.01}], "md")
    with pytest.raises(FgembedError, match="unknown format 'xlsx'"):
        format_table(records, "xlsx")
    png = plot_roc({"mahalanobis": (maha, novel)}, tmp_path / "roc.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_ensembles_average_logits_or_standardised_scores():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (20, 4)), rng.normal(0, 1, (20, 4))
    np.testing.assert_allclose(ensemble_logits([a, b]), (a + b) / 2, rtol=1e-5)
    np.testing.assert_allclose(np.exp(ensemble_logits([a, b], "proba")), (softmax(a, 1) + softmax(b, 1)) / 2,
                               rtol=1e-5)
    s = rng.normal(0, 1, 30)
    # a score and the same score at another scale and offset fuse to the standardised score
    fused = fuse_scores([s, 100 * s + 7], [s, 100 * s + 7])
    np.testing.assert_allclose(fused, (s - s.mean()) / s.std(), rtol=1e-5, atol=1e-6)


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (Python's parser accepts them; JSON does not)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_undefined_metrics_are_null_in_json(open_set):
    """A split without novel rows: AUROC, AUPR, FPR@95 and unseen accuracy are undefined."""
    _, _, Xt, yt, _ = open_set
    no_novel = np.zeros(len(Xt), bool)
    msp = -np.linspace(0.2, 0.9, len(Xt))
    records = level_rows("species", {"msp": msp}, {"msp": msp}, no_novel, yt, yt, tau=0.5)
    assert np.isnan(records[0]["auroc"]) and np.isnan(records[0]["unseen"])
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json.dumps(records, allow_nan=False)  # what the table must not print
    rows = _strict_json(format_table(records, "json"))
    assert [(r["auroc"], r["aupr"], r["fpr95"], r["unseen"]) for r in rows] == [(None,) * 4] * 2
    assert rows[0]["seen"] == pytest.approx(((msp <= -0.5)).mean()) and rows[0]["overall"] == rows[0]["seen"]
    parsed = list(csv.DictReader(io.StringIO(format_table(records, "csv"))))
    assert parsed[0]["auroc"] == "" and parsed[0]["unseen"] == "" and float(parsed[0]["seen"]) == rows[0]["seen"]
    md = format_table([{**records[0], "auroc_std": float("nan")}], "md")
    assert md.splitlines()[2].count("–") == 4  # AUROC, AUPR, FPR@95, unseen
    assert novelty.defined({"a": [np.float32(np.inf), np.int64(3)], "b": (np.float64(0.5),)}) == \
        {"a": [None, 3], "b": [0.5]}


def test_cli_json_stays_valid_when_the_test_split_has_no_novel_rows(tmp_path):
    """Every test image of the held-out classes failed to decode: the run has held-out classes but
    no novel test rows; `fgembed novelty --format json` prints null, warns once, draws no ROC."""
    path = tmp_path / "f.zarr"
    store = write_feature_store(path)
    held = build_view(store, ViewConfig(features=("a",), holdout=0.34)).holdout_classes
    lost = np.flatnonzero(np.isin(store.labels(), held) & (store.group["samples/split"][:] == 2))
    member = zarr.open_group(path / "features" / "a", mode="r+")  # as extraction flags a failed image
    member["status"][lost] = UNREADABLE
    member["emb"].set_orthogonal_selection((lost, slice(None)), np.nan)
    runner = CliRunner()
    fit = runner.invoke(app, ["fit", "--store", str(path), "--runs", str(tmp_path / "runs"), "--features", "a",
                              "--epochs", "2", "--holdout", "0.34", "--quiet", "--json"])
    assert fit.exit_code == 0, fit.output
    run = json.loads(fit.stdout)
    assert run["holdout_classes"] == held and run["n_novel"] == 0 and run["dropped"]["test"] == len(lost)
    plot = tmp_path / "roc.png"
    result = runner.invoke(app, ["novelty", run["run"], "--scores", "msp,knn", "--format", "json",
                                 "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    rows = _strict_json(result.stdout)
    assert {r["score"] for r in rows} == {"msp", "knn"} and all(r["auroc"] is None and r["unseen"] is None
                                                                for r in rows)
    assert all(0 <= r["seen"] <= 1 for r in rows)
    assert "no novel rows among the test rows" in result.stderr and not plot.exists()
