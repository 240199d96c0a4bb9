"""A Hugging Face `datasets` dataset on disk: a `DatasetDict` from `save_to_disk`, or parquet files per split.

Both are opened by the `datasets` library itself: `load_from_disk` memory-maps the saved Arrow
files; a parquet folder goes through `load_dataset("parquet", …)` with the split names the
library infers from file and folder names (`train/`, `validation/`, `test-00000-of-00002.parquet`,
…), converted once into its Arrow cache (`HF_DATASETS_CACHE`) that later runs reuse. The
`image` column is read undecoded (`Image(decode=False)`): the engine decodes every format the
same way. `label` is a `ClassLabel` (its names become the class names) or an integer column (the
indices are the names).

Rows are the splits in train, validation, test order, each in the dataset's own order, named
`<split>/<index>`. A row whose image is empty (None) is a missing record: a flagged row.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..errors import FgembedError
from ._optional import require
from ._parse import require_dir
from .sources import ImageSource
from .table import TEST, TRAIN, VAL, SampleTable

SPLITS = {"train": TRAIN, "validation": VAL, "valid": VAL, "val": VAL, "dev": VAL, "test": TEST}
BATCH = 65536  # rows per Arrow batch while the reader scans labels and image sizes


class ArrowRows(ImageSource):
    """Row i is the image bytes of row `i − starts[k]` of split k's `datasets.Dataset`.

    The datasets are memory-mapped Arrow tables: pickling one into a decode worker sends the file
    names, and the worker maps the files itself (the library's own design for DataLoader workers)."""

    def __init__(self, location: str, splits: list, sizes: np.ndarray, mtimes_ns: list[int]) -> None:
        from datasets import Image

        self.location, self.sizes, self.mtimes_ns = location, sizes, mtimes_ns
        self.splits = [ds.select_columns(["image"]).cast_column("image", Image(decode=False)) for ds in splits]
        self.starts = np.cumsum([0, *(len(ds) for ds in splits)])

    def _split(self, row: int) -> int:
        return int(np.searchsorted(self.starts, row, side="right") - 1)

    def read(self, row: int) -> bytes:
        k = self._split(row)
        image = self.splits[k][int(row - self.starts[k])]["image"]
        if image is None or image["bytes"] is None:
            raise FileNotFoundError(f"{self.location}: row {row} has no image")
        return image["bytes"]

    def stat(self, row: int) -> tuple[int, int]:
        """The image's size in bytes and the modification time of its split's files."""
        size = int(self.sizes[row])
        return (size, self.mtimes_ns[self._split(row)]) if size >= 0 else (-1, -1)


@contextlib.contextmanager
def _quiet():
    """The library's own progress bars off while it opens the dataset: stderr carries fgembed's."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


def _open(root: Path) -> tuple[dict, dict[str, list[str]]]:
    """{split name: Dataset} and {split name: the files behind it} of a saved dataset or a parquet folder."""
    import datasets
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    with _quiet():
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            try:
                loaded = datasets.load_from_disk(str(root))
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise FgembedError(f"cannot load the saved dataset {root}: {str(exc).splitlines()[0]}") from None
            splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {str(loaded.split or "train"): loaded}
            return splits, {k: [f["filename"] for f in ds.cache_files] for k, ds in splits.items()}
        try:
            patterns = get_data_patterns(str(root))
        except EmptyDatasetError:
            patterns = {}
        files = {str(k): sorted(f for f in v if f.endswith(".parquet"))
                 for k, v in DataFilesDict.from_patterns(patterns, base_path=str(root)).items()} if patterns else {}
        files = {k: v for k, v in files.items() if v}
        if not files:
            raise FgembedError(f"{root} is neither a Hugging Face dataset saved with save_to_disk "
                               "(dataset_dict.json) nor a folder of parquet files per split")
        try:
            return dict(datasets.load_dataset("parquet", data_files=files)), files
        except Exception as exc:  # pyarrow's and the builder's errors name the broken file
            raise FgembedError(f"cannot read the parquet files under {root}: {str(exc).splitlines()[0]}") from None


def _columns(ds, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, image sizes in bytes, −1 where a row has no image) of one split, read batch by
    batch from Arrow: the sizes come from the binary column's offsets, not from the images."""
    import pyarrow.compute as pc

    labels, sizes = [], []
    for batch in ds.with_format("arrow", columns=["image", "label"]).iter(batch_size=BATCH):
        image = batch.column("image")
        data, path = pc.struct_field(image, "bytes"), pc.struct_field(image, "path")
        if pc.any(pc.and_(pc.is_null(data), pc.is_valid(path))).as_py():
            raise FgembedError(f"{where}: images refer to files by path instead of holding their bytes; save "
                               "the dataset with save_to_disk or to_parquet, which embed them")
        sizes.append(pc.fill_null(pc.binary_length(data), -1).to_numpy(zero_copy_only=False))
        label = batch.column("label")
        if label.null_count:
            raise FgembedError(f"{where}: {label.null_count} rows have no label")
        labels.append(label.to_numpy())
    return (np.concatenate(labels) if labels else np.zeros(0, np.int64),
            np.concatenate(sizes) if sizes else np.zeros(0, np.int64))


def _label_names(features: list, where: str) -> list[str] | None:
    """The ClassLabel names of the label column, None for integer indices; refused otherwise."""
    from datasets import ClassLabel, Value

    label = features[0]
    other = next((f for f in features if f != label), None)
    if other is not None:
        raise FgembedError(f"{where}: the splits' label columns differ ({label} vs {other})")
    if isinstance(label, ClassLabel):
        return list(label.names)
    if isinstance(label, Value) and label.dtype.startswith(("int", "uint")):
        return None
    raise FgembedError(f"{where}: the label column is {label}, not a ClassLabel or integer class index; "
                       "encode it with Dataset.class_encode_column('label')")


def _mtime_ns(files: list[str]) -> int:
    return max((Path(f).stat().st_mtime_ns for f in files), default=-1)


def read_hf(root: Path) -> SampleTable:
    """A saved `DatasetDict` (or parquet files per split) with `image` and `label` columns."""
    require("datasets", "hf")
    root = require_dir(root).resolve()
    splits, files = _open(root)
    unknown = sorted(k for k in splits if k not in SPLITS)
    if unknown:
        raise FgembedError(f"{root} has split {unknown[0]!r}; fgembed reads train, validation (or val) and test")
    if "train" not in splits:
        raise FgembedError(f"{root} has no train split (has: {', '.join(splits)})")
    names = sorted(splits, key=lambda k: SPLITS[k])
    if len({SPLITS[k] for k in names}) != len(names):
        raise FgembedError(f"{root} has two validation splits ({', '.join(k for k in names if SPLITS[k] == VAL)})")
    for name in names:
        missing = [c for c in ("image", "label") if c not in splits[name].column_names]
        if missing:
            raise FgembedError(f"{root}: split {name} has no {' or '.join(missing)} column (has: "
                               f"{', '.join(splits[name].column_names)})")
    class_names = _label_names([splits[n].features["label"] for n in names], str(root))
    labels, sizes, split, paths = [], [], [], []
    for name in names:
        got, size = _columns(splits[name], name, f"{root} split {name}")
        labels.append(got)
        sizes.append(size)
        split.append(np.full(len(got), SPLITS[name], np.uint8))
        paths += [f"{name}/{i}" for i in range(len(got))]
    labels = np.concatenate(labels)
    if not len(labels):
        raise FgembedError(f"{root} has no rows")
    if labels.min() < 0:
        raise FgembedError(f"{root}: {int((labels < 0).sum())} rows have no label (label -1); fgembed needs "
                           "labelled rows, so drop them or the split")
    class_names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    if labels.max() >= len(class_names):
        raise FgembedError(f"{root}: a label is {int(labels.max())}, past the {len(class_names)} class names")
    source = ArrowRows(str(root), [splits[n] for n in names], np.concatenate(sizes).astype(np.int64),
                       [_mtime_ns(files[n]) for n in names])
    return SampleTable("hf", str(root), np.arange(len(labels)), paths, labels, class_names,
                       np.concatenate(split), source=source)
