from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from fgembed.cli.main import app
from typer.testing import CliRunner

from fgembed.backbones import LoadOptions
from fgembed.backbones.base import weights_id
from fgembed.datasets import SPLIT_NAMES, load_dataset
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.images import NONFINITE, OK
from fgembed.store import FeatureStore
from fgembed.synthetic import generate, write_manifest


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
    with pytest.raises(FgembedError, match=r"dtype: float16 → float32"):
        extract(table, path, ["timm:test_vit"], _opts(dtype="float32"))
    other = load_dataset("cub", table.root, val_fraction=0.3)
    with pytest.raises(FgembedError, match=r"same images with other labels or splits .*fraction.*0\.2.*0\.3"):
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


# ---- dataset identity, --overwrite, atomic setup, fingerprints, locks ----------------------------


@pytest.fixture()
def data(tmp_path):
    root = tmp_path / "data"
    write_manifest(root, generate(root, groups=1, classes_per_group=2, per_class=8, size=(24, 24)))
    return root


def _table(root, val=0.0):
    return load_dataset("manifest", root / "manifest.csv", val_fraction=val)


def _fill(store, name, dim=3, seed=0):
    store.prepare(name, {"source": "test", "member": name}, dim, "float32")
    emb = np.random.default_rng(seed).normal(size=(store.n_rows, dim))
    for shard in range(store.n_shards):
        rows = store.shard_slice(shard)
        store.write_shard(name, shard, emb[rows], np.zeros(rows.stop - rows.start, np.uint8))
    store.mark_complete(name, None)
    return emb.astype(np.float32)


def test_identity_refuses_another_root_and_changed_files(data, tmp_path):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, _table(data), shard_rows=4)
    _fill(store, "a")
    assert store.identity["root"] == str(data.resolve()) and len(store.identity["sample_rows"]) == 16
    twin = tmp_path / "data2"
    shutil.copytree(data, twin)  # the same relative paths, sizes and mtimes: only the root differs
    with pytest.raises(FgembedError, match=r"images under .*/data, this run reads .*/data2"):
        FeatureStore.create(path, _table(twin))
    FeatureStore.create(path, _table(data))  # the same files resume
    table = _table(data)
    image = data / table.paths[5]
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(FgembedError, match=rf"1 image files changed \(first: {table.paths[5]}, size"):
        FeatureStore.create(path, table)
    os.utime(image, ns=(1, 1))
    image.write_bytes(image.read_bytes()[:-1])
    os.utime(image, ns=(1, 1))
    with pytest.raises(FgembedError, match="modified since"):
        FeatureStore.create(path, table)
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["identity"]["root"] == str(data.resolve())


def test_store_without_identity_still_opens_and_resumes(data, tmp_path):
    """A store written before identities were recorded: no identity attrs, no size/mtime arrays."""
    path = tmp_path / "old.zarr"
    emb = _fill(FeatureStore.create(path, _table(data), shard_rows=4), "a")
    g = zarr.open_group(path / "samples", mode="r+")
    attrs = dict(g.attrs)
    del attrs["identity"], attrs["rows_sha256"]
    g.attrs.put(attrs)
    for name in ("file_size", "file_mtime_ns"):
        shutil.rmtree(path / "samples" / name)
    store = FeatureStore.create(path, _table(data))
    np.testing.assert_array_equal(store.features("a"), emb)
    assert CliRunner().invoke(app, ["info", str(path)]).exit_code == 0


def test_split_change_rewrites_samples_only_and_keeps_every_backbone(data, tmp_path):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, _table(data), shard_rows=4)
    a, b = _fill(store, "a"), _fill(store, "b", seed=1)
    with pytest.raises(FgembedError, match="same images with other labels or splits.*--overwrite rewrites samples/"):
        FeatureStore.create(path, _table(data, val=0.25), names=["a"])
    store = FeatureStore.create(path, _table(data, val=0.25), overwrite=True, names=["a"])
    assert store.backbones() == ["a", "b"] and (store.group["samples/split"][:] == 1).sum() > 0
    np.testing.assert_array_equal(store.features("b"), b)
    np.testing.assert_array_equal(store.features("a"), a)


