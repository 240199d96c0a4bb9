"""Write generated images in each dataset's real on-disk format (CUB, iNat21, manifest)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from fgembed.datasets.taxonomy import cub_taxonomy
from fgembed.synthetic import SyntheticImage

CUB_CLASS_IDS = (1, 2, 44, 92, 110, 200)  # real CUB ids (two albatrosses, quirky genus-level ones)


def write_cub(root: Path, records: list[SyntheticImage]) -> Path:
    """CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
    bounding_boxes.txt, images/<NNN.Name>/<file>.jpg. Synthetic classes map onto real CUB ids."""
    cub = root / "CUB_200_2011"
    names = sorted({r.class_name for r in records})
    assert len(names) <= len(CUB_CLASS_IDS)
    class_id = {n: CUB_CLASS_IDS[k] for k, n in enumerate(names)}
    folder = {n: f"{class_id[n]:03d}.{n}" for n in names}
    lines = {k: [] for k in ("images", "labels", "split", "boxes")}
    for image_id, r in enumerate(records, 1):
        rel = f"{folder[r.class_name]}/{Path(r.path).name}"
        (cub / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cub / "images" / rel).write_bytes((root / r.path).read_bytes())
        lines["images"].append(f"{image_id} {rel}")
        lines["labels"].append(f"{image_id} {class_id[r.class_name]}")
        lines["split"].append(f"{image_id} {int(r.train)}")
        lines["boxes"].append(f"{image_id} 1.0 2.0 30.0 40.0")
    # classes.txt lists all 200 in the real file; we list ours in id order
    (cub / "classes.txt").write_text("".join(f"{class_id[n]} {folder[n]}\n" for n in sorted(names, key=class_id.get)))
    for key, fname in (("images", "images.txt"), ("labels", "image_class_labels.txt"),
                       ("split", "train_test_split.txt"), ("boxes", "bounding_boxes.txt")):
        (cub / fname).write_text("\n".join(lines[key]) + "\n")
    return cub


def write_inat21(root: Path, records: list[SyntheticImage], train_name: str = "train_mini") -> Path:
    """train_mini.json / val.json in iNat 2021's COCO style, images at each file_name."""
    inat = root / "inat21"
    names = sorted({r.class_name for r in records})
    tax = cub_taxonomy()
    categories = []
    for k, n in enumerate(names):
        t = tax[CUB_CLASS_IDS[k]]
        categories.append({"id": 100 + k, "name": n, "common_name": n, "supercategory": "Birds",
                           "kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": t["order"],
                           "family": t["family"], "genus": t["scientific_name"].split()[0],
                           "specific_epithet": "x", "image_dir_name": f"{k:05d}_{n}"})
    cat_of = {c["name"]: c for c in categories}
    for split, name in ((True, train_name), (False, "val")):
        images, annotations = [], []
        for image_id, r in enumerate(records, 1):
            if r.train != split:
                continue
            c = cat_of[r.class_name]
            rel = f"{name}/{c['image_dir_name']}/{Path(r.path).name}"
            (inat / rel).parent.mkdir(parents=True, exist_ok=True)
            (inat / rel).write_bytes((root / r.path).read_bytes())
            images.append({"id": image_id, "width": 128, "height": 96, "file_name": rel, "license": 0})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": c["id"]})
        doc = {"info": {}, "images": images, "annotations": annotations, "categories": categories, "licenses": []}
        (inat / f"{name}.json").write_text(json.dumps(doc))
    return inat


def write_manifest(root: Path, records: list[SyntheticImage]) -> Path:
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for r in records:
            w.writerow([r.path, r.class_name, "train" if r.train else "test"])
    return path


def write_feature_store(path, n_classes: int = 6, per_class: int = 40, dims=(24, 16, 32), seed: int = 0,
                        failed_test_rows: int = 1, names=("a", "b", "c")):
    """A store with class-structured features for three members (`a`, `b`, `c`) written through
    the store's own API, as extraction writes them. Each member sees the classes through its own
    random projection plus noise, so the members are informative and partly complementary.
    The first `failed_test_rows` test rows failed in the third member (NaN, status unreadable)."""
    import numpy as np

    from fgembed.datasets.table import Level, SampleTable
    from fgembed.images import UNREADABLE
    from fgembed.store import FeatureStore

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    n = len(labels)
    split = np.tile(np.array([0, 0, 0, 1, 2, 2, 0, 0, 1, 2], np.uint8), -(-n // 10))[:n]
    paths = [f"c{y}/img{i}.jpg" for i, y in enumerate(labels)]
    table = SampleTable("synthetic", "/nowhere", np.arange(1, n + 1), paths,
                        labels, [f"class {c}" for c in range(n_classes)], split,
                        {"group": Level((labels // 2).astype(np.int32), [f"group {g}" for g in range(n_classes // 2)])})
    store = FeatureStore.create(path, table, shard_rows=64)
    latent = np.eye(n_classes)[labels] * 2.0 + rng.normal(size=(n, n_classes))
    for i, (name, d) in enumerate(zip(names, dims)):
        emb = latent @ rng.normal(size=(n_classes, d)) + rng.normal(scale=1.5, size=(n, d))
        status = np.zeros(n, np.uint8)
        if i == 2:
            status[np.flatnonzero(split == 2)[:failed_test_rows]] = UNREADABLE
        store.prepare(name, {"source": "test", "member": name}, d, dtype="float32")
        for shard in range(store.n_shards):
            rows = store.shard_slice(shard)
            store.write_shard(name, shard, emb[rows], status[rows])
        store.mark_complete(name, None)
    return store
