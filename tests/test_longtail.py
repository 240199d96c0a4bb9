"""Long-tail bins and re-balancing pieces, checked against direct computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fgembed.classify.longtail import (
    balanced_order,
    by_frequency,
    class_balanced_weights,
    frequency_bins,
    log_prior,
    parse_shot_bins,
)
from fgembed.errors import FgembedError


def test_bins_follow_the_issue_edges():
    counts = np.array([150, 101, 100, 20, 19, 1, 0])
    bins = frequency_bins(counts)
    assert bins["many"].tolist() == [True, True, False, False, False, False, False]
    assert bins["medium"].tolist() == [False, False, True, True, False, False, False]
    assert bins["few"].tolist() == [False, False, False, False, True, True, False]
    assert parse_shot_bins("5,50") == (5, 50)
    for bad in ("5", "a,b", "50,5", "0,5"):
        with pytest.raises(FgembedError):
            parse_shot_bins(bad)


def test_by_frequency_accuracy_per_bin():
    rng = np.random.default_rng(0)
    counts = np.array([200, 150, 50, 30, 5, 2])
    y = rng.integers(0, 6, 1000)
    pred = np.where(rng.random(1000) < 0.7, y, rng.integers(0, 6, 1000))
    out = by_frequency(y, pred, counts)
    for name, classes in (("many", [0, 1]), ("medium", [2, 3]), ("few", [4, 5])):
        rows = np.isin(y, classes)
        assert out[name]["accuracy"] == pytest.approx((pred[rows] == y[rows]).mean())
        assert out[name]["n_classes"] == 2 and out[name]["n_test"] == rows.sum()
    assert np.isnan(by_frequency(y, pred, np.full(6, 500))["few"]["accuracy"])


def test_class_balanced_weights_are_inverse_effective_numbers():
    counts = np.array([1000, 100, 10, 0])
    beta = 0.999
    w = class_balanced_weights(counts, beta).double()
    effective = (1 - beta ** counts[:3]) / (1 - beta)
    expected = (1 / effective) / (1 / effective).sum() * 3
    np.testing.assert_allclose(w[:3].numpy(), expected, rtol=1e-6)
    assert w[3] == 0 and w[2] > w[1] > w[0]


def test_log_prior_and_balanced_order():
    counts = np.array([90, 10, 0])
    np.testing.assert_allclose(log_prior(counts, 1.0)[:2].numpy(), np.log([0.9, 0.1]), rtol=1e-6)
    assert log_prior(counts)[2] < -1e3
    labels = torch.as_tensor(np.repeat([0, 1], [900, 100]))
    order = balanced_order(labels, 2, torch.Generator().manual_seed(0))
    assert len(order) == 1000
    share = (labels[order] == 1).double().mean()
    assert 0.45 < share < 0.55  # balanced although class 1 is 10% of the rows