def test_overwrite_of_other_images_replaces_only_what_it_names(data, tmp_path):
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, _table(data), shard_rows=4)
    _fill(store, "a"), _fill(store, "b")
    other = tmp_path / "other"
    write_manifest(other, generate(other, groups=1, classes_per_group=2, per_class=5, size=(24, 24)))
    with pytest.raises(FgembedError, match=r"another dataset.*--overwrite naming every backbone in it \(a, b\)"):
        FeatureStore.create(path, _table(other), names=["a"])
    with pytest.raises(FgembedError, match="--overwrite replaces only the backbones it names, and b would"):
        FeatureStore.create(path, _table(other), overwrite=True, names=["a"])
    assert FeatureStore.open(path).backbones() == ["a", "b"]  # refused: nothing touched
    store = FeatureStore.create(path, _table(other), overwrite=True, names=["a", "b"])
    assert store.n_rows == 10 and store.backbones() == []


def test_half_made_stores_open_and_are_repaired(data, tmp_path):
    """The states once found after kills during setup (by the release before atomic setup)."""
    path = tmp_path / "s.zarr"
    emb = _fill(FeatureStore.create(path, _table(data), shard_rows=4), "a")
    runner = CliRunner()
    zarr.open_group(path / "features", mode="r+").create_group("b")  # killed inside create_group: no name
    (path / ".fgembed" / "staging" / "b-1-x").mkdir(parents=True)  # and a staged group left behind
    assert FeatureStore.open(path).backbones() == ["a"] and runner.invoke(app, ["info", str(path)]).exit_code == 0
    store = FeatureStore.create(path, _table(data))
    _fill(store, "b")
    assert store.backbones() == ["a", "b"] and not list((path / ".fgembed" / "staging").iterdir())
    shutil.rmtree(path / "features")  # killed after samples/, before features/
    assert FeatureStore.open(path).backbones() == []
    assert FeatureStore.create(path, _table(data)).backbones() == []
    _fill(FeatureStore.open(path, "r+"), "a")
    shutil.rmtree(path / "samples" / "id")  # killed before the sample arrays existed
    result = runner.invoke(app, ["info", str(path)])
    assert isinstance(result.exception, FgembedError) and "setup was interrupted" in str(result.exception)
    store = FeatureStore.create(path, _table(data))
    np.testing.assert_array_equal(store.features("a"), emb)
    (path / "zarr.json").unlink()  # killed before the ready mark
    with pytest.raises(FgembedError, match="setup was interrupted"):
        FeatureStore.open(path)
    assert FeatureStore.create(path, _table(data)).backbones() == ["a"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FgembedError, match="not a feature store"):
        FeatureStore.create(tmp_path / "mine", _table(data))


