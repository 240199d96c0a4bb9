"""Bootstrap intervals and paired differences (fgembed.classify.bootstrap), checked against
scipy.stats.bootstrap on the very same resamples (scipy draws `rng.integers(0, n, (B, n))` from
the Generator it is given, and so does `Resamples`) with scikit-learn's metrics as the statistic,
and resample by resample against scikit-learn on explicitly resampled copies."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from fgembed.classify import bootstrap
from fgembed.classify.bootstrap import Resamples, distribution, interval, paired
from fgembed.errors import FgembedError


def sk_metric(name: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The metric as scikit-learn computes it (the reference every value here is checked against)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "y_pred contains classes not in y_true"
        if name == "accuracy":
            return accuracy_score(y, pred)
        if name == "balanced_accuracy":
            return balanced_accuracy_score(y, pred)
        return f1_score(y, pred, average="weighted" if name == "f1" else "macro", zero_division=0)


def sk_seed_mean(name: str, y: np.ndarray, *preds: np.ndarray) -> float:
    return float(np.mean([sk_metric(name, y, p) for p in preds]))


def labels(n: int, n_classes: int, accuracy: float, seed: int, n_seeds: int | None = None):
    """Truth, and predictions right with probability `accuracy`, else a random class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    shape = (n,) if n_seeds is None else (n_seeds, n)
    pred = np.where(rng.random(shape) < accuracy, y, rng.integers(0, n_classes, shape))
    return y, pred


def drawn(n_rows: int, n_resamples: int, seed: int) -> np.ndarray:
    """The resamples' row indices as scipy.stats.bootstrap draws them from `default_rng(seed)`."""
    return np.random.default_rng(seed).integers(0, n_rows, (n_resamples, n_rows))


def all_counts(resamples: Resamples) -> np.ndarray:
    return np.concatenate(list(resamples.chunks()), axis=1)


def test_resamples_are_scipys_draws_whatever_the_chunking():
    n, B = 37, 50
    expected = np.stack([np.bincount(i, minlength=n) for i in drawn(n, B, seed=3)], axis=1)
    for chunk_size in (None, 1, 7, B):
        resamples = Resamples(n, B, seed=3, chunk_size=chunk_size)
        counts = all_counts(resamples)
        assert counts.dtype == np.uint8 and counts.shape == (n, B)
        np.testing.assert_array_equal(counts, expected)
        np.testing.assert_array_equal(all_counts(resamples), expected)   # the kept copy, second pass
    assert not np.array_equal(all_counts(Resamples(n, B, seed=4)), expected)


def test_counts_are_drawn_again_when_too_large_to_keep(monkeypatch):
    monkeypatch.setattr(bootstrap, "CACHE_BYTES", 100)
    resamples = Resamples(30, 20, seed=1, chunk_size=6)
    first = all_counts(resamples)
    assert resamples._cache is None
    np.testing.assert_array_equal(all_counts(resamples), first)


@pytest.mark.parametrize("metric", bootstrap.METRICS)
def test_interval_equals_scipy_bootstrap_on_the_same_resamples(metric):
    n, B, seed = 60, 120, 5
    y, pred = labels(n, 6, accuracy=0.6, seed=1)
    ours = distribution(y, pred, Resamples(n, B, seed), [metric])
    ref = stats.bootstrap((y, pred), lambda a, b: sk_metric(metric, a, b), paired=True, vectorized=False,
                          n_resamples=B, method="percentile", rng=np.random.default_rng(seed))
    np.testing.assert_allclose(ours.resampled[metric], ref.bootstrap_distribution, rtol=1e-6, atol=1e-9)
    result = ours.interval()
    assert result[metric] == pytest.approx(sk_metric(metric, y, pred), abs=1e-12)
    np.testing.assert_allclose(result[f"{metric}_ci"], ref.confidence_interval, rtol=1e-6)
    lo, hi = interval(y, pred, Resamples(n, B, seed), [metric], confidence=0.8)[f"{metric}_ci"]
    assert result[f"{metric}_ci"][0] < lo <= hi < result[f"{metric}_ci"][1]


def test_seeds_interval_is_scipys_for_the_seed_mean():
    """Each resample draws the same rows for every seed and scores the mean of the seeds' metric."""
    n, B, seed = 50, 80, 2
    y, preds = labels(n, 5, accuracy=0.5, seed=3, n_seeds=3)
    ours = interval(y, preds, Resamples(n, B, seed), ["f1", "balanced_accuracy"])
    for metric in ("f1", "balanced_accuracy"):
        ref = stats.bootstrap((y, *preds), lambda a, *p: sk_seed_mean(metric, a, *p), paired=True,
                              vectorized=False, n_resamples=B, method="percentile", rng=np.random.default_rng(seed))
        assert ours[metric] == pytest.approx(sk_seed_mean(metric, y, *preds), abs=1e-12)
        np.testing.assert_allclose(ours[f"{metric}_ci"], ref.confidence_interval, rtol=1e-6)


