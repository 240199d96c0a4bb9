from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fgembed.datasets import TEST, TRAIN, VAL, load_dataset
from fgembed.datasets.taxonomy import cub_taxonomy
from fgembed.errors import FgembedError
from fgembed.synthetic import CUB_CLASS_IDS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub_hierarchy"


def _expected(records):
    return Counter(r.class_name for r in records), sum(r.train for r in records)


def test_cub_reader_official_split_and_taxonomy(cub_root, images):
    _, records = images
    table = load_dataset("cub", cub_root.parent, val_fraction=0)  # the parent folder is accepted too
    assert len(table) == len(records)
    assert list(table.ids) == list(range(1, len(records) + 1))
    assert (table.split == TRAIN).sum() == sum(r.train for r in records)
    assert (table.split == TEST).sum() == sum(not r.train for r in records)
    assert all((Path(table.root) / p).is_file() for p in table.paths)
    # class names come from classes.txt; labels follow image_class_labels.txt
    for row, r in enumerate(records):
        assert table.class_names[table.labels[row]].endswith(r.class_name)
    tax = cub_taxonomy()
    for level in ("order", "family"):
        assert level in table.levels
        lvl = table.levels[level]
        for row in range(len(table)):
            class_id = int(table.class_names[table.labels[row]].split(".")[0])
            assert lvl.names[lvl.codes[row]] == tax[class_id][level]


