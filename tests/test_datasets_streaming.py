"""webdataset shards and Hugging Face datasets as extraction input.

Every dataset here is written by its own library (webdataset's ShardWriter, datasets'
save_to_disk / to_parquet) from the same generated images as the folder dataset of conftest, in
the same row order, and read back through fgembed's readers and the real extraction engine: the
embeddings must be bit-identical to the folder dataset's, bad records flagged rows in place,
and an interrupted extraction must resume to the uninterrupted store.
"""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pytest
import webdataset as wds
import zarr
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value
from fgembed.cli.main import main
from PIL import Image as PILImage

from fgembed.backbones import LoadOptions
from fgembed.datasets import TEST, TRAIN, VAL, load_dataset
from fgembed.datasets.identity import file_identity
from fgembed.devices import DeviceModel
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.images import MISSING, OK, UNREADABLE
from fgembed.store import FeatureStore

BACKBONE = "timm:test_vit"


def _opts(**kw):
    return ExtractOptions(batch_size=8, workers=kw.pop("workers", 0), shard_rows=16, progress=False,
                          load=LoadOptions(pretrained=False), device="cpu", **kw)


def _store_arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    (_, group), = g["features"].groups()
    return {k: group[k][:] for k in ("emb", "done", "status")}


def _image_bytes(folder, folder_table) -> list[bytes]:
    return [(Path(folder) / p).read_bytes() for p in folder_table.paths]


# ---- writing each format with its own library ---------------------------------------------------