def test_fingerprint_strict_part_refuses_recorded_part_warns(data, tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", _table(data), shard_rows=4)
    fp = {"source": "t", "pooling": "cls", "versions": {"torch": "2.6"}}
    assert store.prepare("a", fp, 3, recorded={"host": "h1"}) == []
    attrs = dict(store.group["features/a"].attrs)
    assert "versions" not in attrs["fingerprint"] and attrs["recorded"]["versions"] == {"torch": "2.6"}
    assert attrs["fingerprint_schema"] == 2
    warnings = store.prepare("a", {**fp, "versions": {"torch": "2.7"}}, 3, recorded={"host": "h2"})
    assert len(warnings) == 2 and any('versions.torch: "2.6" → "2.7"' in w for w in warnings)
    with pytest.raises(FgembedError, match=r'pooling: "cls" → "mean"'):
        store.prepare("a", {**fp, "pooling": "mean"}, 3)
    # a schema-1 group: versions inside the fingerprint, no `pooling` recorded at all
    store.group["features/a"].attrs.update({"fingerprint": {"source": "t", "versions": {"torch": "2.3"}}})
    del store.group["features/a"].attrs["fingerprint_schema"]
    assert FeatureStore.open(store.path).backbone_info("a").fingerprint == {"source": "t"}
    with pytest.raises(FgembedError, match=r"older fgembed that did not record pooling.*--overwrite \(it replaces only"):
        store.prepare("a", fp, 3)


def test_nonfinite_embeddings_are_flagged_rows(data, tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", _table(data), shard_rows=4)
    store.prepare("a", {"source": "t"}, 2, "float16")
    emb = np.ones((4, 2))
    emb[1, 0] = 1e6  # past float16's 65504: inf once stored
    emb[2, 1] = np.nan
    store.write_shard("a", 0, emb, np.zeros(4, np.uint8))
    status = store.status("a")[:4]
    assert status.tolist() == [OK, NONFINITE, NONFINITE, OK]
    assert np.isnan(store.group["features/a/emb"][1:3]).all()
    assert [f[2] for f in store.failures("a")] == ["non-finite-embedding"] * 2


def test_disk_full_is_one_line_and_leaves_the_store_resumable(data, tmp_path, monkeypatch):
    """ENOSPC injected at the library boundary: zarr's LocalStore.set (what writes every chunk)."""
    store = FeatureStore.create(tmp_path / "s.zarr", _table(data), shard_rows=4)
    store.prepare("a", {"source": "t"}, 2, "float32")
    real = zarr.storage.LocalStore.set

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    with pytest.raises(FgembedError, match="disk full .*the store is intact.*rerun the same command to resume"):
        store.write_shard("a", 1, np.ones((4, 2)), np.zeros(4, np.uint8))
    with pytest.raises(FgembedError, match="disk full"):
        store.prepare("b", {"source": "t"}, 2)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    store = FeatureStore.open(store.path, "r+")
    assert store.backbones() == ["a"] and 1 in store.pending_shards("a")
    store.write_shard("a", 1, np.ones((4, 2)), np.zeros(4, np.uint8))
    assert 1 not in store.pending_shards("a")


def test_writer_locks_and_partial_files_of_live_writers(data, tmp_path):
    path = tmp_path / "s.zarr"
    first = FeatureStore.create(path, _table(data), shard_rows=4)
    _fill(first, "a"), _fill(first, "b")
    first.lock_features("a")
    live = path / "features" / "a" / "emb" / "c" / "0" / "0.abc.partial"  # the live writer's temp file
    live.write_bytes(b"x")
    second = FeatureStore.open(path, "r+")
    with pytest.raises(FgembedError, match=r"another fgembed job \(pid \d+ on .*\) is writing features 'a'"):
        second.lock_features("a")
    second.lock_features("b")  # another backbone of the same store: allowed at once
    assert live.exists()
    first.release()
    second.lock_features("a")
    assert not live.exists()  # a dead writer's temp file, cleared by the group's next writer
    second.release()


def test_weights_id_hashes_local_folders(tmp_path):
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights-1")
    a = weights_id(LoadOptions(), str(folder))
    assert a.startswith("dir:hf_model:sha256:") and a == weights_id(LoadOptions(), f"local-dir:{folder}")
    (folder / "model.safetensors").write_bytes(b"weights-2")
    assert weights_id(LoadOptions(), str(folder)) != a
    assert weights_id(LoadOptions(), "facebook/dinov2-base") == "facebook/dinov2-base"
    with pytest.raises(FgembedError, match="weights not found"):
        weights_id(LoadOptions(), f"local-dir:{tmp_path / 'none'}")


def test_overwrite_refuses_while_a_named_group_is_being_written(data, tmp_path):
    """--overwrite may not pull a group from under its live writer: create() takes the named
    groups' locks before touching anything."""
    path = tmp_path / "s.zarr"
    writer = FeatureStore.create(path, _table(data), shard_rows=4, names=["a"])
    _fill(writer, "a")
    other = tmp_path / "other"
    write_manifest(other, generate(other, groups=1, classes_per_group=2, per_class=5, size=(24, 24)))
    with pytest.raises(FgembedError, match="another fgembed job .* is writing features 'a'"):
        FeatureStore.create(path, _table(other), overwrite=True, names=["a"])
    assert FeatureStore.open(path).backbones() == ["a"]
    writer.release()
    assert FeatureStore.create(path, _table(other), overwrite=True, names=["a"]).backbones() == []


# ---- review fixes: group width, --overwrite of other images on failure, unreadable --store ------------


def test_a_group_of_another_width_is_refused_naming_both_dims(data, tmp_path):
    """Same name and fingerprint, another width: rows would land shifted in the old array."""
    store = FeatureStore.create(tmp_path / "s.zarr", _table(data), shard_rows=4)
    emb = _fill(store, "a", dim=3)
    fp = {"source": "test", "member": "a"}
    with pytest.raises(FgembedError) as refused:
        store.prepare("a", fp, 5, "float32")
    message = str(refused.value)
    assert "\n" not in message and "features 'a'" in message and "dim: 3 → 5" in message and "--overwrite" in message
    np.testing.assert_array_equal(store.features("a"), emb)  # refused: nothing touched
    # a group whose dtype attribute was never recorded is checked against its array's own dtype
    del store.group["features/a"].attrs["dtype"]
    assert store.prepare("a", fp, 3, "float32") == []
    with pytest.raises(FgembedError, match="dtype: float32 → float16"):
        store.prepare("a", fp, 3, "float16")
    store.prepare("a", fp, 5, "float32", overwrite=True)
    assert store.backbone_info("a").dim == 5 and store.group["features/a/emb"].shape == (16, 5)
    assert store.pending_shards("a") == list(range(store.n_shards))


def _other_images(tmp_path):
    other = tmp_path / "other"
    write_manifest(other, generate(other, groups=1, classes_per_group=2, per_class=5, size=(24, 24)))
    return _table(other)


def test_overwrite_with_other_images_that_fails_leaves_the_old_store(data, tmp_path, monkeypatch):
    """--overwrite of another dataset builds the new samples/ aside: a full disk while writing it,
    or Ctrl-C while swapping it in, leaves the old store opening with its old rows and groups."""
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, _table(data), shard_rows=4)
    a, b = _fill(store, "a"), _fill(store, "b", seed=1)
    other = _other_images(tmp_path)

    def old_store_intact():
        old = FeatureStore.open(path)
        assert old.n_rows == 16 and old.backbones() == ["a", "b"]
        np.testing.assert_array_equal(old.features("a"), a)
        np.testing.assert_array_equal(old.features("b"), b)
        assert old.table().sha256() == _table(data).sha256()

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(zarr.storage.LocalStore, "set", full)
        with pytest.raises(FgembedError, match="disk full .*the store is intact"):
            FeatureStore.create(path, other, overwrite=True, names=["a", "b"])
    old_store_intact()

    real_rename, staged = os.rename, []

    def interrupted(src, dst):  # Ctrl-C just before the new samples/ takes the old one's place (once)
        if not staged and os.path.basename(dst) == "samples" and "staging" in str(src):
            staged.append(src)
            raise KeyboardInterrupt
        return real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", interrupted)
        with pytest.raises(KeyboardInterrupt):
            FeatureStore.create(path, other, overwrite=True, names=["a", "b"])
    assert staged  # the interrupt came after the old features/ was moved out and the new one in
    old_store_intact()
    store = FeatureStore.create(path, other, overwrite=True, names=["a", "b"])
    assert store.n_rows == 10 and store.backbones() == []
    assert not list((path / ".fgembed" / "trash").iterdir()) and not list((path / ".fgembed" / "staging").iterdir())


def test_an_unreadable_store_folder_is_one_line(data, tmp_path, monkeypatch):
    """Listing a --store folder without read permission (injected: these tests may run as root,
    for whom chmod denies nothing) is one line naming the folder, not a PermissionError."""
    path = tmp_path / "locked.zarr"
    path.mkdir()
    real_iterdir = Path.iterdir

    def denied(self):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        yield from real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(FgembedError) as refused:
        FeatureStore.create(path, _table(data))
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "permission denied" in message


def test_an_unreadable_store_is_one_line_on_open(data, tmp_path, monkeypatch):
    """Opening a store whose folder denies access (fit, ensemble, info…) is one line, as creating it is."""
    path = tmp_path / "locked.zarr"
    FeatureStore.create(path, _table(data))
    real_stat = Path.stat

    def denied(self, *args, **kwargs):
        if self == path / "zarr.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    with pytest.raises(FgembedError) as refused:
        FeatureStore.open(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "permission denied" in message


def test_failed_rows_are_recorded_when_a_group_completes(data, tmp_path):
    """A finished group lists its failed rows in its attributes, so a reader need not read the
    status shards (a request each on object storage); an unfinished one is read from status."""
    table = _table(data)
    store = FeatureStore.create(tmp_path / "s.zarr", table, shard_rows=4)
    store.prepare("a", {"source": "t"}, 2, "float16")
    n_shards = -(-store.n_rows // 4)
    for shard in range(n_shards):
        rows = min(4, store.n_rows - 4 * shard)
        emb = np.ones((rows, 2))
        if shard == 1:
            emb[2, 0] = np.nan
        store.write_shard("a", shard, emb, np.zeros(rows, np.uint8))
        if shard == 1:  # not finished yet: from the status array, no attribute
            assert store.failed_rows("a").tolist() == [6]
            assert "failed_rows" not in store.backbone_attrs("a")
    assert store.mark_complete("a", None)
    assert store.backbone_attrs("a")["failed_rows"] == [6]
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert reopened.failed_rows("a").tolist() == np.flatnonzero(reopened.status("a") != OK).tolist() == [6]
