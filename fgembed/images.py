"""Decode an image into RGB once, with a status code instead of an exception.

Extraction must never shift rows: a file that cannot be decoded becomes a flagged row. The
conversion policy is part of every backbone fingerprint (`IMAGE_POLICY`), because it changes
the numbers: grayscale, CMYK and palette images go through PIL's `convert("RGB")`; images with
alpha are composited onto white first (PIL would otherwise drop alpha and keep whatever colour
the transparent pixels happen to hold); 16-bit grayscale (PNG, TIFF) is scaled to 8 bits
(PIL's own conversion clips it, turning almost every pixel white). Images over `MAX_PIXELS` or
more elongated than `MAX_ASPECT`:1 are refused before decoding: a decompression bomb, or a
20000 × 1 strip whose resize to the model's short side would take gigabytes.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

OK, UNREADABLE, TRUNCATED, MISSING, TRANSFORM_FAILED, NONFINITE, REFUSED_SIZE = 0, 1, 2, 3, 4, 5, 6
STATUS_NAMES = {OK: "ok", UNREADABLE: "unreadable", TRUNCATED: "truncated-but-loaded", MISSING: "missing",
                TRANSFORM_FAILED: "transform-failed", NONFINITE: "non-finite-embedding",
                REFUSED_SIZE: "refused-size"}
FAILED = (UNREADABLE, MISSING, TRANSFORM_FAILED, NONFINITE, REFUSED_SIZE)  # rows whose embedding is NaN
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning threshold (~89.5 Mpx)
MAX_ASPECT = 50
IMAGE_POLICY = (f"pil-rgb; alpha composited on white; 16-bit grayscale scaled by 255/65535; no exif transpose; "
                f"truncated files loaded and flagged; refused over {MAX_PIXELS} px or aspect over {MAX_ASPECT}:1")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class _Refused(Exception):
    """The image's header says it is too large or too elongated to decode."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:  # "I" (32-bit) is how PIL opens some 16-bit files: same range
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF/ICC chunks; the row decides, not a warning
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # but a bomb is never decoded
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * max(1, min(w, h)):
                raise _Refused
            image.load()
            return _to_rgb(image)


def read_rgb(source, row: int) -> tuple[Image.Image | None, int]:
    """Row `row` of an image source (`datasets.sources`), decoded as `decode_rgb` does; MISSING
    when the record does not exist, UNREADABLE when it cannot be read."""
    try:
        data = source.read(row)
    except FileNotFoundError:
        return None, MISSING
    except Exception:  # a source's own read error (permissions, a corrupt archive member): the row fails
        return None, UNREADABLE
    return decode_rgb(data)


def load_rgb(path: str | Path) -> tuple[Image.Image | None, int]:
    """One image file, as `read_rgb` reads a row."""
    from .datasets.sources import LocalFiles

    path = Path(path)
    return read_rgb(LocalFiles(path.parent, [path.name]), 0)


def decode_rgb(data: bytes) -> tuple[Image.Image | None, int]:
    """(RGB image, OK) or (image, TRUNCATED) or (None, UNREADABLE | REFUSED_SIZE)."""
    try:
        return _open(data), OK
    except (_Refused, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, REFUSED_SIZE
    except OSError as exc:
        if "truncated" not in str(exc) and "broken data stream" not in str(exc):
            return None, UNREADABLE
    except Exception:  # PIL raises many types (ValueError, SyntaxError, …)
        return None, UNREADABLE
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        return _open(data), TRUNCATED
    except Exception:
        return None, UNREADABLE
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
