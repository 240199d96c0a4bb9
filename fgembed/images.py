"""Decode an image file into RGB once, with a status code instead of an exception.

Extraction must never shift rows: a file that cannot be decoded becomes a flagged row. The
conversion policy is part of every backbone fingerprint (`IMAGE_POLICY`), because it changes
the numbers: grayscale, CMYK and palette images go through PIL's `convert("RGB")`; images with
alpha are composited onto white first (PIL would otherwise drop alpha and keep whatever colour
the transparent pixels happen to hold).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile

OK, UNREADABLE, TRUNCATED, MISSING, TRANSFORM_FAILED = 0, 1, 2, 3, 4
STATUS_NAMES = {OK: "ok", UNREADABLE: "unreadable", TRUNCATED: "truncated-but-loaded", MISSING: "missing",
                TRANSFORM_FAILED: "transform-failed"}
FAILED = (UNREADABLE, MISSING, TRANSFORM_FAILED)  # rows whose embedding is NaN
IMAGE_POLICY = "pil-rgb; alpha composited on white; no exif transpose; truncated files loaded and flagged"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF/ICC chunks; the row decides, not a warning
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)


def load_rgb(path: str | Path) -> tuple[Image.Image | None, int]:
    """(RGB image, OK) or (image, TRUNCATED) or (None, UNREADABLE | MISSING)."""
    path = Path(path)
    if not path.is_file():
        return None, MISSING
    try:
        return _open(path), OK
    except OSError as exc:
        if "truncated" not in str(exc) and "broken data stream" not in str(exc):
            return None, UNREADABLE
    except Exception:  # PIL raises many types (ValueError, SyntaxError, DecompressionBombError, …)
        return None, UNREADABLE
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        return _open(path), TRUNCATED
    except Exception:
        return None, UNREADABLE
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
