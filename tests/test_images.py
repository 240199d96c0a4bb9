from __future__ import annotations

import numpy as np
from PIL import Image

from fgembed.images import (
    IMAGE_POLICY,
    MISSING,
    OK,
    REFUSED_SIZE,
    TRUNCATED,
    UNREADABLE,
    load_rgb,
)


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


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(ramp).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode.startswith("I")  # PIL reads it as 16-bit
        image, status = load_rgb(tmp_path / name)
        pixels = np.asarray(image)
        assert status == OK and pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        expected = np.round(ramp / 257).astype(np.uint8)  # the reference: 65535 → 255, linear
        assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1, name
        assert (pixels == 255).mean() < 0.01  # PIL's own convert clips ~99.6 % to white


def test_bombs_and_strips_are_refused_before_decoding(tmp_path, monkeypatch):
    from fgembed import images

    Image.new("RGB", (20000, 1)).save(tmp_path / "strip.png")
    assert load_rgb(tmp_path / "strip.png") == (None, REFUSED_SIZE)
    Image.new("RGB", (120, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)  # a bomb in miniature: over the policy's pixels
    assert load_rgb(tmp_path / "big.png") == (None, REFUSED_SIZE)
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # Pillow's own warning is honoured, not silenced
    assert load_rgb(tmp_path / "big.png") == (None, REFUSED_SIZE)
    assert "refused over 89478485 px" in IMAGE_POLICY and "16-bit" in IMAGE_POLICY
