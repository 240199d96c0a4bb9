"""Export to HDF5 / .npy and import back, rows matched by id, by path, or by count."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from fgembed.errors import FgembedError
from fgembed.extraction.interchange import export_features, import_features
from fgembed.images import UNREADABLE
from fgembed.store import FeatureStore

from .formats import write_feature_store


@pytest.fixture()
def store(tmp_path):
    return write_feature_store(tmp_path / "f.zarr")


def test_export_h5_and_npy_hold_the_store(store, tmp_path):
    path = export_features(store, tmp_path / "out.h5", "h5", ["a", "c"])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features/a"][:], store.features("a"))
        np.testing.assert_array_equal(f["samples/id"][:], store.group["samples/id"][:])
        assert [p.decode() for p in f["samples/path"][:3]] == [str(p) for p in store.group["samples/path"][:3]]
        assert json.loads(f["features/c"].attrs["fingerprint"])["member"] == "c"
    folder = export_features(store, tmp_path / "npy", "npy")
    np.testing.assert_array_equal(np.load(folder / "b.npy"), store.features("b"))
    np.testing.assert_array_equal(np.load(folder / "split.npy"), store.group["samples/split"][:])
    assert json.loads((folder / "meta.json").read_text())["class_names"] == store.class_names


def test_import_round_trip_by_ids(store, tmp_path):
    path = export_features(store, tmp_path / "out.h5", "h5", ["a"])
    summary = import_features(store, "a_again", path, key="features/a")
    assert summary.matched_by == "id" and summary.missing_rows == 0
    np.testing.assert_array_equal(store.features("a_again"), store.features("a"))
    assert store.backbone_info("a_again").fingerprint["source"] == "import"
    # a foreign layout: reversed rows with an `ids` dataset beside them
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["ids"] = store.group["samples/id"][:][::-1]
        f["embeddings"] = store.features("b")[::-1]
    assert import_features(store, "b_again", tmp_path / "foreign.h5").matched_by == "id"
    np.testing.assert_array_equal(store.features("b_again"), store.features("b"))


def test_import_thingsvision_style_with_order_file(store, tmp_path):
    """features.h5 with one `features` dataset, rows in another order, absolute paths listed;
    one store row missing from the file."""
    rng = np.random.default_rng(0)
    paths = [str(p) for p in store.group["samples/path"][:]]
    order = rng.permutation(len(paths))[:-1]
    matrix = rng.normal(size=(len(paths), 5)).astype(np.float32)
    with h5py.File(tmp_path / "features.h5", "w") as f:
        f.create_dataset("features", data=matrix[order])
    (tmp_path / "file_names.txt").write_text("\n".join(f"/data/cub/images/{paths[i]}" for i in order) + "\n")
    summary = import_features(store, "tv", tmp_path / "features.h5", order_file=tmp_path / "file_names.txt")
    assert summary.matched_by == "path" and summary.missing_rows == 1
    emb, status = store.group["features/tv/emb"][:], store.status("tv")
    missing = np.setdiff1d(np.arange(len(paths)), order)
    np.testing.assert_array_equal(emb[order], matrix[order])
    assert np.isnan(emb[missing]).all() and (status[missing] == UNREADABLE).all()


def test_import_by_row_order_and_refusals(store, tmp_path):
    matrix = np.random.default_rng(1).normal(size=(store.n_rows, 3))
    np.save(tmp_path / "m.npy", matrix)
    import_features(store, "npy", tmp_path / "m.npy")
    np.testing.assert_allclose(store.features("npy"), matrix, rtol=1e-6)
    np.save(tmp_path / "short.npy", matrix[:-2])
    with pytest.raises(FgembedError, match="rows but the store has"):
        import_features(store, "short", tmp_path / "short.npy")
    with pytest.raises(FgembedError, match="extracted differently"):
        import_features(store, "npy", _other(tmp_path, matrix))
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["x"], f["y"] = matrix, matrix
    with pytest.raises(FgembedError, match="--key"):
        import_features(store, "two", tmp_path / "two.h5")
    with pytest.raises(FgembedError, match="no such file"):
        import_features(store, "none", tmp_path / "absent.npy")
    assert FeatureStore.open(store.path).backbone_info("npy").complete


def _other(tmp_path, matrix):
    np.save(tmp_path / "other.npy", matrix + 1)
    return tmp_path / "other.npy"


def test_import_ids_must_match_rows_one_to_one(store, tmp_path):
    """More ids than rows, or an id twice: one line, and no group is made."""
    ids = store.group["samples/id"][:]
    matrix = np.ones((len(ids) - 3, 4), np.float32)
    with h5py.File(tmp_path / "more_ids.h5", "w") as f:
        f["ids"], f["features"] = ids, matrix
    with pytest.raises(FgembedError, match=rf"has {len(ids)} ids but {len(ids) - 3} feature rows"):
        import_features(store, "more", tmp_path / "more_ids.h5")
    twice = ids.copy()
    twice[1] = twice[0]
    with h5py.File(tmp_path / "dup.h5", "w") as f:
        f["ids"], f["features"] = twice, np.ones((len(ids), 4), np.float32)
    with pytest.raises(FgembedError, match=rf"lists image id {ids[0]} 2 times"):
        import_features(store, "dup", tmp_path / "dup.h5")
    assert set(FeatureStore.open(store.path).backbones()) == {"a", "b", "c"}
    assert not (store.path / "features" / "more").exists() and not (store.path / "features" / "dup").exists()


def test_import_flags_non_finite_rows(store, tmp_path):
    matrix = np.ones((store.n_rows, 2))
    matrix[3, 1] = np.inf
    matrix[4, 0] = 1e300  # finite in the file, inf as float32
    np.save(tmp_path / "m.npy", matrix)
    import_features(store, "m", tmp_path / "m.npy")
    assert [i for i, _, _ in store.failures("m")] == [int(store.group["samples/id"][r]) for r in (3, 4)]
    assert {s for _, _, s in store.failures("m")} == {"non-finite-embedding"}
