"""`--decode device`: workers read bytes, JPEGs are decoded in batches (nvJPEG on CUDA; here
torchvision's CPU decoder, the same code path) and each library's resize/crop is replayed on the
decoded tensors. Checked against the CPU path; images nvJPEG should not see go through PIL and
keep their statuses; without CUDA the CLI flag is one line."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from fgembed.cli.main import app
from PIL import Image
from typer.testing import CliRunner

from fgembed.backbones import LoadOptions
from fgembed.datasets import load_dataset
from fgembed.errors import FgembedError
from fgembed.extraction.device_decode import DeviceDecoder
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.extraction.feeds import clean_jpeg
from fgembed.images import MISSING, OK, TRUNCATED, UNREADABLE
from fgembed.store import FeatureStore


def _opts(**kw) -> ExtractOptions:
    return ExtractOptions(batch_size=8, workers=kw.pop("workers", 0), shard_rows=16, progress=False,
                          dtype="float32", device="cpu", load=LoadOptions(pretrained=False), **kw)


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_device_decode_matches_the_cpu_path(manifest_csv, tmp_path, hf_models):
    """transformers' processor replayed on the decoded tensors equals the CPU path (libjpeg-turbo
    both ways, the processor's own ops); timm's PIL resize is stood in for by its tensor resize."""
    table = load_dataset("manifest", manifest_csv)
    names = ["timm:test_vit", "timm:test_resnet", f"hf:{hf_models['dinov2']}", f"hf:{hf_models['dinov3']}"]
    extract(table, tmp_path / "cpu.zarr", names, _opts())
    summary = extract(table, tmp_path / "dev.zarr", names, _opts(decode="device", workers=1))
    assert set(summary.feeds.values()) == {"device-decode"}
    cpu, dev = FeatureStore.open(tmp_path / "cpu.zarr"), FeatureStore.open(tmp_path / "dev.zarr")
    for name in names[2:]:
        np.testing.assert_allclose(dev.features(name), cpu.features(name), rtol=1e-4, atol=1e-5, err_msg=name)
    for name in names[:2]:
        assert _cosine(dev.features(name), cpu.features(name)).min() >= 0.99, name
    assert dev.backbone_info("timm:test_vit").fingerprint["feed"] == "device-decode"  # numbers moved: recorded
    with pytest.raises(FgembedError, match=r"feed: \"uint8\" → \"device-decode\""):
        extract(table, tmp_path / "cpu.zarr", names[:1], _opts(decode="device"))


def test_images_nvjpeg_should_not_see_keep_their_status(manifest_csv, tmp_path):
    """PNG, grayscale and CMYK JPEGs, a truncated JPEG, garbage and a missing file: the same rows
    and statuses as the CPU path; the PIL-decoded ones embedded as the CPU path embeds them."""
    table = load_dataset("manifest", manifest_csv)
    root = tmp_path / "data"
    shutil.copytree(table.root, root)
    odd = load_dataset("manifest", root / "manifest.csv")
    path = lambda row: root / odd.paths[row]  # noqa: E731
    Image.open(path(1)).save(buffer := io.BytesIO(), format="PNG")
    path(1).write_bytes(buffer.getvalue())  # a PNG under a .jpg name
    Image.open(path(2)).convert("L").save(path(2), format="JPEG")
    Image.open(path(4)).convert("CMYK").save(path(4), format="JPEG")
    data = path(3).read_bytes()
    path(3).write_bytes(data[: len(data) // 2])
    path(10).write_bytes(b"\xff\xd8\xff garbage")
    path(20).unlink()
    extract(odd, tmp_path / "cpu.zarr", ["timm:test_resnet"], _opts())
    summary = extract(odd, tmp_path / "dev.zarr", ["timm:test_resnet"], _opts(decode="device", workers=1))
    cpu, dev = FeatureStore.open(tmp_path / "cpu.zarr"), FeatureStore.open(tmp_path / "dev.zarr")
    status = dev.status("timm:test_resnet")
    np.testing.assert_array_equal(status, cpu.status("timm:test_resnet"))
    assert (status[1], status[2], status[4], status[3], status[10], status[20]) == \
        (OK, OK, OK, TRUNCATED, UNREADABLE, MISSING)
    assert {f[2] for f in summary.failures} == {"truncated-but-loaded", "unreadable", "missing"}
    emb = dev.group["features/timm_test_resnet/emb"][:]
    assert np.isnan(emb[[10, 20]]).all() and np.isfinite(emb[[1, 2, 3, 4]]).all()
    assert _cosine(emb[[1, 2, 3, 4]], cpu.group["features/timm_test_resnet/emb"][:][[1, 2, 3, 4]]).min() >= 0.99


def test_clean_jpeg_reads_only_what_nvjpeg_may_decode(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    image.save(buffer := io.BytesIO(), format="JPEG")
    jpeg = buffer.getvalue()
    assert clean_jpeg(jpeg) and not clean_jpeg(jpeg[:-100]) and not clean_jpeg(b"\x89PNG\r\n")
    image.convert("CMYK").save(cmyk := io.BytesIO(), format="JPEG")
    assert not clean_jpeg(cmyk.getvalue())
    Image.new("RGB", (20000, 10)).save(strip := io.BytesIO(), format="JPEG")
    assert not clean_jpeg(strip.getvalue())  # refused by size: PIL's path flags it, nothing decodes it


def test_a_jpeg_the_decoder_rejects_falls_back_to_the_cpu():
    """Bytes that reach the batched decoder but are not a JPEG: the batch is decoded image by image,
    the bad one goes to PIL, which flags it; the good one is decoded, unshifted."""
    image = Image.fromarray(np.full((30, 40, 3), 200, np.uint8))
    image.save(buffer := io.BytesIO(), format="JPEG")
    good = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff not really a jpeg \xff\xd9"), dtype=torch.uint8)
    status = np.array([OK, OK], np.uint8)
    out = DeviceDecoder(torch.device("cpu"))(status, [bad, good])
    assert list(status) == [UNREADABLE, OK]
    assert out[1].shape == (3, 30, 40) and out[0].shape == (3, 8, 8)


def test_decode_device_without_cuda_is_one_line(manifest_csv, tmp_path):
    result = CliRunner().invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store",
                                      str(tmp_path / "s.zarr"), "--backbone", "timm:test_vit", "--no-pretrained",
                                      "--decode", "device", "--device", "cpu", "--quiet"])
    assert isinstance(result.exception, FgembedError), result.output
    message = str(result.exception)
    assert result.exception.exit_code == 2 and "\n" not in message and message.startswith("--decode device")
    assert not (tmp_path / "s.zarr").exists()  # refused before anything is made
    result = CliRunner().invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store",
                                      str(tmp_path / "s.zarr"), "--backbone", "timm:test_vit", "--decode", "gpu"])
    assert isinstance(result.exception, FgembedError) and "unknown --decode 'gpu'" in str(result.exception)
