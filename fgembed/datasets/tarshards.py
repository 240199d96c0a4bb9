"""webdataset tar shards, local or at any fsspec URL: `{train,val,test}-*.tar`, one sample per key.

A sample is what the `webdataset` library itself makes of a shard: members grouped by the key
its `base_plus_ext` gives (`sample0042.jpg` + `sample0042.cls` → key `sample0042`), suffixes
lowercased, `__*__` metadata members skipped, `cls` read as its decoder reads it (`int`). The
image is the sample's `jpg`, `jpeg`, `png` or `webp` member (the first present, in that order).

Extraction reads rows in any order (decode workers, resumed shards), so the reader indexes each
shard once, with the standard library's `tarfile` (the tar format's own member offsets): a row
is a byte range of a shard, read through fsspec. webdataset's indexed reader `wids` was the
other candidate; it needs a JSON descriptor with every shard's sample count, copies whole
shards to a local cache through shell commands (curl, gsutil, the aws CLI) rather than fsspec,
and is a separate package since webdataset 1.0. Its streaming reader cannot seek to one row.

Rows are the shards in name order, samples in tar order; a sample without an image is a row
whose record is missing (flagged, never dropped: the rows after it stay where they are), and a
member cut short by a truncated shard is an unreadable row.
"""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import numpy as np

from ..errors import FgembedError
from ._optional import require
from .sources import ImageSource
from .table import SPLIT_NAMES, SampleTable

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD = re.compile(r"^(train|val|test)-.*\.tar$")
CLASSES_FILE = "classes.txt"


def is_url(root: str | Path) -> bool:
    return isinstance(root, str) and "://" in root


def _filesystem(root: str | Path, storage_options: dict | None = None):
    """(fsspec filesystem, path within it, local?); a local root (a path or file://) resolved."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, path = url_to_fs(str(root) if is_url(root) else str(Path(root).expanduser()), **(storage_options or {}))
    local = isinstance(fs, LocalFileSystem)
    return fs, str(Path(path).resolve()) if local else path.rstrip("/"), local


def _mtime_ns(fs, path: str) -> int:
    """A shard's modification time: nanoseconds on local disk, the object's date elsewhere."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return os.stat(path).st_mtime_ns
    try:
        return int(fs.modified(path).timestamp() * 1e9)
    except (NotImplementedError, KeyError, AttributeError):  # a store that keeps no dates
        return 0


class TarMembers(ImageSource):
    """Row i is bytes `offsets[i]:offsets[i]+sizes[i]` of shard `shard_of[i]` (size −1: the sample has
    no image). Holds plain data only; each process opens its own filesystem on first read."""

    def __init__(self, location: str, shards: list[str], shard_mtimes_ns: list[int], shard_of: np.ndarray,
                 offsets: np.ndarray, sizes: np.ndarray, storage_options: dict | None = None) -> None:
        self.location, self.shards, self.shard_mtimes_ns = location, shards, shard_mtimes_ns
        self.shard_of, self.offsets, self.sizes = shard_of, offsets, sizes
        self.storage_options = storage_options or {}
        self._fs, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None}

    def _open_fs(self):
        if self._fs is None or self._pid != os.getpid():  # a forked worker opens its own (s3fs holds an event loop)
            self._fs, self._pid = _filesystem(self.location, self.storage_options)[0], os.getpid()
        return self._fs

    def read(self, row: int) -> bytes:
        shard, size = self.shards[self.shard_of[row]], int(self.sizes[row])
        if size < 0:
            raise FileNotFoundError(f"{shard}: sample {row} has no image")
        start = int(self.offsets[row])
        data = self._open_fs().cat_file(shard, start=start, end=start + size)
        if len(data) != size:
            raise OSError(f"{shard}: member at byte {start} cut short ({len(data)} of {size} bytes)")
        return data

    def stat(self, row: int) -> tuple[int, int]:
        """The member's size and its shard's modification time: a shard is replaced or rewritten
        whole, so its time is what moves when any record in it may have changed."""
        size = int(self.sizes[row])
        return (size, self.shard_mtimes_ns[self.shard_of[row]]) if size >= 0 else (-1, -1)


def _members(tar: tarfile.TarFile, name: str):
    """The members of a shard. One cut short (an interrupted download or copy) ends where its data
    does, with a warning: the samples before the cut are rows, the member at the cut reads short
    (a flagged row), and whatever followed it cannot be listed."""
    members = iter(tar)
    while True:
        try:
            member = next(members)
        except StopIteration:
            return
        except tarfile.TarError as exc:
            from ..progress import stderr

            stderr.print(f"[yellow]warning:[/yellow] shard {name} ends early ({exc}); the samples before that "
                         "point are read", highlight=False)
            return
        yield member


