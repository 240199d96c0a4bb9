"""The extraction engine: decode once, resume after kill -9, flagged rows, torchrun ranks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from fgembed.cli.main import app
from PIL import Image
from typer.testing import CliRunner

import fgembed.backbones
import fgembed.extraction.extract as engine
import fgembed.extraction.feeds as feeds
from fgembed.backbones import LoadOptions
from fgembed.datasets import load_dataset
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.images import MISSING, OK, TRANSFORM_FAILED, TRUNCATED, UNREADABLE
from fgembed.store import FeatureStore
from fgembed.synthetic import generate, write_manifest

from .conftest import TIMM_TINY, run_cli


def _opts(**kw):
    kw.setdefault("device", "cpu")  # decode and resume logic, compared bit for bit: the CPU path
    return ExtractOptions(batch_size=kw.pop("batch_size", 8), workers=kw.pop("workers", 0),
                          shard_rows=kw.pop("shard_rows", 16), progress=False,
                          load=LoadOptions(pretrained=False), **kw)


def _arrays(path):
    g = zarr.open_group(path, mode="r")
    return {dict(sub.attrs)["name"]: {k: sub[k][:] for k in ("emb", "done", "status")}
            for _, sub in g["features"].groups()}


def _assert_same_store(a, b):
    fa, fb = _arrays(a), _arrays(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        for key in ("done", "status"):
            np.testing.assert_array_equal(fa[name][key], fb[name][key], err_msg=f"{name}/{key}")
        np.testing.assert_array_equal(fa[name]["emb"], fb[name]["emb"], err_msg=f"{name}/emb")  # NaN == NaN here


def test_each_image_decoded_once_for_all_backbones(manifest_csv, tmp_path, monkeypatch):
    table = load_dataset("manifest", manifest_csv)
    calls = []
    real = feeds.read_rgb
    monkeypatch.setattr(feeds, "read_rgb", lambda source, row: calls.append(row) or real(source, row))
    summary = extract(table, tmp_path / "s.zarr", list(TIMM_TINY), _opts())
    assert len(calls) == len(table) == summary.processed
    assert summary.backbones == {"timm:test_vit": 64, "timm:test_convnext": 64, "timm:test_resnet": 96}
    # test_vit and test_convnext share one transform; each still equals its own single-backbone run
    for name in ("timm:test_convnext", "timm:test_resnet"):
        extract(table, tmp_path / f"{name[5:]}.zarr", [name], _opts())
        np.testing.assert_array_equal(FeatureStore.open(tmp_path / f"{name[5:]}.zarr").features(name),
                                      FeatureStore.open(tmp_path / "s.zarr").features(name))
    calls.clear()
    again = extract(table, tmp_path / "s.zarr", list(TIMM_TINY), _opts())  # resume: nothing left
    assert calls == [] and again.processed == 0 and again.skipped_shards == FeatureStore.open(tmp_path / "s.zarr").n_shards
    # a new backbone on the finished store decodes again, once, for itself only
    extract(table, tmp_path / "s.zarr", ["timm:test_vit", "timm:test_convnext2"], _opts())
    assert len(calls) == len(table)


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    return write_manifest(root, generate(root, groups=4, classes_per_group=4, per_class=20, size=(160, 120)))


def test_kill_minus_nine_then_resume_equals_uninterrupted(big_manifest, tmp_path):
    args = ["extract", "--dataset", "manifest", "--root", big_manifest, "--backbone", "timm:test_vit",
            "--backbone", "timm:test_resnet", "--no-pretrained", "--workers", "1", "--batch-size", "4",
            "--shard-rows", "8", "--quiet"]
    run_cli(*args, "--store", tmp_path / "clean.zarr", check=True)
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "fgembed", *map(str, args), "--store", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            arrays = _arrays(store)
            done = min(int(a["done"].sum()) for a in arrays.values()) if len(arrays) == 2 else 0
        except Exception:  # store not created yet
            done = 0
        if done >= 24:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed; make the test data larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    arrays = _arrays(store)
    assert 0 < min(a["done"].sum() for a in arrays.values()) < 320  # really interrupted mid-way
    resumed = run_cli(*args, "--store", store, "--json", check=True)
    summary = json.loads(resumed.stdout)
    assert summary["skipped_shards"] >= 3 and summary["processed"] < 320
    _assert_same_store(store, tmp_path / "clean.zarr")
    assert not list(store.rglob("*.partial"))


def test_bad_images_are_flagged_rows_never_shifted(manifest_csv, tmp_path):
    table = load_dataset("manifest", manifest_csv)
    extract(table, tmp_path / "clean.zarr", ["timm:test_vit"], _opts())
    root = tmp_path / "data"
    shutil.copytree(table.root, root)
    damaged = load_dataset("manifest", root / "manifest.csv")
    path = lambda row: root / damaged.paths[row]
    data = path(3).read_bytes()
    path(3).write_bytes(data[: len(data) // 2])  # truncated
    path(10).write_bytes(b"")  # empty
    path(11).write_bytes(b"\x00garbage" * 50)  # not an image
    path(20).unlink()  # missing
    Image.open(path(30)).convert("L").save(path(30), format="JPEG")  # grayscale: fine, converted
    summary = extract(damaged, tmp_path / "bad.zarr", ["timm:test_vit"], _opts())
    status = FeatureStore.open(tmp_path / "bad.zarr").status("timm:test_vit")
    assert status[3] == TRUNCATED and status[10] == UNREADABLE and status[11] == UNREADABLE
    assert status[20] == MISSING and status[30] == OK
    assert {f[2] for f in summary.failures} == {"truncated-but-loaded", "unreadable", "missing"}
    emb = zarr.open_group(tmp_path / "bad.zarr")["features/timm_test_vit/emb"][:]
    clean = zarr.open_group(tmp_path / "clean.zarr")["features/timm_test_vit/emb"][:]
    assert np.isnan(emb[[10, 11, 20]]).all() and np.isfinite(emb[3]).all()
    untouched = np.setdiff1d(np.arange(len(table)), [3, 10, 11, 20, 30])
    np.testing.assert_array_equal(emb[untouched], clean[untouched])  # no row moved
    with pytest.raises(FgembedError, match="--strict: 4 of 60 images failed") as exc:
        extract(damaged, tmp_path / "strict.zarr", ["timm:test_vit"], _opts(strict=True))
    assert exc.value.exit_code == 1
    assert FeatureStore.open(tmp_path / "strict.zarr").backbone_info("timm:test_vit").rows_done == 60


def test_torchrun_two_ranks_equal_one_process(big_manifest, tmp_path):
    args = ["extract", "--dataset", "manifest", "--root", str(big_manifest), "--backbone", "timm:test_vit",
            "--backbone", "timm:test_convnext", "--no-pretrained", "--workers", "0", "--batch-size", "8",
            "--shard-rows", "16", "--quiet"]
    run_cli(*args, "--store", tmp_path / "single.zarr", check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fgembed", *args, "--store", str(tmp_path / "ranks.zarr")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_store(tmp_path / "ranks.zarr", tmp_path / "single.zarr")
    assert FeatureStore.open(tmp_path / "ranks.zarr").backbone_info("timm:test_vit").complete


def test_a_transform_that_raises_flags_its_row(manifest_csv, tmp_path, monkeypatch):
    """One image the library's transform chokes on: a flagged NaN row, the run goes on."""
    table = load_dataset("manifest", manifest_csv)
    extract(table, tmp_path / "clean.zarr", ["timm:test_vit"], _opts())
    root = tmp_path / "data"
    shutil.copytree(table.root, root)
    odd = load_dataset("manifest", root / "manifest.csv")
    Image.new("RGB", (33, 17), (10, 200, 30)).save(root / odd.paths[5], format="JPEG")
    real = engine.load_preprocessing

    def fragile(name, options):
        pre = real(name, options)
        for attr in ("transform", "geometric"):
            step = getattr(pre, attr)
            if step is not None:
                def raising(image, step=step):
                    if image.size == (33, 17):
                        raise ValueError("this library cannot resize a 33×17 image")
                    return step(image)
                setattr(pre, attr, raising)
        return pre

    monkeypatch.setattr(engine, "load_preprocessing", fragile)
    summary = extract(odd, tmp_path / "odd.zarr", ["timm:test_vit"], _opts())
    store = FeatureStore.open(tmp_path / "odd.zarr")
    assert store.status("timm:test_vit")[5] == TRANSFORM_FAILED
    assert [(f[0], f[2]) for f in summary.failures] == [(int(odd.ids[5]), "transform-failed")]
    emb = zarr.open_group(tmp_path / "odd.zarr")["features/timm_test_vit/emb"][:]
    clean = zarr.open_group(tmp_path / "clean.zarr")["features/timm_test_vit/emb"][:]
    assert np.isnan(emb[5]).all()
    keep = np.setdiff1d(np.arange(len(table)), [5])
    np.testing.assert_array_equal(emb[keep], clean[keep])