def test_paired_equals_scipy_bootstrap_of_the_difference():
    n, B, seed = 60, 120, 7
    y, a = labels(n, 6, accuracy=0.7, seed=4)
    _, b = labels(n, 6, accuracy=0.6, seed=4)   # same truth, other errors
    ours = paired(y, a, b, Resamples(n, B, seed), ["accuracy", "f1_macro"])
    assert set(ours) == {f"delta_{m}{s}" for m in ("accuracy", "f1_macro") for s in ("", "_ci", "_p")}
    for metric in ("accuracy", "f1_macro"):
        ref = stats.bootstrap((y, a, b), lambda t, p, q: sk_metric(metric, t, p) - sk_metric(metric, t, q),
                              paired=True, vectorized=False, n_resamples=B, method="percentile",
                              rng=np.random.default_rng(seed))
        delta = ref.bootstrap_distribution
        assert ours[f"delta_{metric}"] == pytest.approx(sk_metric(metric, y, a) - sk_metric(metric, y, b), abs=1e-12)
        np.testing.assert_allclose(ours[f"delta_{metric}_ci"], ref.confidence_interval, rtol=1e-6, atol=1e-9)
        # The p-value's definition, on scipy's distribution of the difference.
        beyond = min(np.sum(delta <= 1e-9), np.sum(delta >= -1e-9))
        assert ours[f"delta_{metric}_p"] == pytest.approx(min(1.0, 2 * (1 + beyond) / (B + 1)))


def test_resampled_values_equal_sklearn_on_resampled_copies_of_a_row_subset():
    """Many classes (some absent from truth, some never predicted), three seeds, and a subset of the
    table's rows: resample b scores the subset's rows among that resample's draws, with their
    multiplicity, as scikit-learn does on the explicitly resampled copy."""
    n, B, seed, n_classes = 400, 30, 11, 150
    y, preds = labels(n, n_classes, accuracy=0.4, seed=5, n_seeds=3)
    mask = np.random.default_rng(6).random(n) < 0.7
    ours = distribution(y[mask], preds[:, mask], Resamples(n, B, seed, chunk_size=4), rows=mask,
                        n_classes=n_classes)
    indices = drawn(n, B, seed)
    for b in (0, 1, 13, 29):
        kept = indices[b][mask[indices[b]]]
        for metric in bootstrap.METRICS:
            assert ours.resampled[metric][b] == pytest.approx(
                sk_seed_mean(metric, y[kept], *preds[:, kept]), rel=1e-6), (metric, b)
    for metric in bootstrap.METRICS:
        assert ours.point[metric] == pytest.approx(sk_seed_mean(metric, y[mask], *preds[:, mask]), abs=1e-12)


def test_rows_computed_together_equal_each_computed_alone():
    """`distributions` shares the counts and the support of the rows it is given (their classes are
    those of all of them): each equals its own `distribution`, on a row subset too."""
    n, B = 300, 70
    y, a = labels(n, 40, accuracy=0.6, seed=15, n_seeds=2)
    _, b = labels(n, 60, accuracy=0.3, seed=16)   # other classes, one seed
    mask = np.arange(n) % 4 != 1
    resamples = Resamples(n, B, seed=2)
    together = bootstrap.distributions(y[mask], [a[:, mask], b[mask]], resamples, rows=mask)
    for pred, dist in zip((a, b), together):
        alone = distribution(y[mask], pred[..., mask], resamples, rows=mask)
        assert dist.point == pytest.approx(alone.point, abs=1e-12)
        for metric in bootstrap.METRICS:
            np.testing.assert_allclose(dist.resampled[metric], alone.resampled[metric], rtol=1e-6)
    assert not np.allclose(together[0].resampled["f1"], together[1].resampled["f1"])


def test_integer_and_float_sums_of_the_counts_agree(monkeypatch):
    """Counts summed per class in uint16 (tables below 2**16 rows) or as floats: the same values."""
    n, B = 500, 40
    y, preds = labels(n, 30, accuracy=0.5, seed=17, n_seeds=2)
    mask = np.arange(n) % 3 != 0
    uint16 = distribution(y[mask], preds[:, mask], Resamples(n, B, seed=3), rows=mask)
    monkeypatch.setattr(bootstrap, "UINT16_ROWS", 0)
    floats = distribution(y[mask], preds[:, mask], Resamples(n, B, seed=3), rows=mask)
    for metric in bootstrap.METRICS:
        np.testing.assert_array_equal(uint16.resampled[metric], floats.resampled[metric])


def test_mask_positions_and_their_order_give_the_same_distribution():
    n, B = 200, 60
    y, pred = labels(n, 20, accuracy=0.5, seed=8)
    mask = np.arange(n) % 3 != 0
    resamples = Resamples(n, B, seed=1)
    by_mask = distribution(y[mask], pred[mask], resamples, rows=mask)
    positions = np.flatnonzero(mask)[::-1]
    by_positions = distribution(y[positions], pred[positions], resamples, rows=positions)
    for metric in bootstrap.METRICS:
        np.testing.assert_array_equal(by_mask.resampled[metric], by_positions.resampled[metric])
    np.testing.assert_array_equal(by_mask.rows, by_positions.rows)
    whole = distribution(y, pred, resamples)
    assert not np.array_equal(whole.resampled["accuracy"], by_mask.resampled["accuracy"])


