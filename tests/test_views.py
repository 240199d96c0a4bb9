"""Views: design rows equal a direct numpy computation; row and class selection (classes,
held-out groups, shots) seeded and recorded; dropped rows counted; the same fusion on new
embeddings; streamed late fusion against a direct per-subset computation and float32."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from typer.testing import CliRunner

from fgembed.analysis import late_stream
from fgembed.analysis.late_stream import LogitSource, stream_late
from fgembed.classify.fusion import l2_normalise
from fgembed.classify.late import late_fusion
from fgembed.classify.metrics import classification_metrics
from fgembed.classify.config import HeadConfig
from fgembed.classify.fusion import create_fusion
from fgembed.classify.views import ViewConfig, build_view
from fgembed.errors import FgembedError

from .formats import write_feature_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_feature_store(tmp_path_factory.mktemp("views") / "f.zarr")


def _direct(store, names, rows, l2=False):
    parts = [store.features(n)[rows] for n in names]
    return np.concatenate([l2_normalise(p) if l2 else p for p in parts], axis=1)


@pytest.mark.parametrize("l2", [False, True])
def test_single_and_concat_rows_equal_numpy(store, l2):
    view = build_view(store, ViewConfig(features=("a", "c"), fusion="concat", l2=l2))
    assert view.dims == [24, 32] and view.input_dim == 56
    assert view.dropped == {"train": 0, "val": 0, "test": 1}  # the test row that failed in c
    split = store.group["samples/split"][:]
    assert len(view.rows["test"]) == int((split == 2).sum()) - 1
    for s in ("train", "val", "test"):
        assert view.X(s).dtype == np.float16
        np.testing.assert_array_equal(view.X(s), _direct(store, ["a", "c"], view.rows[s], l2).astype(np.float16))
        np.testing.assert_array_equal(view.labels(s), store.labels()[view.rows[s]])
    single = build_view(store, ViewConfig(features=("b",)))
    np.testing.assert_array_equal(single.X("val"), store.features("b")[single.rows["val"]].astype(np.float16))
    assert single.dropped["test"] == 0 and single.n_classes() == 6 and single.n_classes("group") == 3
    assert single.class_counts().sum() == len(single.rows["train"])


@pytest.mark.parametrize("l2", [True, False])
def test_pca_sum_rows_equal_sklearn_and_new_embeddings(store, l2):
    config = ViewConfig(features=("a", "b", "c"), fusion="sum", l2=l2)
    view = build_view(store, config)
    train = view.rows["train"]
    prepare = l2_normalise if l2 else (lambda x: x)
    for s in ("train", "test"):
        expected = sum(PCA(16, random_state=0).fit(prepare(store.features(n)[train]))
                       .transform(prepare(store.features(n)[view.rows[s]])) for n in "abc")
        np.testing.assert_allclose(view.X(s).astype(np.float32), expected, rtol=1e-2, atol=2e-3)
    # the view's fitted fusion on "new" embeddings of the test rows gives the view's rows
    new = [store.features(n)[view.rows["test"]] for n in "abc"]
    np.testing.assert_allclose(view.fusion.transform(new).astype(np.float32), view.X("test").astype(np.float32),
                               atol=2e-3)
    concat = ViewConfig(features=("a", "c"), fusion="concat")
    cview = build_view(store, concat)
    np.testing.assert_array_equal(cview.fusion.transform([store.features(n)[cview.rows["val"]] for n in "ac"]),
                                  cview.X("val"))
    with pytest.raises(FgembedError, match="projection"):
        create_fusion(config, view.dims).load({})  # a PCA sum without its fitted state


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_pca_sum_view_on_a_missing_gpu_is_one_line(store):
    with pytest.raises(FgembedError, match="no CUDA device"):
        build_view(store, ViewConfig(features=("a", "b"), fusion="sum"), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pca_sum_view_fitted_on_cuda_equals_the_host(store):
    config = ViewConfig(features=("a", "b", "c"), fusion="sum")
    host, gpu = build_view(store, config), build_view(store, config, device="cuda")
    for s in ("train", "test"):
        np.testing.assert_allclose(gpu.X(s).astype(np.float32), host.X(s).astype(np.float32), rtol=1e-2, atol=2e-3)


def test_class_selection_keeps_store_ids(store):
    view = build_view(store, ViewConfig(features=("a",), classes=(1, 4)))
    for s in ("train", "val", "test"):
        assert set(view.labels(s)) == {1, 4}  # never renumbered
    assert view.n_classes() == 6 and list(view.excluded_classes()) == [0, 2, 3, 5]
    assert list(view.excluded_classes("group")) == [1]  # groups 0 (classes 0,1) and 2 (4,5) are known
    with pytest.raises(FgembedError, match="not in store"):
        build_view(store, ViewConfig(features=("a",), classes=(9,)))


def test_holdout_of_whole_groups_is_seeded(store):
    config = ViewConfig(features=("a",), holdout=0.34, holdout_level="group", holdout_seed=1)
    view = build_view(store, config)
    held = view.holdout_classes
    assert len(held) == 2 and held[0] // 2 == held[1] // 2  # one group (two classes) out
    for s in ("train", "val"):
        assert not np.isin(view.labels(s), held).any()
    np.testing.assert_array_equal(view.novel, np.isin(view.labels("test"), held))
    assert view.novel.any() and not view.novel.all()
    assert build_view(store, config).holdout_classes == held  # seeded
    draws = {tuple(build_view(store, dataclasses.replace(config, holdout_seed=s)).holdout_classes) for s in range(6)}
    assert len(draws) > 1
    fine = build_view(store, ViewConfig(features=("a",), holdout=0.5))
    assert len(fine.holdout_classes) == 3
    with pytest.raises(FgembedError, match="all"):
        build_view(store, ViewConfig(features=("a",), holdout=0.99))


def test_shots_are_drawn_from_train_seeded_and_nested(store):
    full = build_view(store, ViewConfig(features=("a",)))
    two = build_view(store, ViewConfig(features=("a",), shots=2))
    five = build_view(store, ViewConfig(features=("a",), shots=5))
    assert (two.class_counts() == 2).all() and (five.class_counts() == 5).all()
    assert set(two.rows["train"]) <= set(five.rows["train"]) <= set(full.rows["train"])
    np.testing.assert_array_equal(two.rows["test"], full.rows["test"])  # val / test untouched
    np.testing.assert_array_equal(build_view(store, ViewConfig(features=("a",), shots=2)).rows["train"],
                                  two.rows["train"])
    other = build_view(store, ViewConfig(features=("a",), shots=2, draw=1))
    assert set(other.rows["train"]) != set(two.rows["train"])


def test_unflagged_nonfinite_rows_are_dropped_counted_and_warned(tmp_path):
    store = write_feature_store(tmp_path / "s.zarr")
    labels, split = store.labels(), store.group["samples/split"][:]
    bad = np.flatnonzero((split == 0) & (labels == 5))  # every training row of class 5
    emb = store._features("a")["emb"]
    for row in bad:  # as an older fgembed wrote them: inf with status ok
        emb[int(row)] = np.full(24, np.inf, np.float32)
    with pytest.warns(UserWarning, match="1 class has no training rows"):
        view = build_view(store, ViewConfig(features=("a", "b"), fusion="concat"))
    assert view.dropped["train"] == len(bad) and 5 not in set(view.labels("train"))
    np.testing.assert_array_equal(view.X("train"), _direct(store, ["a", "b"], view.rows["train"]).astype(np.float16))
    with warnings.catch_warnings():  # asked for: no warning
        warnings.simplefilter("error")
        build_view(store, ViewConfig(features=("a",), classes=(0, 1, 2, 3, 4)))


def _sources(rng, n_rows, n_classes, members, seeds, dtype, missing=()):
    """Member logits of a shared latent truth; member m lacks the rows in missing[m]."""
    y = rng.integers(0, n_classes, n_rows)
    out = []
    for m in range(members):
        z = 2.0 * np.eye(n_classes)[y] * rng.uniform(0.5, 1.5) + rng.normal(scale=2.0, size=(seeds, n_rows, n_classes))
        rows = np.setdiff1d(np.arange(n_rows), missing[m] if m < len(missing) else [])
        out.append(LogitSource(rows, z[:, rows].astype(dtype)))
    return y, out


@pytest.mark.parametrize("mode", ["logits", "proba"])
def test_streamed_late_fusion_equals_direct_per_subset(monkeypatch, mode):
    monkeypatch.setattr(late_stream, "BLOCK_ELEMENTS", 3 * 8 * 64)  # many small blocks
    rng = np.random.default_rng(0)
    y, sources = _sources(rng, 700, 8, 3, 2, np.float32, missing=([3, 50, 699], [], [10, 50]))
    subsets = [(0, 1), (0, 2), (1, 2), (0, 1, 2), (1,)]
    weights = [[rng.dirichlet(np.ones(len(s))) for _ in range(2)] for s in subsets]
    results = stream_late(sources, subsets, y, mode, weights)
    for subset, w, (per_seed, n, preds) in zip(subsets, weights, results):
        common = np.arange(700)
        for m in subset:
            common = np.intersect1d(common, sources[m].rows)
        assert n == len(common) and preds.shape == (2, n) and preds.dtype == np.int32
        for k in range(2):
            parts = [sources[m].array[k][np.searchsorted(sources[m].rows, common)] for m in subset]
            fused = late_fusion(parts, mode, w[k])
            direct = classification_metrics(fused, y[common])
            assert per_seed[k] == pytest.approx(direct, abs=1e-9)
            # every row's prediction kept, in store-row order (what the intervals resample)
            np.testing.assert_array_equal(preds[k], np.asarray(fused).argmax(1))


def test_float16_late_fusion_within_a_tenth_of_a_point_of_float32():
    rng = np.random.default_rng(1)
    y, full = _sources(rng, 20_000, 50, 3, 1, np.float32)
    half = [LogitSource(s.rows, s.array.astype(np.float16)) for s in full]
    subsets = [(0, 1), (0, 1, 2)]
    for (m32, _, _), (m16, _, _) in zip(stream_late(full, subsets, y), stream_late(half, subsets, y)):
        for key in ("accuracy", "f1", "f1_macro", "top5"):
            assert abs(m32[0][key] - m16[0][key]) < 1e-3


def test_cli_defaults_are_the_config_defaults_and_bad_values_are_one_line(store, tmp_path):
    from fgembed.cli.main import app

    from cli import _options

    head = HeadConfig()
    assert (_options.EPOCHS.default, _options.BATCH_SIZE.default, _options.HEAD.default) == \
        (head.epochs, head.batch_size, head.head)
    assert _options.floats(_options.LR.default, "--lr") == head.lr
    assert _options.floats(_options.WEIGHT_DECAY.default, "--weight-decay") == head.weight_decay
    assert _options.ints(_options.SEEDS.default, "--seeds") == head.seeds
    view = ViewConfig(features=("a",))
    assert (_options.PROJECT.default, _options.L2.default) == (view.project, view.l2)
    classes = tmp_path / "classes.txt"
    classes.write_text("# subset\nclass 1\n\nclass 4  # comment\n")
    assert _options.class_ids(classes, store.class_names) == (1, 4)
    classes.write_text("class 1\nno such class\n")
    runner = CliRunner()
    for args, message in ((["--lr", "fast"], "--lr takes"), (["--classes", str(classes)], "not classes"),
                          (["--holdout", "1.5"], "--holdout"), (["--weight-decay", "0.1,0.1"], "distinct")):
        result = runner.invoke(app, ["fit", "--store", str(store.path), "--features", "a", "--runs",
                                     str(tmp_path / "runs"), *args])
        assert isinstance(result.exception, FgembedError) and message in str(result.exception)
