"""The worker side of extraction: what a decode worker makes of each row, for every model at once.

Each image is read once. What a worker sends depends on the feed (`FEEDS`, recorded in every
group's fingerprint as `feed`, since the paths give slightly different numbers):

- `uint8`: the library's own resize/crop, as a uint8 tensor; `/255, mean, std` on the device.
- `float`: the library's whole transform (where it cannot be split that way: DINOv3's processor).
- `device-resize`: the decoded image; the library's resize/crop replayed on the device.
- `device-decode`: the JPEG's bytes, decoded in batches on the device (`device_decode.py`); an
  image nvJPEG should not see (another format, CMYK, truncated, too large) is decoded here with
  PIL as always, so the image policy (`images.IMAGE_POLICY`) and its statuses hold on every path.

Models whose preprocessing is identical share one tensor per row. A row whose image failed, or
whose transform raised, gets a placeholder and a status that makes its embedding NaN.
"""
from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

from ..backbones import Preprocessing
from ..images import MAX_ASPECT, MAX_PIXELS, MISSING, OK, TRANSFORM_FAILED, UNREADABLE, decode_rgb, read_rgb

FEEDS = ("uint8", "float", "device-resize", "device-decode")
DEVICE_FEEDS = FEEDS[2:]
_JPEG_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB as PIL would; CMYK/YCCK JPEGs go through PIL


@dataclass(frozen=True)
class Feed:
    """What a worker makes of a decoded image for one group of models."""

    kind: str  # one of FEEDS
    make: Callable[[Image.Image], torch.Tensor]
    shape: tuple[int, ...] | None  # None: varies with the image (the device feeds)
    dtype: torch.dtype


def decoded_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 CHW tensor (what nvJPEG gives for a JPEG)."""
    return T.functional.pil_to_tensor(image)


def make_feed(pre: Preprocessing, kind: str) -> Feed:
    if kind == "uint8":
        return Feed(kind, pre.geometric, pre.input_shape, torch.uint8)
    if kind == "float":
        return Feed(kind, pre.transform, pre.input_shape, torch.float32)
    return Feed(kind, decoded_tensor, None, torch.uint8)


def feed_key(pre: Preprocessing, kind: str) -> str:
    """Equal keys: one tensor per row serves both models."""
    return kind if kind in DEVICE_FEEDS else f"{kind}:{pre.key()}"


def _worker_seconds() -> float:
    """CPU seconds of this worker thread: what the thread split (`threads.py`) divides."""
    return time.thread_time()


class DecodedImages(torch.utils.data.Dataset):
    """Row → ((row, status, decode s, transform s), [one tensor per distinct feed]).

    Times are the worker's CPU seconds (not wall time: a worker descheduled by the forward's
    threads would otherwise look busy)."""

    def __init__(self, source, rows: int, pres: Sequence[Preprocessing], kinds: Sequence[str]) -> None:
        self.source, self.rows = source, rows
        keys = [feed_key(p, k) for p, k in zip(pres, kinds)]
        unique = list(dict.fromkeys(keys))
        self.slot = [unique.index(k) for k in keys]  # model i reads tensor slot[i]
        self.feeds = [make_feed(pres[keys.index(k)], kinds[keys.index(k)]) for k in unique]

    def __len__(self) -> int:
        return self.rows

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(f.shape or (3, 8, 8), dtype=f.dtype) for f in self.feeds]

    def __getitem__(self, row: int):
        start = _worker_seconds()
        image, status = read_rgb(self.source, row)
        decoded = _worker_seconds()
        if image is None:
            return (row, status, decoded - start, 0.0), self._zeros()
        try:
            tensors = [f.make(image) for f in self.feeds]
        except Exception:  # a library's transform raising on one odd image flags that row, nothing more
            status, tensors = TRANSFORM_FAILED, self._zeros()
        return (row, status, decoded - start, _worker_seconds() - decoded), tensors

    def collate(self, items: list) -> tuple:
        """Stack each feed; decoded images differ in size and travel as a list."""
        meta = default_collate([item[0] for item in items])
        inputs = [[item[1][i] for item in items] if f.shape is None else torch.stack([item[1][i] for item in items])
                  for i, f in enumerate(self.feeds)]
        return meta, inputs


def clean_jpeg(data: bytes) -> bool:
    """Whether nvJPEG may decode these bytes as PIL would: a baseline-or-progressive JPEG in RGB or
    grayscale, whole (ends in EOI: a truncated file goes to PIL, which loads and flags it), within
    the image policy's size limits. Reads the header only."""
    if data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
                return (image.format == "JPEG" and image.mode in _JPEG_MODES and w * h <= MAX_PIXELS
                        and max(w, h) <= MAX_ASPECT * max(1, min(w, h)))
    except Exception:  # PIL cannot even read the header: PIL's full decode will flag the row
        return False


class EncodedImages(torch.utils.data.Dataset):
    """`--decode device`: row → ((row, status, read s, decode s), item), where item is the JPEG's
    bytes (a uint8 tensor, decoded on the device) or, for any image nvJPEG should not see, the
    image decoded here by PIL (a uint8 CHW tensor) — or an empty tensor for a failed row."""

    def __init__(self, source, rows: int) -> None:
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int):
        start = _worker_seconds()
        try:
            data = self.source.read(row)
        except FileNotFoundError:
            return (row, MISSING, _worker_seconds() - start, 0.0), torch.empty(0, dtype=torch.uint8)
        except Exception:  # a source's own read error: the row fails, as on every path
            return (row, UNREADABLE, _worker_seconds() - start, 0.0), torch.empty(0, dtype=torch.uint8)
        read = _worker_seconds()
        if clean_jpeg(data):
            return (row, OK, read - start, 0.0), torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image, status = decode_rgb(data)
        item = decoded_tensor(image) if image is not None else torch.empty(0, dtype=torch.uint8)
        return (row, status, read - start, _worker_seconds() - read), item

    @staticmethod
    def collate(items: list) -> tuple:
        """Bytes (1-d) and decoded images (3-d) stay a list: the device decodes the former."""
        return default_collate([item[0] for item in items]), [item[1] for item in items]
