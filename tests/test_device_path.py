"""The device path: weights cast to bf16, the uint8 feed normalised on the device, --device-resize.

Each faster path is checked against the reference path it replaces (fp32 / autocast, the
library's float transform) on real tiny models of every source library; CPU bf16 stands in for
the GPU's.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fgembed.cli.main import app
from PIL import Image
from typer.testing import CliRunner

from fgembed.backbones import LoadOptions, load_backbone
from fgembed.datasets import load_dataset
from fgembed.devices import DeviceModel, default_workers, resolve_precision
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.store import FeatureStore

COSINE = 0.999  # CONVENTIONS: bf16 / compiled paths against the reference path
TIMM_PAIR = ["timm:test_vit", "timm:test_resnet"]  # a transformer and a channels-last convnet


def _opts(**kw) -> ExtractOptions:
    return ExtractOptions(batch_size=8, workers=0, shard_rows=16, progress=False, dtype="float32",
                          load=LoadOptions(pretrained=False), **kw)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _stores_agree(table, tmp_path, names, reference: dict, other: dict, threshold: float = COSINE):
    ref = extract(table, tmp_path / "ref.zarr", names, _opts(**reference))
    new = extract(table, tmp_path / "new.zarr", names, _opts(**other))
    a, b = FeatureStore.open(tmp_path / "ref.zarr"), FeatureStore.open(tmp_path / "new.zarr")
    for name in names:
        cos = _cosine(a.features(name), b.features(name))
        assert cos.min() >= threshold, f"{name}: min cosine {cos.min():.5f}"
    return ref, new, a, b


def _library_backbones(tiny_clip, hf_models) -> list[str]:
    return [*TIMM_PAIR, f"open_clip:local-dir:{tiny_clip['local_dir']}", f"hf:{hf_models['dinov2']}",
            f"hf:{hf_models['dinov3']}"]


def test_bf16_weights_match_fp32_and_autocast(manifest_csv, tmp_path):
    table = load_dataset("manifest", manifest_csv)
    _, new, _, store = _stores_agree(table, tmp_path, TIMM_PAIR, {"precision": "fp32"}, {"precision": "bf16"})
    assert new.precision == "bf16-weights"
    assert store.backbone_info("timm:test_vit").fingerprint["precision"] == "bf16-weights"
    autocast = extract(table, tmp_path / "autocast.zarr", TIMM_PAIR, _opts(precision="bf16-autocast"))
    assert autocast.precision == "bf16-autocast"
    for name in TIMM_PAIR:
        cos = _cosine(FeatureStore.open(tmp_path / "autocast.zarr").features(name), store.features(name))
        assert cos.min() >= COSINE, name
    # the store remembers how its numbers were made: another precision is refused, not mixed in
    with pytest.raises(FgembedError, match="precision"):
        extract(table, tmp_path / "new.zarr", ["timm:test_vit"], _opts(precision="fp32"))


def test_bf16_weights_in_every_library(tiny_clip, hf_models):
    """Weights really are bf16 (no per-forward re-cast) and the embeddings stay on the fp32 ones."""
    image = Image.radial_gradient("L").convert("RGB").resize((90, 70))
    cpu = torch.device("cpu")
    for name in _library_backbones(tiny_clip, hf_models)[2:]:
        outputs = {}
        for precision in ("fp32", "bf16"):
            backbone = load_backbone(name, LoadOptions(pretrained=False))
            model = DeviceModel(backbone, cpu, resolve_precision(precision, cpu), compile_model=False)
            with torch.inference_mode():
                outputs[precision] = model(backbone.transform(image).unsqueeze(0)).float().numpy()
            dtypes = {p.dtype for p in backbone.model.parameters()}
            assert dtypes == {torch.float32 if precision == "fp32" else torch.bfloat16}, (name, dtypes)
        assert _cosine(outputs["fp32"], outputs["bf16"]).min() >= COSINE, name


def test_uint8_feed_equals_the_float_transform(manifest_csv, tmp_path, tiny_clip, hf_models):
    """Workers send the library's resize/crop as uint8; /255, mean, std on the device give the
    embeddings of the library's own float transform (up to the uint8 rounding of the resize)."""
    table = load_dataset("manifest", manifest_csv)
    names = _library_backbones(tiny_clip, hf_models)
    reference, fast, _, _ = _stores_agree(table, tmp_path, names, {"uint8_feed": False}, {})
    assert set(reference.feeds.values()) == {"float"}
    assert all(fast.feeds[n] == "uint8" for n in names[:3]), fast.feeds  # timm and open_clip always split


