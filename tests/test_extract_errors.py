"""Extraction that goes wrong: locks released on every exit path, every rank told of a failure,
flagged rows of every backbone reported."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import fgembed.extraction.extract as engine
from fgembed.backbones import LoadOptions
from fgembed.datasets import load_dataset
from fgembed.devices import DeviceModel
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.store import FeatureStore


def _opts(**kw):
    kw.setdefault("device", "cpu")  # decode and resume logic, compared bit for bit: the CPU path
    return ExtractOptions(batch_size=8, workers=0, shard_rows=16, progress=False,
                          load=LoadOptions(pretrained=False), **kw)


def _fail_on_call(monkeypatch, cls, method: str, n: int, error: BaseException) -> None:
    """Make `cls.method` raise `error` on its n-th call; the other calls work as before."""
    real, calls = getattr(cls, method), []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, method, failing)


@pytest.mark.parametrize("where, error", [
    ("prepare", RuntimeError("the store broke")),
    ("forward", RuntimeError("model forward failed")),
    ("forward", KeyboardInterrupt()),
], ids=["prepare-error", "forward-error", "forward-ctrl-c"])
def test_a_failed_extraction_releases_its_locks(manifest_csv, tmp_path, monkeypatch, where, error):
    """A Python caller whose extract() raised (a bug, a model error, Ctrl-C) can call it again at
    once: the store's writer locks are not held by the failed call. Its traceback is kept alive
    here, as a notebook keeps `sys.last_traceback`, so nothing is freed by garbage collection."""
    table = load_dataset("manifest", manifest_csv)
    path = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        cls, n = (FeatureStore, 1) if where == "prepare" else (DeviceModel, 4)  # the 4th batch
        _fail_on_call(m, cls, where, n, error)
        with pytest.raises(type(error)) as failed:
            extract(table, path, ["timm:test_vit"], _opts())
    assert failed.value is error
    summary = extract(table, path, ["timm:test_vit"], _opts())  # not refused as "another fgembed job"
    info = FeatureStore.open(path).backbone_info("timm:test_vit")
    assert info.complete and info.rows_done == len(table)
    assert summary.processed == (len(table) if where == "prepare" else len(table) - 16)  # shard 0 was kept


def test_strict_and_the_summary_see_every_backbone(manifest_csv, tmp_path, monkeypatch):
    """A row only the second backbone flags (its embedding overflows) is reported, and fails --strict."""
    table = load_dataset("manifest", manifest_csv)
    real = engine.load_backbone

    def second_overflows(name, options, *placement, **kw):
        backbone = real(name, options, *placement, **kw)
        if name == "timm:test_resnet":
            own, calls = backbone.own, []

            def overflowing(x):
                out = own(x)
                calls.append(1)
                if len(calls) == 1:  # the first batch: rows 0..7; row 0 goes past float16
                    out = out.clone()
                    out[0] = 1e6
                return out
            backbone.own = overflowing
        return backbone

    monkeypatch.setattr(engine, "load_backbone", second_overflows)
    path = tmp_path / "s.zarr"
    summary = extract(table, path, ["timm:test_vit", "timm:test_resnet"], _opts())
    assert summary.failures == [(int(table.ids[0]), table.paths[0], "non-finite-embedding (timm:test_resnet)")]
    store = FeatureStore.open(path)
    assert store.failures("timm:test_vit") == [] and len(store.failures("timm:test_resnet")) == 1
    assert np.isnan(store.features("timm:test_resnet")[0]).all()
    with pytest.raises(FgembedError, match=r"--strict: 1 of 60 images failed .*non-finite-embedding "
                                           r"\(timm:test_resnet\)") as strict:
        extract(table, path, ["timm:test_vit", "timm:test_resnet"], _opts(strict=True))
    assert strict.value.exit_code == 1


DRIVER = """
import os, sys
import fgembed.devices, fgembed.store

where, rank = sys.argv[1].split(":")
if os.environ["RANK"] == rank:
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected: {where} broke")
    owner = {"prepare": fgembed.store.FeatureStore, "open": fgembed.store.FeatureStore,
             "forward": fgembed.devices.DeviceModel}[where]
    setattr(owner, where, broken)
import torch.distributed as dist
from fgembed.cli.main import main
try:
    code = main(sys.argv[2:])
finally:  # on stdout: stderr's last line is the one the user reads
    print(f"process group left: {not dist.is_initialized()}")
sys.exit(code)
"""


@pytest.mark.slow  # two processes (two ranks) per case, 7–15 s on two busy cores
@pytest.mark.parametrize("where, rank, stage", [("prepare", 0, "preparing the store"), ("open", 1, "opening the store"),
                                                ("forward", 1, "extracting")])
def test_a_rank_that_fails_is_one_line_on_the_others(manifest_csv, tmp_path, where, rank, stage):
    """Two ranks as torchrun starts them (gloo). When one raises a bug's exception, the other does
    not wait on a collective for it nor die in gloo's own traceback: it prints one line naming the
    rank and the error and exits 1; both leave the process group the engine made; no group is
    marked complete, and a rerun resumes."""
    (tmp_path / "driver.py").write_text(DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    store = tmp_path / "s.zarr"
    args = [sys.executable, str(tmp_path / "driver.py"), f"{where}:{rank}", "extract", "--dataset", "manifest",
            "--root", str(manifest_csv), "--backbone", "timm:test_vit", "--no-pretrained", "--workers", "0",
            "--batch-size", "8", "--shard-rows", "16", "--quiet", "--store", str(store)]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        results = [p.communicate(timeout=240) for p in procs]  # a hang fails here, not after gloo's 30 min
    finally:
        for p in procs:
            p.kill()
    failed, other = procs[rank], procs[1 - rank]
    assert failed.returncode != 0 and f"RuntimeError: injected: {where} broke" in results[rank][1]
    last = results[1 - rank][1].strip().splitlines()[-1]
    assert last == f"error: rank {rank} failed while {stage} (RuntimeError: injected: {where} broke); see its " \
                   "output above", results[1 - rank][1][-2000:]
    assert other.returncode == 1
    assert [out.splitlines()[-1] for out, _ in results] == ["process group left: True"] * 2
    if where == "forward":
        assert not FeatureStore.open(store).backbone_info("timm:test_vit").complete
    summary = extract(load_dataset("manifest", manifest_csv), store, ["timm:test_vit"], _opts())  # locks free
    assert FeatureStore.open(store).backbone_info("timm:test_vit").complete
    assert summary.processed == (60 if where != "forward" else 60 - 32)  # after a forward failure rank 0 kept two shards


def test_a_process_group_the_caller_made_is_left_to_the_caller(tmp_path, monkeypatch):
    """The engine destroys only the process group it created: a torchrun script that set up its
    own group before calling extract() still has it afterwards."""
    import torch
    import torch.distributed as dist

    from fgembed.extraction._ranks import process_group

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # what the engine sees under torchrun: a group is needed, and there
        with process_group(torch.device("cpu")) as (rank, world):
            assert (rank, world) == (0, 2) and dist.is_initialized()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
