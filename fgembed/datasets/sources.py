"""Where a dataset's image bytes come from: the one seam between dataset readers and extraction.

A `SampleTable` row names an image; its `source` turns the row into the image's encoded bytes
(`read`), cheap metadata for the dataset identity (`stat`), and a short content sample (`ends`).
Extraction never opens a path itself: decode workers call `source.read(row)`, so a folder of
files, members of webdataset tar shards or rows of a Hugging Face dataset all feed the same
engine, and a missing or unreadable record is a flagged row like a missing file.

A source is pickled into every decode worker (DataLoader), so it holds plain data and opens
handles lazily, per process.
"""
from __future__ import annotations

import os
from pathlib import Path

SAMPLE_BYTES = 2048  # from each end of a sampled record, for the dataset identity's content hash


class ImageSource:
    """The bytes behind each row of a table. Subclasses implement `read` and `stat`."""

    #: what the dataset identity records as the images' location (a resolved folder or a URL)
    location: str = ""

    def read(self, row: int) -> bytes:
        """The encoded image of `row`; FileNotFoundError when the record does not exist."""
        raise NotImplementedError

    def stat(self, row: int) -> tuple[int, int]:
        """(size in bytes, modification time in ns) of `row`'s record, (-1, -1) when missing:
        one cheap look per row, so a changed record is noticed without reading it."""
        raise NotImplementedError

    def ends(self, row: int) -> bytes:
        """The first and last SAMPLE_BYTES of `row`'s record (the identity's sampled content
        hash); a marker when it cannot be read."""
        try:
            data = self.read(row)
        except OSError:
            return b"<unreadable>"
        return data[:SAMPLE_BYTES] + data[max(SAMPLE_BYTES, len(data) - SAMPLE_BYTES):]


class LocalFiles(ImageSource):
    """Image files under a folder: row i is `root / paths[i]` (what every file reader gives)."""

    def __init__(self, root: str | Path, paths: list[str]) -> None:
        self.root, self.paths = Path(root), paths
        self.location = str(self.root.resolve())

    def path(self, row: int) -> Path:
        return self.root / self.paths[row]

    def read(self, row: int) -> bytes:
        path = self.path(row)
        if not path.is_file():  # a folder or a dangling link is as missing as no file
            raise FileNotFoundError(str(path))
        return path.read_bytes()

    def stat(self, row: int) -> tuple[int, int]:
        try:
            st = self.path(row).stat()
        except OSError:
            return -1, -1
        return st.st_size, st.st_mtime_ns

    def ends(self, row: int) -> bytes:
        """Reads only the two ends, not the whole file."""
        try:
            with self.path(row).open("rb") as f:
                head = f.read(SAMPLE_BYTES)
                f.seek(0, os.SEEK_END)
                f.seek(max(len(head), f.tell() - SAMPLE_BYTES))
                return head + f.read(SAMPLE_BYTES)
        except OSError:
            return b"<unreadable>"