def test_device_resize_replays_the_library_steps(manifest_csv, tmp_path, tiny_clip, hf_models, monkeypatch):
    """torchvision's tensor resize stands in for PIL's (timm, open_clip): close, not equal, and
    recorded as such; a transformers processor runs itself on the device tensors."""
    table = load_dataset("manifest", manifest_csv)
    names = [*TIMM_PAIR, f"open_clip:local-dir:{tiny_clip['local_dir']}", f"hf:{hf_models['dinov2']}",
             f"hf:{hf_models['dinov3']}"]
    _, resized, _, store = _stores_agree(table, tmp_path, names, {"device": "cpu"},
                                         {"device_resize": True, "device": "cpu"}, threshold=0.99)
    assert set(resized.feeds.values()) == {"device-resize"}
    assert store.backbone_info("timm:test_resnet").fingerprint["feed"] == "device-resize"
    for name in names[3:]:  # the processor's own code on the same pixels: equal up to float rounding
        reference = FeatureStore.open(tmp_path / "ref.zarr").features(name)
        np.testing.assert_allclose(store.features(name), reference, rtol=1e-4, atol=1e-5)
    # a transform holding a step no device can replay is refused, naming the backbone
    import torchvision.transforms as T

    import fgembed.extraction.extract as engine
    real = engine.load_preprocessing

    def odd(name, options):
        pre = real(name, options)
        pre.transform = T.Compose([T.Grayscale(3), *pre.transform.transforms])
        return pre

    monkeypatch.setattr(engine, "load_preprocessing", odd)
    result = CliRunner().invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store",
                                      str(tmp_path / "odd.zarr"), "--backbone", "timm:test_vit", "--no-pretrained",
                                      "--device-resize", "--workers", "0", "--quiet"])
    assert isinstance(result.exception, FgembedError), result.output
    message = str(result.exception)
    assert result.exception.exit_code == 2 and "--device-resize" in message and "timm:test_vit" in message
    assert "\n" not in message


def test_precision_choices(manifest_csv):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).weights == torch.bfloat16
    assert resolve_precision("bf16-autocast", cpu).weights == torch.float32
    with pytest.raises(FgembedError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    result = CliRunner().invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store",
                                      "x.zarr", "--backbone", "timm:test_vit", "--precision", "fp64"])
    assert isinstance(result.exception, FgembedError) and "unknown precision 'fp64'" in str(result.exception)


def test_default_workers_leave_a_core_for_the_main_loop(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four ranks share the node's cores
    assert default_workers() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert default_workers() == 0


@pytest.mark.slow
def test_compiled_backbone_matches_eager():
    """torch.compile fuses kernels: the last bits move (so `compile` is a strict fingerprint key),
    the embeddings do not."""
    image = Image.linear_gradient("L").convert("RGB").resize((90, 70))
    cpu, fp32 = torch.device("cpu"), resolve_precision("fp32", torch.device("cpu"))
    outputs = []
    for compile_model in (False, True):
        backbone = load_backbone("timm:test_resnet", LoadOptions(pretrained=False))
        model = DeviceModel(backbone, cpu, fp32, compile_model=compile_model)
        with torch.inference_mode():
            outputs.append(model(backbone.transform(image).unsqueeze(0).repeat(4, 1, 1, 1)).numpy())
    assert _cosine(*outputs).min() >= COSINE


def test_backbones_feed_column_says_what_each_library_allows(monkeypatch, hf_models):
    import json

    from fgembed.backbones import BackboneSpec, registry

    specs = {s.name: s for s in (BackboneSpec("tiny_vit", "timm", "test_vit"),
                                 BackboneSpec("tiny_dinov2", "hf", str(hf_models["dinov2"])))}
    monkeypatch.setattr(registry, "REFERENCE", specs)
    result = CliRunner().invoke(app, ["backbones", "--feed", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["tiny_vit"]["feed"] == "uint8" and rows["tiny_vit"]["device_resize"] is True
    assert rows["tiny_dinov2"]["device_resize"] is True  # the processor itself runs on device tensors
    assert rows["tiny_dinov2"]["feed"] in ("uint8", "float")


def test_profile_reports_every_stage(manifest_csv, tmp_path):
    """On whatever device `auto` picks: its default precision (bf16 weights on CUDA, fp32 on CPU),
    every loop stage, and the start-up split into stages that add up to the start-up."""
    import json

    from fgembed.devices import resolve_device

    result = CliRunner().invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store",
                                      str(tmp_path / "s.zarr"), "--backbone", "timm:test_resnet", "--no-pretrained",
                                      "--workers", "1", "--batch-size", "16", "--profile", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = resolve_precision("auto", resolve_device("auto")).name
    assert summary["workers"] == 1 and summary["precision"] == expected and summary["processed"] == 60
    stages = summary["stages"]
    for stage in ("decode (workers, summed)", "transform (workers, summed)", "device preprocess", "forward",
                  "write", "waiting for workers"):
        assert stages[stage] > 0, stage
    assert summary["steady_images_per_s"] > 0 and summary["startup_seconds"] > 0
    startup = summary["startup"]
    assert list(startup) == ["imports", "dataset read", "device set-up", "transforms",
                             "store set-up and dataset identity", "worker start", "model build and weight load",
                             "group set-up", "first batch"]
    assert all(v >= 0 for v in startup.values()) and startup["model build and weight load"] > 0
    assert sum(startup.values()) == pytest.approx(summary["startup_seconds"], abs=1e-3)


@pytest.mark.parametrize(("asked", "rank", "expected"), [("cuda", None, "cuda:0"), ("cuda", "1", "cuda:1"),
                                                           ("auto", "1", "cuda:1"), ("cuda:2", "1", "cuda:2")])
def test_a_bare_cuda_device_gets_this_ranks_index(monkeypatch, asked, rank, expected):
    """`torch.cuda.set_device(torch.device("cuda"))` raises: extraction on `--device cuda` once did."""
    from fgembed.devices import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    if rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", rank)
    assert resolve_device(asked) == torch.device(expected)


def test_a_cuda_index_beyond_the_visible_devices_is_one_line(monkeypatch):
    from fgembed.devices import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(FgembedError, match=r"^cuda:1 asked for, but torch sees 1 CUDA device\(s\)"):
        resolve_device("cuda")