def write_shards(target: Path, folder_table, images: list[bytes | None], per_shard: int = 7,
                 classes: bool = True, splits=(("train", TRAIN), ("val", VAL), ("test", TEST))) -> Path:
    """The folder table's rows as webdataset shards (train rows, val rows, test rows; row order
    kept within each split), with webdataset's ShardWriter. images[i] None: no image member."""
    target.mkdir(parents=True, exist_ok=True)
    for name, code in splits:
        rows = np.flatnonzero(folder_table.split == code)
        if not len(rows):
            continue
        with wds.ShardWriter(str(target / f"{name}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for r in rows:
                sample = {"__key__": f"img{r:05d}", "cls": int(folder_table.labels[r])}
                if images[r] is not None:
                    sample["jpg"] = images[r]
                sink.write(sample)
    if classes:
        (target / "classes.txt").write_text("\n".join(folder_table.class_names) + "\n")
    return target


def hf_dict(folder_table, images: list[bytes | None]) -> DatasetDict:
    """The same rows as a DatasetDict (train, test), built the documented way."""
    def split(code):
        rows = np.flatnonzero(folder_table.split == code)
        return (Dataset.from_dict({"image": [None if images[r] is None else {"bytes": images[r], "path": None}
                                             for r in rows],
                                   "label": [int(folder_table.labels[r]) for r in rows]})
                .cast_column("image", Image()).cast_column("label", ClassLabel(names=folder_table.class_names)))
    return DatasetDict(train=split(TRAIN), test=split(TEST))


def write_parquet(dd: DatasetDict, target: Path) -> Path:
    for name, ds in dd.items():
        (target / name).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(target / name / "part-0.parquet"))
    return target


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """datasets' Arrow cache (the parquet variant is converted into it) inside the test's tmp dir."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield


@pytest.fixture(scope="module")
def folder(folder_root):
    table = load_dataset("folder", folder_root, val_fraction=0)
    return table, _image_bytes(folder_root, table)


@pytest.fixture(scope="module")
def roots(folder, tmp_path_factory):
    """{kind: root} of the same images in each format; `reference`: the folder store."""
    table, images = folder
    base = tmp_path_factory.mktemp("streaming")
    dd = hf_dict(table, images)
    dd.save_to_disk(str(base / "hf"))
    reference = base / "folder.zarr"
    extract(load_dataset("folder", table.root), reference, [BACKBONE], _opts())
    return {"webdataset": write_shards(base / "shards", table, images), "hf": base / "hf",
            "hf-parquet": write_parquet(dd, base / "parquet"), "reference": reference}


def _load(kind: str, root, **kw):
    return load_dataset("hf" if kind.startswith("hf") else kind, root, **kw)


# ---- the rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["webdataset", "hf", "hf-parquet"])
def test_rows_labels_and_splits_equal_the_folder_dataset(kind, roots, folder_root):
    table = _load(kind, roots[kind])
    reference = load_dataset("folder", folder_root)
    np.testing.assert_array_equal(table.labels, reference.labels)
    np.testing.assert_array_equal(table.split, reference.split)  # the same seeded val carved from train
    assert table.class_names == reference.class_names and table.split_recipe == reference.split_recipe
    assert len(set(table.paths)) == len(table)
    images = _image_bytes(folder_root, reference)
    assert [table.source.read(r) for r in range(len(table))] == images
    again = _load(kind, roots[kind])  # read twice: the same rows, the same identity
    assert again.sha256() == table.sha256() and again.paths == table.paths
    first, second = file_identity(table), file_identity(again)
    assert first.attrs() == second.attrs() and first.root == str(Path(roots[kind]).resolve())
    np.testing.assert_array_equal(first.sizes, [len(b) for b in images])
    np.testing.assert_array_equal(first.mtimes_ns, second.mtimes_ns)
    copy = pickle.loads(pickle.dumps(table.source))  # what a spawned decode worker receives
    assert len(pickle.dumps(table.source)) < sum(map(len, images)) / 10  # names and offsets, not the images
    assert copy.read(len(table) - 1) == images[-1] and copy.stat(5) == table.source.stat(5)


def test_shards_read_as_webdataset_itself_reads_them(roots):
    """The rows are the samples webdataset's own streaming reader yields, in its order."""
    table = load_dataset("webdataset", roots["webdataset"])
    shards = sorted(str(p) for p in Path(roots["webdataset"]).glob("*.tar"))
    shards = [s for s in shards if "/train-" in s] + [s for s in shards if "/test-" in s]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert [f"{Path(s['__url__']).name}/{s['__key__']}.jpg" for s in samples] == table.paths
    assert [int(s["cls"]) for s in samples] == list(table.labels)
    assert all(s["jpg"] == table.source.read(r) for r, s in enumerate(samples))


def test_val_shards_are_kept_and_class_names_default_to_indices(folder, tmp_path):
    table, images = folder
    carved = load_dataset("folder", table.root)  # train / val / test
    shards = write_shards(tmp_path / "shards", carved, images, classes=False)
    read = load_dataset("webdataset", shards)
    assert read.split_recipe == {"val": "official"}
    for code in (TRAIN, VAL, TEST):
        np.testing.assert_array_equal(read.labels[read.split == code], carved.labels[carved.split == code])
    assert read.class_names == [str(i) for i in range(len(table.class_names))]


# ---- extraction -------------------------------------------------------------------------------

def _url(root: Path, scheme: str | None) -> str | Path:
    """`root` itself, as a file:// URL, or copied to fsspec's in-process memory filesystem."""
    if scheme == "file":
        return Path(root).resolve().as_uri()
    if scheme == "memory":
        memory = fsspec.filesystem("memory")
        for shard in Path(root).iterdir():
            memory.pipe_file(f"/fgembed-test/shards/{shard.name}", shard.read_bytes())
        return "memory://fgembed-test/shards"
    return root


@pytest.mark.parametrize("kind, url, workers", [
    ("webdataset", None, 1), ("webdataset", "file", 0), ("webdataset", "memory", 0), ("hf", None, 0),
    ("hf-parquet", None, 1),
], ids=["webdataset-worker", "webdataset-file-url", "webdataset-memory-url", "hf", "hf-parquet-worker"])
def test_embeddings_are_bit_identical_to_the_folder_dataset(kind, url, workers, roots, tmp_path):
    table = _load(kind, _url(roots[kind], url))
    if url == "file":  # file:// is the local folder: the same identity, so either spelling resumes the other
        assert table.root == str(Path(roots[kind]).resolve())
    if url == "memory":
        assert table.root == "memory:///fgembed-test/shards" and table.paths == _load(kind, roots[kind]).paths
    summary = extract(table, tmp_path / "s.zarr", [BACKBONE], _opts(workers=workers))
    assert summary.processed == len(table) and not summary.failures
    got, want = _store_arrays(tmp_path / "s.zarr"), _store_arrays(roots["reference"])
    for key in ("emb", "done", "status"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    store = FeatureStore.open(tmp_path / "s.zarr")
    reference = FeatureStore.open(roots["reference"])
    assert store.class_names == reference.class_names
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(store.labels(split), reference.labels(split))


@pytest.mark.parametrize("kind", ["webdataset", "hf"])
def test_an_interrupted_extraction_resumes_to_the_uninterrupted_store(kind, roots, tmp_path, monkeypatch):
    table = _load(kind, roots[kind])
    real, calls = DeviceModel.forward, []

    def interrupted(self, *args, **kwargs):  # Ctrl-C at the 4th batch: shard 0 (batches 1-2) is written
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(DeviceModel, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            extract(table, tmp_path / "s.zarr", [BACKBONE], _opts())
    assert 0 < _store_arrays(tmp_path / "s.zarr")["done"].sum() < len(table)
    resumed = extract(_load(kind, roots[kind]), tmp_path / "s.zarr", [BACKBONE], _opts())
    assert resumed.skipped_shards == 1 and resumed.processed == len(table) - 16
    got, want = _store_arrays(tmp_path / "s.zarr"), _store_arrays(roots["reference"])
    for key in ("emb", "done", "status"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _reencode(data: bytes, fmt: str) -> bytes:
    """The same pixels in another lossless format: the same embedding."""
    out = io.BytesIO()
    PILImage.open(io.BytesIO(data)).save(out, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


def test_bad_webdataset_records_are_flagged_rows_in_place(folder, roots, tmp_path):
    table, images = folder
    damaged = list(images)
    damaged[3] = b"\x00not an image" * 40
    damaged[10] = None  # a sample with a cls and no image
    shards = write_shards(tmp_path / "shards", table, damaged)
    rewrite = {30: ("png", _reencode(images[30], "PNG")), 31: ("webp", _reencode(images[31], "WEBP"))}
    shard = next(p for p in sorted(shards.glob("train-*.tar")) if f"img{30:05d}.jpg" in tarfile.open(p).getnames())
    members = [(m, tarfile.open(shard).extractfile(m).read()) for m in tarfile.open(shard).getmembers()]
    with wds.TarWriter(str(shard)) as sink:  # the same samples; 30 and 31 as png and webp
        for key in dict.fromkeys(m.name.split(".")[0] for m, _ in members):
            sample = {"__key__": key, **{m.name.split(".", 1)[1]: data for m, data in members
                                         if m.name.split(".")[0] == key}}
            row = int(key[3:])
            if row in rewrite:
                del sample["jpg"]
                sample[rewrite[row][0]] = rewrite[row][1]
            sink.write(sample)
    last = sorted(shards.glob("test-*.tar"))[-1]
    with tarfile.open(last) as tar:
        cut = tar.getmembers()[-1]
    with open(last, "r+b") as f:  # the shard ends half-way through its last image
        f.truncate(cut.offset_data + cut.size // 2)
    read = load_dataset("webdataset", shards)
    assert read.paths[10] == "train-000001.tar/img00010"  # no image member: the sample's key names the row
    assert read.paths[30] == f"{shard.name}/img00030.png" and read.paths[31] == f"{shard.name}/img00031.webp"
    summary = extract(read, tmp_path / "s.zarr", [BACKBONE], _opts())
    got, want = _store_arrays(tmp_path / "s.zarr"), _store_arrays(roots["reference"])
    n = len(table)
    assert got["status"][3] == UNREADABLE and got["status"][10] == MISSING and got["status"][n - 1] == UNREADABLE
    assert {f[0] for f in summary.failures} == {3, 10, n - 1}
    assert np.isnan(got["emb"][[3, 10, n - 1]]).all() and got["done"].all()
    untouched = np.setdiff1d(np.arange(n), [3, 10, n - 1])
    assert (got["status"][untouched] == OK).all()
    np.testing.assert_array_equal(got["emb"][untouched], want["emb"][untouched])  # no row moved; png/webp equal


def test_bad_hf_records_are_flagged_rows_in_place(folder, roots, tmp_path):
    table, images = folder
    damaged = list(images)
    damaged[3] = b"\x00not an image" * 40
    damaged[10] = None
    hf_dict(table, damaged).save_to_disk(str(tmp_path / "hf"))
    summary = extract(load_dataset("hf", tmp_path / "hf"), tmp_path / "s.zarr", [BACKBONE], _opts())
    got, want = _store_arrays(tmp_path / "s.zarr"), _store_arrays(roots["reference"])
    assert got["status"][3] == UNREADABLE and got["status"][10] == MISSING
    assert {f[0] for f in summary.failures} == {3, 10}
    untouched = np.setdiff1d(np.arange(len(table)), [3, 10])
    np.testing.assert_array_equal(got["emb"][untouched], want["emb"][untouched])


# ---- identity ---------------------------------------------------------------------------------

def _changed(folder) -> tuple:
    table, images = folder
    changed = list(images)
    changed[8] = images[0]  # row 8 (train-000001.tar) now holds row 0's image
    return table, changed


def _change_shard(root: Path, folder, tmp_path: Path) -> None:
    """Replace one shard (train-000001.tar: rows 7-13) by a version with another image in it."""
    shutil.copy(write_shards(tmp_path / "changed", *_changed(folder)) / "train-000001.tar", root)


def _change_hf(root: Path, folder, tmp_path: Path) -> None:
    shutil.rmtree(root)
    hf_dict(*_changed(folder)).save_to_disk(str(root))


@pytest.mark.parametrize("kind, change, said", [
    ("webdataset", _change_shard, "7 image files changed (first: train-000001.tar/img00007.jpg, modified since)"),
    ("hf", _change_hf, "60 image files changed (first: train/0, modified since)"),
])
def test_a_changed_dataset_is_another_dataset_to_the_store(kind, change, said, roots, folder, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(roots[kind], root)
    FeatureStore.create(tmp_path / "s.zarr", load_dataset(kind, root), 16).release()
    FeatureStore.create(tmp_path / "s.zarr", load_dataset(kind, root), 16).release()  # unchanged: accepted
    change(root, folder, tmp_path)
    table = load_dataset(kind, root)
    with pytest.raises(FgembedError, match="holds another dataset or other files") as refused:
        FeatureStore.create(tmp_path / "s.zarr", table, 16)
    assert said in str(refused.value)
    FeatureStore.create(tmp_path / "s.zarr", table, 16, overwrite=True).release()


# ---- bad roots --------------------------------------------------------------------------------

def _error_line(capsys, kind: str, root, tmp_path) -> str:
    argv = ["extract", "--dataset", kind, "--root", str(root), "--store", str(tmp_path / "s.zarr"),
            "--backbone", BACKBONE, "--no-pretrained", "--quiet"]
    capsys.readouterr()  # what building the dataset printed
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "Traceback" not in captured.err and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_bad_webdataset_roots_are_one_line_and_exit_2(capsys, folder, tmp_path):
    table, images = folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no webdataset shards" in _error_line(capsys, "webdataset", empty, tmp_path)
    assert "dataset root not found" in _error_line(capsys, "webdataset", tmp_path / "absent", tmp_path)
    no_train = write_shards(tmp_path / "no-train", table, images, splits=(("test", TEST),))
    assert "no training shard" in _error_line(capsys, "webdataset", no_train, tmp_path)
    stray = write_shards(tmp_path / "stray", table, images, splits=(("train", TRAIN),))
    shutil.copy(next(stray.glob("train-*.tar")), stray / "validation-000000.tar")
    assert "validation-000000.tar" in _error_line(capsys, "webdataset", stray, tmp_path)
    bad_cls = tmp_path / "bad-cls"
    bad_cls.mkdir()
    with wds.TarWriter(str(bad_cls / "train-000000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": images[0], "cls": 0})
        sink.write({"__key__": "b", "jpg": images[1], "cls": "cat"})
    assert "train-000000.tar/b.cls is not an integer class index" in _error_line(capsys, "webdataset", bad_cls,
                                                                                 tmp_path)
    (bad_cls / "train-000000.tar").write_bytes(b"\x01" * 2000)
    assert "not a readable tar file" in _error_line(capsys, "webdataset", bad_cls, tmp_path)


def test_bad_hf_roots_are_one_line_and_exit_2(capsys, folder, tmp_path):
    table, images = folder
    dd = hf_dict(table, images)
    dd.rename_column("label", "species").save_to_disk(str(tmp_path / "no-label"))
    assert "has no label column" in _error_line(capsys, "hf", tmp_path / "no-label", tmp_path)
    dd.remove_columns("image").save_to_disk(str(tmp_path / "no-image"))
    assert "has no image column" in _error_line(capsys, "hf", tmp_path / "no-image", tmp_path)
    dd.cast_column("label", Value("string")).save_to_disk(str(tmp_path / "strings"))
    assert "not a ClassLabel" in _error_line(capsys, "hf", tmp_path / "strings", tmp_path)
    DatasetDict(test=dd["test"], extra=dd["train"]).save_to_disk(str(tmp_path / "splits"))
    assert "split 'extra'" in _error_line(capsys, "hf", tmp_path / "splits", tmp_path)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    assert "neither a Hugging Face dataset" in _error_line(capsys, "hf", tmp_path / "plain", tmp_path)
    assert "reads a local folder, not a URL" in str(pytest.raises(FgembedError, load_dataset, "hf",
                                                                  "s3://bucket/x").value)
