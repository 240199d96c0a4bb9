from __future__ import annotations

import numpy as np
from PIL import Image

from fgembed.images import MISSING, OK, TRUNCATED, UNREADABLE, load_rgb


def _jpeg(tmp_path, name="a.jpg"):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / name, quality=90)
    return tmp_path / name


def test_statuses(tmp_path):
    good = _jpeg(tmp_path)
    image, status = load_rgb(good)
    assert status == OK and image.mode == "RGB" and image.size == (80, 60)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) * 2 // 3])
    image, status = load_rgb(tmp_path / "trunc.jpg")
    assert status == TRUNCATED and image.size == (80, 60)
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert load_rgb(tmp_path / "empty.jpg") == (None, UNREADABLE)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all" * 10)
    assert load_rgb(tmp_path / "junk.jpg") == (None, UNREADABLE)
    assert load_rgb(tmp_path / "nope.jpg") == (None, MISSING)
    # the global PIL switch is restored: a truncated file is still detected the second time
    assert load_rgb(tmp_path / "trunc.jpg")[1] == TRUNCATED


def test_modes_convert_consistently(tmp_path):
    rgb = Image.new("RGB", (8, 8), (10, 200, 30))
    rgb.convert("L").save(tmp_path / "gray.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("P").save(tmp_path / "pal.png")
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # fully transparent → white background
    rgba.save(tmp_path / "alpha.png")
    Image.new("LA", (8, 8), (50, 255)).save(tmp_path / "la.png")
    for name in ("gray.png", "cmyk.jpg", "pal.png", "alpha.png", "la.png"):
        image, status = load_rgb(tmp_path / name)
        assert status == OK and image.mode == "RGB", name
    assert load_rgb(tmp_path / "alpha.png")[0].getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "la.png")[0].getpixel((0, 0)) == (50, 50, 50)
    assert load_rgb(tmp_path / "pal.png")[0].getpixel((0, 0)) == Image.open(tmp_path / "pal.png").convert("RGB").getpixel((0, 0))
