"""Domain similarity (Cui et al., §4): class means, EMD and the greedy selection, each checked
against a direct computation — numpy over all rows for the means, POT for the transport."""
from __future__ import annotations

import json

import numpy as np
import ot
import pytest
from fgembed.cli.main import app
from typer.testing import CliRunner

from fgembed.analysis import similarity
from fgembed.analysis.similarity import class_means, domain_similarity, select_classes
from fgembed.datasets.table import SampleTable
from fgembed.errors import FgembedError
from fgembed.images import OK, TRUNCATED, UNREADABLE
from fgembed.store import FeatureStore

SHARD = 16
FP = {"source": "timm", "model": "m", "weights": "w", "preprocessing": {}, "pooling": "pooled",
      "input_shape": [3, 8, 8], "precision": "fp32"}


def make_store(path, n=90, classes=5, dim=6, seed=0, shift=0.0, names=("a", "b"), fingerprint=FP, failed=(),
               splits=(0.6, 0.2, 0.2)):
    """A store of `n` rows with random features per backbone in `names`; rows in `failed` are unreadable."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    split = rng.choice([0, 1, 2], n, p=splits).astype(np.uint8)
    table = SampleTable("synthetic", str(path.parent), np.arange(n), [f"img{i}.jpg" for i in range(n)], labels,
                        [f"class{c}" for c in range(classes)], split)
    store = FeatureStore.create(path, table, shard_rows=SHARD)
    status = np.full(n, OK, np.uint8)
    status[list(failed)] = UNREADABLE
    status[1] = TRUNCATED  # truncated-but-loaded rows are usable
    for name in names:
        emb = (rng.normal(size=(n, dim)) + shift + labels[:, None] * 0.5).astype(np.float32)
        store.prepare(name, fingerprint, dim, "float32")
        for s in range(store.n_shards):
            rows = store.shard_slice(s)
            store.write_shard(name, s, emb[rows], status[rows])
        store.mark_complete(name, None)
    return FeatureStore.open(path)


def direct_means(store, name, split_code):
    """Means over every row at once: the reference the block-wise accumulation must equal."""
    x = store.group[f"features/{name}/emb"][:].astype(np.float64)
    y, split = store.group["samples/label"][:], store.group["samples/split"][:]
    keep = (split == split_code) & np.isfinite(x).all(1)
    classes = np.unique(y[keep])
    return classes, np.stack([x[keep & (y == c)].mean(0) for c in classes]), np.array([(keep & (y == c)).sum()
                                                                                         for c in classes])


@pytest.fixture
def stores(tmp_path):
    src = make_store(tmp_path / "src.zarr", n=120, classes=6, seed=1, failed=(3, 17, 40))
    tgt = make_store(tmp_path / "tgt.zarr", n=70, classes=4, seed=2, shift=0.7, splits=(0.8, 0, 0.2))
    return src, tgt


@pytest.mark.parametrize("block_rows", [SHARD * 2, 8192])
def test_class_means_equal_numpy_over_all_rows(stores, monkeypatch, block_rows):
    monkeypatch.setattr(similarity, "BLOCK_ROWS", block_rows)  # several blocks, or one
    src, _ = stores
    means, counts = class_means(src, "a", "train")
    classes, ref, ref_counts = direct_means(src, "a", 0)
    np.testing.assert_allclose(means[classes], ref, rtol=1e-12)
    np.testing.assert_array_equal(counts[classes], ref_counts)
    assert counts.sum() == ref_counts.sum()
    # failed rows are left out: the count is what the split holds minus the failed rows in it
    split, failed = src.group["samples/split"][:], np.array([3, 17, 40])
    assert counts.sum() == (split == 0).sum() - (split[failed] == 0).sum()


def test_nan_row_with_ok_status_is_left_out(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=40, classes=3)
    FeatureStore.open(store.path, "r+").group["features/a/emb"][5] = np.nan  # status still ok
    _, counts = class_means(store, "a", "train")
    label, split = int(store.group["samples/label"][5]), int(store.group["samples/split"][5])
    full = np.bincount(store.group["samples/label"][:][store.group["samples/split"][:] == 0], minlength=3)
    assert counts[label] == full[label] - (split == 0)
    assert np.isfinite(class_means(store, "a", "train")[0][counts > 0]).all()


def test_emd_equals_a_direct_pot_computation(stores):
    src, tgt = stores
    results = domain_similarity(src, tgt, ["a", "b"], "train", "test")
    assert [r.features for r in results] == ["a", "b"]
    for r in results:
        _, ms, cs = direct_means(src, r.features, 0)
        _, mt, ct = direct_means(tgt, r.features, 2)
        d = ot.emd2(cs / cs.sum(), ct / ct.sum(), ot.dist(ms, mt, metric="euclidean"))
        assert r.emd == pytest.approx(d, rel=1e-9)
        assert r.similarity == pytest.approx(np.exp(-0.01 * d), rel=1e-12)
        assert (r.source_classes, r.target_classes) == (len(cs), len(ct))
        # the paper's form: Σ f_ij d_ij / Σ f_ij over the optimal flow
        plan = ot.emd(cs / cs.sum(), ct / ct.sum(), ot.dist(ms, mt, metric="euclidean"))
        assert r.emd == pytest.approx((plan * ot.dist(ms, mt, metric="euclidean")).sum() / plan.sum(), rel=1e-9)


def test_a_domain_is_at_distance_zero_from_itself(stores):
    src, _ = stores
    (r,) = domain_similarity(src, src, "a")
    assert r.emd == pytest.approx(0, abs=1e-6) and r.similarity == pytest.approx(1.0)


def test_selection_ranks_like_a_per_class_pot_computation(stores):
    src, tgt = stores
    scores = select_classes(src, tgt, "a", 4, gamma=0.05)
    classes, ms, _ = direct_means(src, "a", 0)
    _, mt, ct = direct_means(tgt, "a", 0)
    cost = ot.dist(ms, mt, metric="euclidean")
    direct = np.array([ot.emd2(np.ones(1), ct / ct.sum(), cost[i:i + 1]) for i in range(len(classes))])
    order = np.argsort(direct)[:4]
    assert [s.label for s in scores] == classes[order].tolist()
    assert [s.name for s in scores] == [f"class{c}" for c in classes[order]]
    np.testing.assert_allclose([s.emd for s in scores], direct[order], rtol=1e-9)
    np.testing.assert_allclose([s.similarity for s in scores], np.exp(-0.05 * direct[order]), rtol=1e-9)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_json_matrix_and_heatmap(stores, tmp_path):
    src, tgt = stores
    plot = tmp_path / "sim.png"
    result = invoke("similarity", "--source", src.path, "--source", tgt.path, "--target", tgt.path,
                    "--features", "a,b", "--format", "json", "--plot", plot, "--quiet")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 4 and {"features", "source", "target", "emd", "similarity"} <= set(rows[0])
    direct = {(r.features, r.source, r.target): r.emd for r in domain_similarity([src, tgt], tgt, ["a", "b"])}
    for row in rows:
        assert row["emd"] == pytest.approx(direct[row["features"], row["source"], row["target"]])
    assert plot.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"
    table = invoke("similarity", "--source", src.path, "--target", tgt.path, "--target", src.path,
                   "--features", "a", "--plot", tmp_path / "m.png", "--quiet")
    assert table.exit_code == 0 and "the EMD in brackets" in table.stdout


def test_cli_select_writes_the_class_list_fit_reads(stores, tmp_path):
    src, tgt = stores
    out = tmp_path / "classes.txt"
    result = invoke("similarity", "--source", src.path, "--target", tgt.path, "--features", "b",
                    "--select", 3, "--out", out, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
    expected = [s.name for s in select_classes(src, tgt, "b", 3)]
    assert lines == expected and [r["name"] for r in json.loads(result.stdout)] == expected
    assert all(name in src.class_names for name in lines)


@pytest.mark.parametrize("args, message", [
    (["--features", "nope"], "has no features 'nope'"),
    (["--features", "a", "--source-split", "dev"], "unknown split 'dev'"),
    (["--features", "a", "--target-split", "val"], "has no usable val rows for 'a'"),
    (["--features", "a", "--format", "xml"], "unknown --format 'xml'"),
    (["--features", "a", "--select", "3"], "give it --out FILE"),
    (["--features", "a", "--select", "99", "--out", "x.txt"], "--select 99: choose 1 to"),
    (["--features", "a,b", "--select", "2", "--out", "x.txt"], "one of each"),
])
def test_cli_errors_are_one_line(stores, args, message):
    src, tgt = stores
    result = invoke("similarity", "--source", src.path, "--target", tgt.path, *args, "--quiet")
    assert isinstance(result.exception, FgembedError), result.output
    assert result.exception.exit_code == 2 and message in str(result.exception)
    assert "\n" not in str(result.exception)


def test_store_lacking_a_backbone_or_in_another_space_is_refused(stores, tmp_path):
    src, _ = stores
    only_a = make_store(tmp_path / "only_a.zarr", names=("a",))
    with pytest.raises(FgembedError, match=r"only_a.zarr has no features 'b'; has: a"):
        domain_similarity(src, only_a, "b")
    other = make_store(tmp_path / "other.zarr", fingerprint={**FP, "pooling": "mean"})
    with pytest.raises(FgembedError, match=r"differ between .*\(pooling\)"):
        domain_similarity(src, other, "a")
    bf16 = make_store(tmp_path / "bf16.zarr", fingerprint={**FP, "precision": "bf16"})
    assert domain_similarity(src, bf16, "a")[0].emd > 0  # precision only rounds: comparable


def test_incomplete_features_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    table = SampleTable("synthetic", str(tmp_path), np.arange(40), [f"{i}.jpg" for i in range(40)],
                        rng.integers(0, 2, 40), ["x", "y"], np.zeros(40))
    store = FeatureStore.create(tmp_path / "p.zarr", table, shard_rows=SHARD)
    store.prepare("a", FP, 4, "float32")
    store.write_shard("a", 0, rng.normal(size=(SHARD, 4)), np.zeros(SHARD, np.uint8))
    with pytest.raises(FgembedError, match=r"incomplete \(16/40 rows\)"):
        class_means(store, "a")
