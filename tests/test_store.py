from __future__ import annotations

import numpy as np
import pytest
import zarr

from fgembed.backbones import LoadOptions
from fgembed.datasets import SPLIT_NAMES, load_dataset
from fgembed.errors import FgembedError
from fgembed.extract import ExtractOptions, extract
from fgembed.store import FeatureStore


def _opts(**kw):
    load = kw.pop("load", {})
    return ExtractOptions(batch_size=8, workers=0, shard_rows=16, progress=False,
                          load=LoadOptions(pretrained=False, **load), **kw)


@pytest.fixture(scope="module")
def cub_store(cub_root, tmp_path_factory):
    table = load_dataset("cub", cub_root)
    path = tmp_path_factory.mktemp("store") / "cub.zarr"
    extract(table, path, ["timm:test_vit", "timm:test_resnet"], _opts())
    return table, path


def test_readable_with_plain_zarr(cub_store):
    table, path = cub_store
    g = zarr.open_group(path, mode="r")
    assert g["samples/id"][:].tolist() == table.ids.tolist()
    assert g["samples/label"].dtype == np.int32 and g["samples/split"].dtype == np.uint8
    assert list(g["samples/path"][:]) == table.paths
    assert g["samples"].attrs["levels"]["order"] == table.levels["order"].names
    feats = {dict(sub.attrs)["name"]: sub for _, sub in g["features"].groups()}
    vit = feats["timm:test_vit"]
    assert vit["emb"].shape == (len(table), 64) and vit["emb"].dtype == np.float16
    assert vit["done"][:].all() and vit["emb"].chunks == (16, 64)
    assert vit.attrs["fingerprint"]["source"] == "timm" and vit.attrs["complete"] is True


def test_python_api(cub_store):
    table, path = cub_store
    fs = FeatureStore.open(path)
    assert fs.backbones() == ["timm:test_resnet", "timm:test_vit"]
    x = fs.features("timm:test_resnet", "train")
    y = fs.labels("train")
    assert x.dtype == np.float32 and x.shape == ((table.split == SPLIT_NAMES["train"]).sum(), 96)
    np.testing.assert_array_equal(y, table.labels[table.split == 0])
    np.testing.assert_array_equal(fs.labels("test", level="family"), table.levels["family"].codes[table.split == 2])
    assert fs.table().sha256() == table.sha256()
    info = fs.backbone_info("timm:test_vit")
    assert info.rows_done == len(table) and info.rows_failed == 0 and info.complete
    with pytest.raises(FgembedError, match="no features 'nope'.*timm:test_resnet"):
        fs.features("nope")
    with pytest.raises(FgembedError, match="no taxonomy level 'genus'"):
        fs.labels(level="genus")


def test_fingerprint_mismatch_is_refused_naming_what_differs(cub_store, tmp_path):
    table, path = cub_store
    with pytest.raises(FgembedError, match=r"pooling: \"pooled\" → \"mean\".*--overwrite"):
        extract(table, path, ["timm:test_vit"], _opts(load={"pooling": "mean"}))
    with pytest.raises(FgembedError, match=r"input_shape"):
        extract(table, path, ["timm:test_vit"], _opts(load={"image_size": 96}))
    other = load_dataset("cub", table.root, val_fraction=0.3)
    with pytest.raises(FgembedError, match="holds another dataset"):
        extract(other, path, ["timm:test_vit"], _opts())


def test_overwrite_replaces(cub_root, tmp_path):
    table = load_dataset("cub", cub_root)
    path = tmp_path / "s.zarr"
    extract(table, path, ["timm:test_vit"], _opts())
    extract(table, path, ["timm:test_vit"], _opts(load={"pooling": "mean"}, overwrite=True))
    fs = FeatureStore.open(path)
    assert fs.backbone_info("timm:test_vit").fingerprint["pooling"] == "mean"
    assert np.isfinite(fs.features("timm:test_vit")).all()


def test_open_errors(tmp_path):
    with pytest.raises(FgembedError, match="no feature store"):
        FeatureStore.open(tmp_path / "none.zarr")
    zarr.open_group(tmp_path / "g.zarr", mode="w")
    with pytest.raises(FgembedError, match="not a feature store"):
        FeatureStore.open(tmp_path / "g.zarr")
