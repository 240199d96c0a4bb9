"""Metrics against scikit-learn; heads honour the estimator contract and learn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.base import clone
from sklearn.model_selection import train_test_split

from fgembed.classify.heads import LinearHead, MLPHead
from fgembed.classify.metrics import classification_metrics, f1_torch
from fgembed.errors import FgembedError


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = 12
    y = rng.integers(0, n_classes - 2, 300)  # two classes never occur in truth
    logits = rng.normal(size=(300, n_classes)) + 2.5 * np.eye(n_classes)[y] * rng.random((300, 1))
    pred = logits.argmax(1)
    got = classification_metrics(logits, y)
    for avg, suffix in (("weighted", ""), ("macro", "_macro")):
        assert got["precision" + suffix] == pytest.approx(skm.precision_score(y, pred, average=avg, zero_division=0))
        assert got["recall" + suffix] == pytest.approx(skm.recall_score(y, pred, average=avg, zero_division=0))
        assert got["f1" + suffix] == pytest.approx(skm.f1_score(y, pred, average=avg, zero_division=0))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["recall"] == pytest.approx(got["accuracy"])  # weighted recall is accuracy
    assert got["top5"] == pytest.approx(skm.top_k_accuracy_score(y, logits, k=5, labels=np.arange(n_classes)))
    assert got["mean_class_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert f1_torch(torch.as_tensor(y), torch.as_tensor(pred), n_classes) == pytest.approx(got["f1"])


def test_metrics_scale_to_inat_class_counts():
    """10,000 classes (iNat 2021): per-class counts, no C×C matrix; still scikit-learn's numbers."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10_000, 3000)
    logits = rng.normal(size=(3000, 10_000)).astype(np.float32)
    logits[np.arange(1500), y[:1500]] += 10  # half the rows right
    got, pred = classification_metrics(logits, y), logits.argmax(1)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert got["mean_class_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))


def _blobs(n_per=40, n_classes=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3, size=(n_classes, d))
    y = np.repeat(np.arange(n_classes), n_per)
    return (centres[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


@pytest.mark.parametrize("head", [MLPHead(hidden=(32, 16), epochs=15, batch_size=32), LinearHead(epochs=40, lr=1e-2)])
def test_heads_learn_and_follow_the_estimator_contract(head):
    X, y = _blobs()
    Xt, yt = _blobs(n_per=20, seed=0)
    assert clone(head).get_params() == head.get_params()
    assert head.fit(X, y) is head
    assert head.score(Xt, yt) > 0.9
    assert head.predict_logits(Xt).shape == (len(Xt), 5)
    np.testing.assert_allclose(head.predict_proba(Xt).sum(1), 1, rtol=1e-5)
    assert 0 <= head.best_epoch_ < head.epochs and len(head.history_) == head.epochs
    assert head.best_val_f1_ == max(h["val_f1"] for h in head.history_)


def test_mlp_architecture_is_the_reference_recipe():
    head = MLPHead()
    assert (head.lr, head.batch_size, head.epochs, head.dropout, head.hidden) == (1e-3, 128, 150, 0.5, (512, 256))
    module = head._build(1024, 200)
    kinds = [type(m).__name__ for m in module]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout"] * 2 + ["Linear"]
    assert module[0].in_features == 1024 and module[-1].out_features == 200


def test_same_seed_same_result_and_seeds_in_one_pass():
    X, y = _blobs()
    a = MLPHead(hidden=(16,), epochs=5, random_state=3).fit(X, y)
    b = MLPHead(hidden=(16,), epochs=5, random_state=3).fit(X, y)
    np.testing.assert_array_equal(a.predict_logits(X), b.predict_logits(X))
    # fit carves a stratified 20% validation split with random_state; given the same split, fit_grid
    Xt, Xv, yt, yv = train_test_split(X, y, test_size=0.2, stratify=y, random_state=3)
    heads = MLPHead(hidden=(16,), epochs=5, random_state=3).fit_grid(Xt, yt, Xv, yv, seeds=[3, 4])
    np.testing.assert_array_equal(heads[0].predict_logits(X), a.predict_logits(X))  # seed 3 is seed 3 either way
    assert heads[1].random_state == 4 and not np.array_equal(heads[1].predict_logits(X), a.predict_logits(X))


def test_bad_input_is_refused():
    X, y = _blobs()
    with pytest.raises(FgembedError, match="epochs must be"):
        MLPHead(epochs=0).fit(X, y)
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):  # scikit-learn's own check, as every estimator's
        LinearHead(epochs=1).fit(X, y)
