"""CUB-200-2011 as distributed: images.txt, image_class_labels.txt, train_test_split.txt,
classes.txt, bounding_boxes.txt and images/<class>/<file>.jpg. Official train/test split;
`order` and `family` levels from the shipped hierarchy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FgembedError
from ._parse import read_rows, relative_inside, require_dir, to_int
from .table import TEST, TRAIN, Level, SampleTable
from .taxonomy import CUB_HIERARCHY_SOURCE, cub_taxonomy


def _find_root(root: Path) -> Path:
    """Accept either CUB_200_2011/ itself or the folder that holds it."""
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        return root / "CUB_200_2011"
    return root


def read_cub(root: Path) -> SampleTable:
    root = _find_root(require_dir(root))
    images = read_rows(root / "images.txt", 2)
    ids = [to_int(i, root / "images.txt", "image id") for i, _ in images]
    paths = [relative_inside("images/" + p, root / "images.txt", f"image {i}") for i, p in images]
    labels_file, split_file = root / "image_class_labels.txt", root / "train_test_split.txt"
    label_of = {to_int(i, labels_file, "image id"): to_int(c, labels_file, "class id")
                for i, c in read_rows(labels_file, 2)}
    train_of = {to_int(i, split_file, "image id"): to_int(t, split_file, "flag")
                for i, t in read_rows(split_file, 2)}
    classes_file = root / "classes.txt"
    classes = {to_int(i, classes_file, "class id"): name for i, name in read_rows(classes_file, 2)}
    read_rows(root / "bounding_boxes.txt", 5)  # part of the distribution: its absence means a damaged copy
    for name, table in ((labels_file, label_of), (split_file, train_of)):
        missing = [i for i in ids if i not in table]
        if missing:
            raise FgembedError(f"{name} has no row for image id {missing[0]} ({len(missing)} missing)")
    class_ids = sorted(classes)
    index = {c: k for k, c in enumerate(class_ids)}
    try:
        labels = np.array([index[label_of[i]] for i in ids])
    except KeyError as exc:
        raise FgembedError(f"{labels_file} names class {exc.args[0]}, absent from {classes_file}") from None
    split = np.array([TRAIN if train_of[i] == 1 else TEST for i in ids])
    levels = {}
    taxonomy = cub_taxonomy()
    if all(c in taxonomy for c in class_ids):  # the standard 200 classes
        for level in ("order", "family"):
            names = sorted({taxonomy[c][level] for c in class_ids})
            code = {n: k for k, n in enumerate(names)}
            per_class = np.array([code[taxonomy[c][level]] for c in class_ids])
            levels[level] = Level(per_class[labels].astype(np.int32), names)
    provenance = {"hierarchy": CUB_HIERARCHY_SOURCE} if levels else {}
    return SampleTable("cub", str(root), ids, paths, labels, [classes[c] for c in class_ids],
                       split, levels, provenance=provenance)