def test_same_seed_same_result_whatever_the_chunks_and_blocks(monkeypatch):
    """Bit for bit with the same chunks; with others, equal up to float32 summation order."""
    n, B = 300, 90
    y, preds = labels(n, 40, accuracy=0.6, seed=9, n_seeds=2)
    reference = distribution(y, preds, Resamples(n, B, seed=4))
    again = distribution(y, preds, Resamples(n, B, seed=4))
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 1000)   # blocks of a few resamples within each chunk
    chunked = distribution(y, preds, Resamples(n, B, seed=4, chunk_size=17))
    one_by_one = distribution(y, preds, Resamples(n, B, seed=4, chunk_size=1))
    other_seed = distribution(y, preds, Resamples(n, B, seed=5))
    for metric in bootstrap.METRICS:
        np.testing.assert_array_equal(again.resampled[metric], reference.resampled[metric])
        np.testing.assert_allclose(chunked.resampled[metric], reference.resampled[metric], rtol=1e-6)
        np.testing.assert_allclose(one_by_one.resampled[metric], reference.resampled[metric], rtol=1e-6)
        assert other_seed.point[metric] == reference.point[metric]
        assert np.abs(other_seed.resampled[metric] - reference.resampled[metric]).max() > 1e-3


def test_identical_predictions_differ_by_nothing():
    n = 300
    y, pred = labels(n, 30, accuracy=0.6, seed=10)
    result = paired(y, pred, pred.copy(), Resamples(n, 200, seed=0))
    for metric in bootstrap.METRICS:
        assert result[f"delta_{metric}"] == 0
        assert result[f"delta_{metric}_ci"] == [0.0, 0.0]
        assert result[f"delta_{metric}_p"] == 1.0


def test_a_clearly_better_predictor_is_significant_and_the_difference_is_antisymmetric():
    n, B = 2000, 1000
    rng = np.random.default_rng(12)
    y = rng.integers(0, 50, n)
    worse = np.where(rng.random(n) < 0.55, y, (y + 1) % 50)
    better = np.where(rng.random(n) < 0.5, y, worse)   # right wherever `worse` is, and on half the rest
    resamples = Resamples(n, B, seed=0)
    ab, ba = paired(y, better, worse, resamples), paired(y, worse, better, resamples)
    for metric in bootstrap.METRICS:
        assert ab[f"delta_{metric}"] > 0.1
        assert ab[f"delta_{metric}_ci"][0] > 0
        assert ab[f"delta_{metric}_p"] < 0.01
        assert ba[f"delta_{metric}"] == pytest.approx(-ab[f"delta_{metric}"])
        np.testing.assert_allclose(ba[f"delta_{metric}_ci"], [-ab[f"delta_{metric}_ci"][1],
                                                             -ab[f"delta_{metric}_ci"][0]], atol=1e-12)
        assert ba[f"delta_{metric}_p"] == ab[f"delta_{metric}_p"]


def test_a_resample_without_any_of_a_subsets_rows_is_left_out():
    n, B = 20, 300
    y, pred = labels(n, 3, accuracy=0.5, seed=13)
    rows = np.array([4])   # one row: about (1 - 1/20)**20 ≈ 36 % of resamples never draw it
    dist = distribution(y[rows], pred[rows], Resamples(n, B, seed=0), rows=rows)
    missing = np.isnan(dist.resampled["accuracy"])
    assert 0.2 < missing.mean() < 0.5
    assert set(dist.resampled["accuracy"][~missing]) == {float(y[4] == pred[4])}
    assert dist.interval()["accuracy_ci"] == [float(y[4] == pred[4])] * 2


def test_usage_errors():
    y, pred = labels(40, 4, accuracy=0.5, seed=14)
    resamples = Resamples(40, 10)
    with pytest.raises(FgembedError, match="at least one resample"):
        Resamples(40, 0)
    with pytest.raises(FgembedError, match="metrics must be distinct names"):
        interval(y, pred, resamples, ["accuracy", "top1"])
    with pytest.raises(FgembedError, match="confidence"):
        interval(y, pred, resamples, confidence=95)
    with pytest.raises(ValueError, match="one label per scored row"):
        interval(y, pred[:-1], resamples)
    with pytest.raises(ValueError, match="one label per scored row"):
        interval(y, pred, Resamples(41, 10))
    with pytest.raises(ValueError, match="one entry per table row"):
        interval(y[:10], pred[:10], resamples, rows=np.ones(39, bool))
    with pytest.raises(ValueError, match="distinct"):
        interval(y[:2], pred[:2], resamples, rows=np.array([3, 3]))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        interval(y, pred, resamples, n_classes=3)
    with pytest.raises(ValueError, match="class ids ≥ 0"):
        interval(y - 1, pred, resamples)
    a = distribution(y, pred, resamples)
    with pytest.raises(ValueError, match="same resamples"):
        a.paired(distribution(y, pred, Resamples(40, 10, seed=1)))
    with pytest.raises(ValueError, match="same test rows"):
        a.paired(distribution(y[:30], pred[:30], resamples, rows=np.arange(30)))
