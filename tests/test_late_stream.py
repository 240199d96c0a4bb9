"""Late fusion of many subsets in one pass: the running sums (`late.running_combine`, a trie of
the subsets' members) against `late.combine` per subset, and the streamed scorer (`late_stream`)
against `late.late_fusion` + scikit-learn on each subset's common rows — zarr-backed logits with
small chunks, rows missing in some members, skipped rows, seeds that differ, two levels."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import zarr
from sklearn import metrics as skm

from fgembed.analysis import late_stream
from fgembed.analysis.late_stream import LogitSource, stream_late, stream_late_levels
from fgembed.classify.hierarchy_metrics import Taxonomy
from fgembed.classify.late import combine, late_fusion, prepare, running_combine
from fgembed.classify.metrics import MetricCounts, top_k_hits

ALL_FIVE = [s for r in range(1, 6) for s in itertools.combinations(range(5), r)]


def _members(rng, n_rows: int, n_classes: int, n_members: int, y: np.ndarray | None = None) -> list[torch.Tensor]:
    y = rng.integers(0, n_classes, n_rows) if y is None else y
    return [torch.as_tensor(3.0 * np.eye(n_classes)[y] * rng.uniform(0.3, 1.5)
                            + rng.normal(scale=2.0, size=(n_rows, n_classes)), dtype=torch.float32)
            for _ in range(n_members)]


@pytest.mark.parametrize("mode", ["logits", "proba"])
@pytest.mark.parametrize("which", ["all", "gaps"])
def test_running_sums_equal_combine_per_subset(mode, which):
    rng = np.random.default_rng(1)
    members = [prepare(z, mode) for z in _members(rng, 300, 40, 5)]
    subsets = ALL_FIVE if which == "all" else [(3,), (0, 4), (1, 2, 3), (0,), (0, 1, 2, 3, 4), (2, 4)]
    subsets = [subsets[i] for i in rng.permutation(len(subsets))]  # any order in, each subset once out
    seen = []
    for i, fused in running_combine(members, subsets, mode):
        direct = combine([members[m] for m in subsets[i]], None, mode)
        torch.testing.assert_close(fused, direct, rtol=1e-5, atol=1e-5)
        assert torch.equal(fused.argmax(1), direct.argmax(1))
        seen.append(i)
    assert sorted(seen) == list(range(len(subsets)))


@pytest.mark.parametrize("mode", ["logits", "proba"])
def test_ranks_only_sums_order_classes_as_combine_does(mode):
    rng = np.random.default_rng(2)
    members = [prepare(z, mode) for z in _members(rng, 200, 30, 4)]
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    subsets = [subsets[i] for i in rng.permutation(len(subsets))]
    for i, total in running_combine(members, subsets, mode, ranks_only=True):
        direct = combine([members[m] for m in subsets[i]], None, mode)
        fresh = members[min(subsets[i])].clone()
        for m in sorted(subsets[i])[1:]:
            fresh += members[m]
        assert torch.equal(total, fresh)  # bit for bit: nothing subtracted, nothing left over
        assert torch.equal(total.argmax(1), direct.argmax(1))


@pytest.mark.parametrize("mode", ["logits", "proba"])
def test_combine_and_prepare_into_buffers_equal_their_fresh_results(mode):
    rng = np.random.default_rng(8)
    raw = [z.half() for z in _members(rng, 50, 20, 3)]
    members = [prepare(z, mode, torch.empty(50, 20)) for z in raw]
    for got, z in zip(members, raw):
        torch.testing.assert_close(got, prepare(z, mode), rtol=1e-6, atol=1e-7)
    weights = rng.dirichlet(np.ones(3))
    out = torch.empty(50, 20)
    assert combine(members, weights, mode, out=out) is out
    torch.testing.assert_close(out, combine(members, weights, mode), rtol=1e-5, atol=1e-6)


def test_top_k_hits_equal_scikit_learn_and_count_a_tie_at_the_kth_place():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(500, 30)).astype(np.float32)
    y = rng.integers(0, 30, 500)
    assert top_k_hits(scores, y).mean() == pytest.approx(skm.top_k_accuracy_score(y, scores, k=5, labels=np.arange(30)))
    tied = np.array([[5, 4, 3, 2, 1, 1, 0]], np.float32)  # class 5 ties class 4 in fifth place
    assert top_k_hits(tied, np.array([5])).all() and not top_k_hits(tied, np.array([6])).any()
    counts = MetricCounts(30)
    for start in range(0, 500, 64):  # blocks add up to the whole at once
        pred = counts.update(torch.from_numpy(scores[start:start + 64]), y[start:start + 64])
        assert torch.equal(pred, torch.from_numpy(scores[start:start + 64].argmax(1)))
    got = counts.metrics()
    pred = scores.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["top5"] == pytest.approx(skm.top_k_accuracy_score(y, scores, k=5, labels=np.arange(30)))


class Recorded:
    """A zarr array that records the row slices read from it."""

    def __init__(self, array: zarr.Array) -> None:
        self.array, self.reads = array, []
        self.shape, self.chunks = array.shape, array.chunks

    def __getitem__(self, key):
        self.reads.append((key[1].start, key[1].stop))
        return self.array[key]


def _sources(tmp_path, rng, y, n_members, seeds, chunk, missing=(), dtype=np.float32, name="m"):
    """Zarr-backed member logits `[seeds, rows, classes]` in chunks of `chunk` rows; member m
    lacks the rows in missing[m]; seeds[m] seeds."""
    n_classes, out = int(y.max()) + 1, []
    for m in range(n_members):
        rows = np.setdiff1d(np.arange(len(y)), missing[m] if m < len(missing) else [])
        z = np.stack([_members(rng, len(y), n_classes, 1, y)[0].numpy()[rows] for _ in range(seeds[m])])
        group = zarr.open_group(tmp_path / f"{name}{m}.zarr", mode="w")
        array = group.create_array("test", shape=z.shape, dtype=dtype, chunks=(1, chunk, n_classes))
        array[...] = z.astype(dtype)
        out.append(LogitSource(rows, Recorded(array)))
    return out


def _direct(sources, subset, y, k, mode, keep):
    """Common rows of the subset's members (less the skipped), their `late_fusion` at seed k."""
    rows = keep
    for m in subset:
        rows = np.intersect1d(rows, sources[m].rows)
    parts = [sources[m].array.array[k, np.searchsorted(sources[m].rows, rows)] for m in subset]
    return rows, late_fusion(parts, mode)