def _samples(fs, path: str, name: str) -> list[tuple[str, str | None, int, int, bytes | None]]:
    """(key, image member name, offset, size, cls bytes) per sample of one shard, in tar order."""
    from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

    samples: dict[str, dict] = {}
    last = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in _members(tar, name):
                if not member.isreg() or ("/" not in member.name and member.name.startswith(meta_prefix)
                                          and member.name.endswith(meta_suffix)):
                    continue
                key, suffix = base_plus_ext(member.name)
                if key is None:
                    continue
                if key != last:
                    if key in samples:
                        raise FgembedError(f"shard {name}: the members of sample {key!r} are not together; "
                                           "rewrite the shard with each sample's files adjacent")
                    samples[key], last = {}, key
                sample, suffix = samples[key], suffix.lower()
                if suffix in sample:
                    raise FgembedError(f"shard {name}: sample {key!r} has two {suffix} members")
                if suffix == "cls":
                    sample[suffix] = tar.extractfile(member).read()
                elif suffix in IMAGE_EXTS:
                    sample[suffix] = (member.name, member.offset_data, member.size)
    except tarfile.TarError as exc:
        raise FgembedError(f"shard {name} is not a readable tar file ({exc})") from None
    rows = []
    for key, sample in samples.items():
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        member, offset, size = sample[ext] if ext else (None, -1, -1)
        rows.append((key, member, offset, size, sample.get("cls")))
    return rows


def _class_index(value: bytes | None, where: str) -> int:
    if value is None:
        raise FgembedError(f"{where} has no cls (its integer class index)")
    try:
        index = int(value)  # webdataset's own decoding of a `cls` member
    except ValueError:
        raise FgembedError(f"{where}.cls is not an integer class index: {value[:40]!r}") from None
    if index < 0:
        raise FgembedError(f"{where}.cls is a negative class index ({index})")
    return index


def _class_names(fs, path: str, location: str, n_classes: int) -> list[str]:
    """classes.txt beside the shards (line i names class i), else the indices themselves."""
    names_path = f"{path}/{CLASSES_FILE}"
    if not fs.isfile(names_path):
        return [str(i) for i in range(n_classes)]
    with fs.open(names_path, "rt", encoding="utf-8") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    where = f"{location}/{CLASSES_FILE}"
    if "" in names:
        raise FgembedError(f"{where}: line {names.index('') + 1} is empty (line i names class i)")
    if len(names) < n_classes:
        raise FgembedError(f"{where} names {len(names)} classes, but a sample's cls is {n_classes - 1}")
    if len(set(names)) != len(names):
        raise FgembedError(f"{where} names a class twice")
    return names


def read_webdataset(root: str | Path, storage_options: dict | None = None) -> SampleTable:
    """The shards under `root` (a folder, or a URL fsspec opens) as one table."""
    require("fsspec", "webdataset")
    require("webdataset", "webdataset")
    try:
        fs, path, local = _filesystem(root, storage_options)
        if not fs.isdir(path):
            raise FileNotFoundError(path)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise FgembedError(f"dataset root not found: {root}") from None
    except ImportError as exc:  # an fsspec protocol whose package is not installed (s3fs, gcsfs, adlfs)
        raise FgembedError(f"cannot open {root}: {exc}") from None
    location = path if local else fs.unstrip_protocol(path)
    files = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"}
    tars = sorted(n for n in files if n.endswith(".tar"))
    stray = [n for n in tars if not SHARD.match(n)]
    if stray:
        raise FgembedError(f"{location} holds {stray[0]}: name shards train-*.tar, val-*.tar or test-*.tar")
    if not tars:
        raise FgembedError(f"no webdataset shards under {location} (expected train-*.tar, optionally "
                           "val-*.tar and test-*.tar)")
    if not any(n.startswith("train-") for n in tars):
        raise FgembedError(f"no training shard under {location} (train-*.tar)")
    order = sorted(tars, key=lambda n: (SPLIT_NAMES[n.split("-", 1)[0]], n))
    shards, mtimes, paths, labels, split, shard_of, offsets, sizes = [], [], [], [], [], [], [], []
    for i, name in enumerate(order):
        shard = f"{path}/{name}"
        shards.append(shard if local else fs.unstrip_protocol(shard))
        mtimes.append(_mtime_ns(fs, shard))
        code = SPLIT_NAMES[name.split("-", 1)[0]]
        for key, member, offset, size, cls in _samples(fs, shard, name):
            paths.append(f"{name}/{member or key}")
            labels.append(_class_index(cls, f"{name}/{key}"))
            split.append(code)
            shard_of.append(i)
            offsets.append(offset)
            sizes.append(size)
    if not paths:
        raise FgembedError(f"the shards under {location} hold no samples")
    class_names = _class_names(fs, path, location, max(labels) + 1)
    source = TarMembers(location, shards, mtimes, np.array(shard_of, np.int32), np.array(offsets, np.int64),
                        np.array(sizes, np.int64), storage_options)
    return SampleTable("webdataset", location, np.arange(len(paths)), paths, labels, class_names, split,
                       source=source)
