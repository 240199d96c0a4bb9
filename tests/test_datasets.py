from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fgembed.datasets import TEST, TRAIN, VAL, load_dataset
from fgembed.datasets.taxonomy import cub_taxonomy
from fgembed.errors import FgembedError

from .formats import CUB_CLASS_IDS

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