def _sklearn(fused: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred, labels = fused.argmax(1), np.arange(fused.shape[1])
    return {"accuracy": skm.accuracy_score(y, pred), "f1": skm.f1_score(y, pred, average="weighted"),
            "f1_macro": skm.f1_score(y, pred, average="macro"),
            "precision": skm.precision_score(y, pred, average="weighted", zero_division=0),
            "recall": skm.recall_score(y, pred, average="weighted"),
            "top5": skm.top_k_accuracy_score(y, fused, k=5, labels=labels),
            "mean_class_accuracy": skm.balanced_accuracy_score(y, pred)}


@pytest.mark.parametrize("mode", ["logits", "proba"])
def test_streamed_subsets_equal_late_fusion_and_scikit_learn(tmp_path, monkeypatch, mode):
    """Any order, gaps, single members; member 3 lacks rows, member 1 has one seed of two;
    skipped rows are scored by no subset; blocks of 64 rows over chunks of 32, pieces of 16."""
    monkeypatch.setattr(late_stream, "BLOCK_ELEMENTS", 4 * 12 * 64)
    monkeypatch.setattr(late_stream, "PIECE_ELEMENTS", 5 * 12 * 16)
    rng = np.random.default_rng(4)
    y = rng.integers(0, 12, 700)
    sources = _sources(tmp_path, rng, y, 4, seeds=[2, 1, 2, 2], chunk=32, missing=([], [], [], [5, 6, 300, 699]))
    skip = np.zeros(700, bool)
    skip[rng.choice(700, 40, replace=False)] = True
    subsets = [(2, 0, 3), (1,), (3,), (0, 2), (0, 1, 2, 3), (1, 3), (2,)]
    results = stream_late(sources, subsets, y, mode, skip=skip)
    for subset, (per_seed, n, preds) in zip(subsets, results):
        assert len(per_seed) == (1 if 1 in subset else 2)
        for k, got in enumerate(per_seed):
            rows, fused = _direct(sources, subset, y, k, mode, np.flatnonzero(~skip))
            assert n == len(rows)
            np.testing.assert_array_equal(preds[k], fused.argmax(1))
            assert got == pytest.approx(_sklearn(fused, y[rows]) | got, abs=1e-9)
            assert set(_sklearn(fused, y[rows])) <= set(got)


def test_whole_chunks_are_read_once_whatever_rows_are_skipped(tmp_path, monkeypatch):
    """Blocks of 128 rows over chunks of 64: a member holding every row reads each chunk once
    (slices on chunk edges), though skipped rows and another member's gaps shift the union."""
    monkeypatch.setattr(late_stream, "BLOCK_ELEMENTS", 3 * 10 * 150)  # 150 rows: rounded to 128
    rng = np.random.default_rng(5)
    y = rng.integers(0, 10, 1000)
    sources = _sources(tmp_path, rng, y, 3, seeds=[1, 1, 1], chunk=64, missing=([], [], np.arange(100, 160)))
    skip = np.zeros(1000, bool)
    skip[rng.choice(1000, 90, replace=False)] = True
    stream_late(sources, [(0, 1), (0, 2), (0, 1, 2)], y, skip=skip)
    for source in sources[:2]:
        chunks = [c for lo, hi in source.array.reads for c in range(lo // 64, (hi - 1) // 64 + 1)]
        assert sorted(chunks) == list(range(16))  # every chunk of 64 rows read, none twice
        assert [lo for lo, _ in source.array.reads] == list(range(0, 1000, 128))


def test_blocks_are_whole_chunks_or_halves_of_one():
    assert late_stream._block_rows(5, 10_000, 4096) == 2048  # iNat: 256 MB of float16 for five members
    assert late_stream._block_rows(1, 100, 4096) % 4096 == 0
    assert late_stream._block_rows(3, 8) == late_stream.BLOCK_ELEMENTS // 24  # numpy logits: no chunks


def test_two_levels_equal_numpy_per_level_with_consistency_and_severity(tmp_path, monkeypatch):
    """A genus level (4 species a genus) and the species: each level's metrics are its own
    late fusion's; consistency and mistake severity are those of the fused argmax at both."""
    monkeypatch.setattr(late_stream, "PIECE_ELEMENTS", 4 * 30 * 8)
    rng = np.random.default_rng(6)
    y = rng.integers(0, 24, 400)
    genus = y // 4
    fine = _sources(tmp_path, rng, y, 3, seeds=[1, 1, 1], chunk=50, missing=([], [7, 8], []))
    coarse = _sources(tmp_path, rng, genus, 3, seeds=[1, 1, 1], chunk=50, missing=([], [7, 8], []), name="g")
    taxonomy = Taxonomy.from_codes({"genus": genus, "label": y}, ["genus", "label"])
    subsets = [(0, 1), (2,), (0, 1, 2)]
    results = stream_late_levels([coarse, fine], subsets, [genus, y], "logits", taxonomy=taxonomy)
    for subset, (per_seed, n, _) in zip(subsets, results):
        rows, z_fine = _direct(fine, subset, y, 0, "logits", np.arange(400))
        _, z_coarse = _direct(coarse, subset, genus, 0, "logits", np.arange(400))
        got = per_seed[0]
        assert got["levels"]["genus"]["accuracy"] == pytest.approx(skm.accuracy_score(genus[rows], z_coarse.argmax(1)))
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(y[rows], z_fine.argmax(1)))
        pred = z_fine.argmax(1)
        assert got["consistency"] == pytest.approx(np.mean(z_coarse.argmax(1) == pred // 4))
        wrong = pred != y[rows]
        assert got["mistake_severity"] == pytest.approx(np.mean(pred[wrong] // 4 == genus[rows][wrong]))


def test_float16_logits_within_a_few_rows_of_float32_combine(tmp_path, monkeypatch):
    """Stored float16 logits tie often in float32 sums: predictions may differ from
    `late_fusion`'s in a few tied rows (as CONVENTIONS allows), metrics hardly at all."""
    monkeypatch.setattr(late_stream, "PIECE_ELEMENTS", 6 * 50 * 128)
    rng = np.random.default_rng(7)
    y = rng.integers(0, 50, 1500)
    sources = _sources(tmp_path, rng, y, 5, seeds=[1] * 5, chunk=256, dtype=np.float16)
    results = stream_late(sources, ALL_FIVE, y)
    for subset, (per_seed, _, preds) in zip(ALL_FIVE, results):
        rows, fused = _direct(sources, subset, y, 0, "logits", np.arange(1500))
        assert (preds[0] != fused.argmax(1)).sum() <= 3
        assert per_seed[0]["accuracy"] == pytest.approx(skm.accuracy_score(y, fused.argmax(1)), abs=1e-3)
