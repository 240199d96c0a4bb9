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