def test_cub_taxonomy_matches_shared_source():
    tax = cub_taxonomy()
    assert len(tax) == 200
    assert len({t["order"] for t in tax.values()}) == 13
    assert len({t["family"] for t in tax.values()}) == 37
    assert tax[1]["order"] == "Procellariiformes" and tax[1]["family"] == "Diomedeidae"
    if not SHARED.is_dir():
        pytest.skip("../shared not beside the checkout")
    import importlib.util
    spec = importlib.util.spec_from_file_location("mk", Path(__file__).parents[1] / "tools" / "make_cub_taxonomy.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    shipped = (Path(__file__).parents[1] / "fgembed" / "datasets" / "data" / "cub_taxonomy.tsv").read_text()
    assert mk.build(SHARED) == shipped


def test_inat21_reader_levels_and_val_as_test(inat_root, images):
    _, records = images
    table = load_dataset("inat21", inat_root, val_fraction=0)
    assert len(table) == len(records)
    assert (table.split == TEST).sum() == sum(not r.train for r in records)
    assert set(table.levels) >= {"kingdom", "phylum", "class", "order", "family", "genus", "supercategory"}
    tax = cub_taxonomy()
    for row in range(len(table)):
        k = sorted({r.class_name for r in records}).index(table.class_names[table.labels[row]])
        order = table.levels["order"]
        assert order.names[order.codes[row]] == tax[CUB_CLASS_IDS[k]]["order"]
    with pytest.raises(FgembedError, match="train.json"):
        load_dataset("inat21", inat_root, train_file="train")


def test_folder_reader_with_split_folders(folder_root, images):
    _, records = images
    table = load_dataset("folder", folder_root, val_fraction=0)
    counts, n_train = _expected(records)
    assert len(table) == len(records) and (table.split == TRAIN).sum() == n_train
    assert sorted(table.class_names) == sorted(counts)
    assert Counter(table.class_names[l] for l in table.labels) == counts


def test_manifest_reader(manifest_csv, images):
    _, records = images
    table = load_dataset("manifest", manifest_csv, val_fraction=0)
    assert [str(p) for p in table.paths] == [r.path for r in records]
    assert [table.class_names[l] for l in table.labels] == [r.class_name for r in records]


def test_validation_split_is_seeded_and_stratified(manifest_csv):
    a = load_dataset("manifest", manifest_csv, val_fraction=0.2, seed=0)
    b = load_dataset("manifest", manifest_csv, val_fraction=0.2, seed=0)
    c = load_dataset("manifest", manifest_csv, val_fraction=0.2, seed=1)
    assert np.array_equal(a.split, b.split) and not np.array_equal(a.split, c.split)
    assert not (a.split[np.flatnonzero(b.split == TEST)] != TEST).any()  # test rows never move
    train_before = load_dataset("manifest", manifest_csv, val_fraction=0)
    n_train = (train_before.split == TRAIN).sum()
    assert (a.split == VAL).sum() == round(0.2 * n_train)
    per_class = Counter(a.labels[a.split == VAL])
    assert set(per_class.values()) <= {1, 2} and len(per_class) == len(a.class_names)  # 7 train each → 1–2 val


@pytest.mark.parametrize("missing", ["image_class_labels.txt", "train_test_split.txt", "images.txt", "classes.txt"])
def test_cub_missing_file_is_named(cub_root, tmp_path, missing):
    copy = tmp_path / "CUB_200_2011"
    shutil.copytree(cub_root, copy, ignore=shutil.ignore_patterns("images"))
    (copy / missing).unlink()
    with pytest.raises(FgembedError, match=missing.replace(".", r"\.")):
        load_dataset("cub", copy)


def test_malformed_files_are_named(cub_root, inat_root, tmp_path):
    copy = tmp_path / "CUB_200_2011"
    shutil.copytree(cub_root, copy, ignore=shutil.ignore_patterns("images"))
    (copy / "image_class_labels.txt").write_text("1\n")
    with pytest.raises(FgembedError, match="malformed line 1 .*image_class_labels"):
        load_dataset("cub", copy)
    bad = tmp_path / "inat"
    bad.mkdir()
    (bad / "train_mini.json").write_text("{not json")
    with pytest.raises(FgembedError, match="malformed JSON .*train_mini.json"):
        load_dataset("inat21", bad)
    csv = tmp_path / "m.csv"
    csv.write_text("file,class\na.jpg,x\n")
    with pytest.raises(FgembedError, match="path,label"):
        load_dataset("manifest", csv)
    with pytest.raises(FgembedError, match="dataset root not found"):
        load_dataset("folder", tmp_path / "nope")


def test_registry_lists_and_dispatches():
    from fgembed.datasets import KINDS, READERS, list_datasets

    assert KINDS == tuple(READERS) == ("cub", "inat21", "folder", "manifest", "webdataset", "hf")
    assert list_datasets("*n*") == ["inat21", "manifest"] and list_datasets() == list(KINDS)
    with pytest.raises(FgembedError, match="unknown dataset kind 'coco'; choose one of cub, inat21"):
        load_dataset("coco", ".")


def test_manifest_short_rows_extra_fields_and_duplicates_are_one_line(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,split\na.jpg,x,train\nb.jpg\n")
    with pytest.raises(FgembedError, match=r"malformed row at line 3 of .*m\.csv: 1 fields, the header has 3"):
        load_dataset("manifest", csv, val_fraction=0)
    csv.write_text("path,label\na.jpg,x\nb.jpg,y,test,extra\n")
    with pytest.raises(FgembedError, match="malformed row at line 3 .*4 fields, the header has 2"):
        load_dataset("manifest", csv, val_fraction=0)
    csv.write_text("path,label,split\nimgs/a.jpg,x,train\nimgs/b.jpg,x,train\nimgs/./a.jpg,x,test\n")
    with pytest.raises(FgembedError, match=r"lists 'imgs/\./a\.jpg' twice \(lines 2 and 4\)"):
        load_dataset("manifest", csv, val_fraction=0)


def test_manifest_may_point_outside_its_folder_and_the_identity_covers_it(tmp_path):
    """The manifest rule: its paths may leave its folder; every file read enters the identity."""
    from fgembed.datasets.identity import file_identity

    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"1234567")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "in.jpg").write_bytes(b"12")
    csv = tmp_path / "m" / "manifest.csv"
    csv.write_text(f"path,label\n../elsewhere.jpg,x\n{outside},y\nin.jpg,y\n")
    table = load_dataset("manifest", csv, val_fraction=0)
    identity = file_identity(table)
    assert identity.sizes.tolist() == [7, 7, 2]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../x.jpg"])
def test_inat_and_cub_paths_must_stay_inside_the_root(inat_root, cub_root, tmp_path, bad):
    copy = tmp_path / "inat"
    shutil.copytree(inat_root, copy, ignore=shutil.ignore_patterns("train_mini", "val"))
    doc = json.loads((copy / "val.json").read_text())
    doc["images"][0]["file_name"] = bad
    (copy / "val.json").write_text(json.dumps(doc))
    with pytest.raises(FgembedError, match=rf"image \d+ in .*val\.json points outside the dataset root: '{bad}'"):
        load_dataset("inat21", copy, val_fraction=0)
    cub = tmp_path / "CUB_200_2011"
    shutil.copytree(cub_root, cub, ignore=shutil.ignore_patterns("images"))
    lines = (cub / "images.txt").read_text().splitlines()
    lines[2] = "3 ../../" + bad.lstrip("/")
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(FgembedError, match=r"image 3 in .*images\.txt points outside the dataset root"):
        load_dataset("cub", cub, val_fraction=0)