def test_download_passes_names_and_cache_dir_to_the_library(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fgembed.backbones, "download_weights",
                        lambda name, cache_dir: calls.append((name, cache_dir)) or f"{cache_dir}/{name}")
    monkeypatch.setattr("fgembed.cli.extraction._hub_unreachable", lambda: None)  # as on a machine with internet
    result = CliRunner().invoke(app, ["download", "--backbone", "dinov2_vitl14", "--backbone", "timm:resnet50",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert calls == [("dinov2_vitl14", tmp_path / "cache"), ("timm:resnet50", tmp_path / "cache")]
    assert f"dinov2_vitl14: {tmp_path / 'cache'}/dinov2_vitl14" in result.stdout
    calls.clear()
    result = CliRunner().invoke(app, ["download", "--backbone", "timm:resnet50", "--backbone", "dinov2_vitl41"])
    assert isinstance(result.exception, FgembedError) and "unknown backbone 'dinov2_vitl41'" in str(result.exception)
    assert calls == []  # a typo fails before anything is fetched


def test_download_without_network_says_how_to_fetch_elsewhere(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr("socket.socket.connect", refuse)  # no network, as on a firewalled GPU node
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # not merely offline mode
    result = CliRunner().invoke(app, ["download", "--backbone", "convnextv2_large", "--cache-dir", str(tmp_path)])
    assert isinstance(result.exception, FgembedError), result.output
    message = str(result.exception)
    assert result.exception.exit_code == 2 and "\n" not in message
    assert message.startswith("cannot download: no network")
    assert "on a machine with internet run `fgembed download --backbone convnextv2_large --cache-dir DIR`" in message
    assert "--cache-dir DIR --offline" in message
