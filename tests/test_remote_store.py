"""Feature stores at fsspec URLs: a real S3 API (moto's server, through s3fs), memory:// and a
plain HTTP server, with the real extraction engine and tiny timm models.

Kills are real SIGKILLs of forkserver children running `extract` (as tests/test_faults.py does
for local stores); after each, the same extraction finishes the store, which must equal the same
extraction on local disk bit for bit. The children are given the AWS environment explicitly: the
forkserver may have been started (by another module) before the moto fixture set it.
"""
from __future__ import annotations

import functools
import http.server
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from fgembed.backbones import LoadOptions
from fgembed.datasets import load_dataset
from fgembed.errors import FgembedError
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.images import UNREADABLE
from fgembed.leases import Lease
from fgembed.storage import locate, parse_storage_options
from fgembed.store import FeatureStore
from fgembed.synthetic import generate, write_manifest

KILLS = int(os.environ.get("FGEMBED_STRESS_KILLS", "2"))  # kill -9s in the kill test; `make stress` sets more
BACKBONES = ["timm:test_vit", "timm:test_resnet"]


def _opts() -> ExtractOptions:
    return ExtractOptions(batch_size=4, workers=0, shard_rows=4, progress=False, device="cpu",
                          load=LoadOptions(pretrained=False))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote") / "images"
    return write_manifest(root, generate(root, groups=1, classes_per_group=2, per_class=8, size=(40, 32)))


def _table(csv: Path):
    return load_dataset("manifest", csv, val_fraction=0.25)


@pytest.fixture(scope="module")
def local_reference(manifest, tmp_path_factory) -> FeatureStore:
    """The same extraction on local disk: what every remote store must equal."""
    path = tmp_path_factory.mktemp("reference") / "local.zarr"
    extract(_table(manifest), path, BACKBONES, _opts())
    return FeatureStore.open(path)


def _assert_same(store: FeatureStore, reference: FeatureStore, names=BACKBONES) -> None:
    assert store.backbones() == sorted(names)
    np.testing.assert_array_equal(store.sample_ids(), reference.sample_ids())
    np.testing.assert_array_equal(store.split_codes(), reference.split_codes())
    for name in names:
        a, b = store.embeddings(name), reference.embeddings(name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name  # bit-identical
        np.testing.assert_array_equal(store.status(name), reference.status(name))
        info, ref = store.backbone_info(name), reference.backbone_info(name)
        assert info.complete and info.rows_done == store.n_rows and info.fingerprint == ref.fingerprint


def _objects(url: str) -> list[str]:
    fs, root = fsspec.url_to_fs(url)
    return [p[len(root) + 1:] for p in fs.find(root)]


# ---- children: the real engine in a killable process ---------------------------------------


def _extract_child(env: dict, csv: str, url: str, names: list[str], log: str) -> None:
    """A forkserver child: one extraction; a refusal is one line on its stderr and exit 2."""
    os.environ.update(env)
    with open(log, "w") as err:
        try:
            extract(_table(Path(csv)), url, names, _opts())
        except FgembedError as exc:
            err.write(f"error: {exc}\n")
            err.flush()
            os._exit(2)
    os._exit(0)


@pytest.fixture(scope="module")
def ctx():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fgembed.extraction.extract", "timm", "s3fs", __name__])
    warm = context.Process(target=os._exit, args=(0,))  # start the server (its imports) now, not inside a
    warm.start()                                        # timed run
    warm.join()
    return context


def _start(ctx, env, csv, url, names, log):
    proc = ctx.Process(target=_extract_child, args=(env, str(csv), url, names, str(log)))
    proc.start()
    return proc


def _kill(proc) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished before the kill
    proc.join()


# ---- S3 (moto server) -------------------------------------------------------------------------


@pytest.mark.slow  # ~20 s on two busy cores: each kill and resume builds two models; `make stress` kills more
def test_s3_extraction_killed_and_resumed_equals_local_disk(ctx, s3_endpoint, s3_url, manifest, local_reference,
                                                            tmp_path):
    """kill -9 anywhere in an extraction of two backbones into s3://, then the same extraction:
    the store equals the same extraction on local disk, and no lease object is left behind."""
    began = time.perf_counter()
    proc = _start(ctx, s3_endpoint, manifest, s3_url, BACKBONES, tmp_path / "clean.log")
    proc.join()
    assert proc.exitcode == 0, (tmp_path / "clean.log").read_text()
    duration = time.perf_counter() - began
    _assert_same(FeatureStore.open(s3_url), local_reference)
    rng = random.Random(0)
    for i in range(KILLS):
        url = s3_url.replace("store.zarr", f"killed{i}.zarr")
        for _ in range(1 + i % 2):  # odd iterations kill twice: the second kill lands in a resume
            proc = _start(ctx, s3_endpoint, manifest, url, BACKBONES, tmp_path / "kill.log")
            time.sleep(rng.uniform(0.3, duration))
            _kill(proc)
            try:  # a killed store opens, or says in one line why it cannot
                FeatureStore.open(url).backbones()
            except FgembedError as exc:
                assert "interrupted" in str(exc) or "no feature store" in str(exc), exc
        extract(_table(manifest), url, BACKBONES, _opts())  # the same command, in-process
        _assert_same(FeatureStore.open(url), local_reference)
        assert not [o for o in _objects(url) if o.startswith(".fgembed/")], _objects(url)


def test_s3_two_writers_of_one_backbone(ctx, s3_endpoint, s3_url, manifest, local_reference, tmp_path):
    """A held lease refuses a second writer in one line at once; two racing writers of one
    backbone: one refused in one line, or both finish (the second found nothing left)."""
    holder = FeatureStore.create(s3_url, _table(manifest), names=["timm:test_resnet"])
    with pytest.raises(FgembedError) as refused:
        extract(_table(manifest), s3_url, ["timm:test_resnet"], _opts())
    message = str(refused.value)
    assert "\n" not in message and f"pid {os.getpid()} on" in message and "writing features 'timm:test_resnet'" in message
    holder.release()
    procs = [_start(ctx, s3_endpoint, manifest, s3_url, ["timm:test_resnet"], tmp_path / f"w{k}.log") for k in range(2)]
    for p in procs:
        p.join()
    logs = [(tmp_path / f"w{k}.log").read_text().strip() for k in range(2)]
    assert sorted(p.exitcode for p in procs) in ([0, 0], [0, 2]), logs
    for p, log in zip(procs, logs):
        if p.exitcode == 2:
            assert log.count("\n") == 0 and "another fgembed job" in log, log
    _assert_same(FeatureStore.open(s3_url), local_reference, ["timm:test_resnet"])


def test_s3_writers_of_two_backbones_at_once_both_finish(ctx, s3_endpoint, s3_url, manifest, local_reference,
                                                         tmp_path):
    procs = [_start(ctx, s3_endpoint, manifest, s3_url, [name], tmp_path / f"{k}.log")
             for k, name in enumerate(BACKBONES)]
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0], [(tmp_path / f"{k}.log").read_text() for k in range(2)]
    _assert_same(FeatureStore.open(s3_url), local_reference)


def test_s3_errors_are_one_line(s3_endpoint, manifest):
    with pytest.raises(FgembedError, match=r"^no feature store at s3://fgembed-test/none\.zarr$"):
        FeatureStore.open("s3://fgembed-test/none.zarr")
    with pytest.raises(FgembedError) as missing:
        FeatureStore.create("s3://no-such-bucket-fgembed/s.zarr", _table(manifest))
    assert "\n" not in str(missing.value) and "bucket does not exist" in str(missing.value)
    with pytest.raises(FgembedError, match="unknown storage protocol 'nope'"):
        FeatureStore.open("nope://x/s.zarr")
    with pytest.raises(FgembedError, match="has no effect on a local --store"):
        FeatureStore.open("local.zarr", storage_options={"anon": True})


# ---- memory:// and http:// ------------------------------------------------------------------


def test_memory_store_in_process(manifest, local_reference):
    url = "memory://fgembed-tests/extract.zarr"
    summary = extract(_table(manifest), url, BACKBONES, _opts())
    assert summary.store == url and summary.processed == 16
    store = FeatureStore.open(url)
    _assert_same(store, local_reference)
    assert store.url == url and store.path == url
    again = extract(_table(manifest), url, BACKBONES, _opts())  # everything done: nothing to redo
    assert again.processed == 0 and again.skipped_shards == store.n_shards


def test_http_store_is_read_only(local_reference, tmp_path):
    """A store served by a plain HTTP server reads like the local one; writing is refused in one line."""
    folder = Path(local_reference.location).parent
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/local.zarr"
        store = FeatureStore.open(url)
        _assert_same(store, local_reference)
        np.testing.assert_array_equal(store.features(BACKBONES[0], "test"), local_reference.features(BACKBONES[0], "test"))
        for attempt in (lambda: FeatureStore.open(url, "r+"), lambda: store.record_backbone_attrs(BACKBONES[0], cost={})):
            with pytest.raises(FgembedError, match="can only be read"):
                attempt()
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# ---- leases ---------------------------------------------------------------------------------------


def _entry(storage, node: str, number: int, **holder) -> None:
    record = {"token": "t", "host": "elsewhere", "boot": "b", "pid": 1, "started": None, "renewed": time.time(),
              "seconds": 60.0, **holder}
    storage.put(f"{node}/{number:010d}", json.dumps(record).encode())


def test_leases_refuse_a_live_holder_and_take_over_a_gone_one():
    storage = locate("memory://fgembed-tests/leases.zarr")
    node = ".fgembed/locks/features-a"
    _entry(storage, node, 0)  # renewed just now on another machine: alive
    lease = Lease(storage, node)
    assert not lease.acquire(wait=False) and lease.holder["host"] == "elsewhere"
    _entry(storage, node, 0, renewed=time.time() - 61)  # not renewed within its 60 s: gone
    assert lease.acquire(wait=False) and lease.entry == 1
    assert storage.list_files(node) == ["0000000001"]  # the gone holder's entry is cleared
    lease.release()
    assert storage.list_files(node) == []
    child = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    import socket

    from fgembed.leases import _boot_id
    _entry(storage, node, 4, host=socket.gethostname(), boot=_boot_id(), pid=child.pid)  # killed here: gone at once
    assert lease.acquire(wait=False) and lease.entry == 5
    lease.release()


def test_a_lease_taken_over_is_lost_and_stops_the_writer(manifest):
    """A stalled writer whose lease another job took over stops before its next shard."""
    url = "memory://fgembed-tests/lost.zarr"
    store = FeatureStore.create(url, _table(manifest), shard_rows=4)
    store.prepare("a", {"source": "t"}, 2, "float32")
    lease = Lease(store.storage, ".fgembed/locks/features-a", seconds=0.2)
    assert lease.acquire(wait=False)
    store._locks["a"] = lease  # as lock_features would, with a short heartbeat
    store.write_shard("a", 0, np.ones((4, 2)), np.zeros(4, np.uint8))
    _entry(store.storage, lease.node, lease.entry + 1)  # another job took over
    time.sleep(0.4)  # a heartbeat or two
    with pytest.raises(FgembedError, match="lost the writer lease .*features-a.*rerun the same command"):
        store.write_shard("a", 1, np.ones((4, 2)), np.zeros(4, np.uint8))
    assert store.pending_shards("a") == [1, 2, 3]
    store.release()


# ---- set-up on object storage ----------------------------------------------------------------------


def test_object_store_setup_interrupted_is_finished_by_the_next_writer(manifest, tmp_path):
    """Object storage cannot rename: a node is written in place, its mark last. An unmarked
    samples/ reads as an interrupted set-up; groups recorded for other rows beside it are not
    paired with new rows."""
    url = "memory://fgembed-tests/setup.zarr"
    table = _table(manifest)
    store = FeatureStore.create(url, table, shard_rows=4)
    store.prepare("a", {"source": "t"}, 2, "float32")
    fs, root = fsspec.url_to_fs(url)
    attrs = json.loads(fs.cat_file(f"{root}/samples/zarr.json"))
    del attrs["attributes"]["manifest_sha256"]  # killed before samples/ got its mark
    fs.pipe_file(f"{root}/samples/zarr.json", json.dumps(attrs).encode())
    with pytest.raises(FgembedError, match="setup was interrupted"):
        FeatureStore.open(url)
    other = tmp_path / "other"
    write_manifest(other, generate(other, groups=1, classes_per_group=2, per_class=5, size=(24, 24)))
    with pytest.raises(FgembedError, match=r"features of other images \(a\) beside an interrupted set-up"):
        FeatureStore.create(url, _table(other / "manifest.csv"))
    store = FeatureStore.create(url, table)  # the same rows: the group stays valid
    assert store.backbones() == ["a"] and store.table().sha256() == table.sha256()
    store = FeatureStore.create(url, _table(other / "manifest.csv"), overwrite=True, names=["a"])
    assert store.n_rows == 10 and store.backbones() == []


def test_parse_storage_options():
    assert parse_storage_options(["endpoint_url=http://h:9000", "anon=true", "client_kwargs.region_name=eu",
                                  "client_kwargs.verify=false", "default_block_size=1024"]) == {
        "endpoint_url": "http://h:9000", "anon": True, "client_kwargs": {"region_name": "eu", "verify": False},
        "default_block_size": 1024}
    for bad, why in (("anon", "expected KEY=VALUE"), ("=x", "expected KEY=VALUE"), ("a..b=1", "expected KEY=VALUE")):
        with pytest.raises(FgembedError, match=why):
            parse_storage_options([bad])
    with pytest.raises(FgembedError, match="anon is given twice"):
        parse_storage_options(["anon=true", "anon=false"])


# ---- sharding: object counts, and stores written before it ------------------------------------------


def _store_objects(n_rows: int, shard_rows: int, backbones: int, sample_arrays: int, samples_shard: int) -> int:
    """Objects (files) of a finished store: metadata documents (root, samples/ and its arrays,
    features/, each group and its three arrays), one object per samples/ shard of each of its
    arrays, one per shard of each backbone's emb, done and status."""
    metadata = 1 + 1 + sample_arrays + 1 + 4 * backbones
    return metadata + sample_arrays * -(-n_rows // samples_shard) + 3 * backbones * -(-n_rows // shard_rows)


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file() and ".fgembed" not in p.parts]


def _write_legacy_store(path: Path, table, shard_rows: int = 256) -> None:
    """The layout fgembed wrote before sharding: every array chunked by `shard_rows` rows, one
    file per chunk, no sharding codec (what main's `_store_setup.stage_samples` and
    `FeatureStore._build_group` made)."""
    from fgembed.datasets.identity import file_identity

    identity, n = file_identity(table), len(table)
    samples = zarr.open_group(path / "samples", mode="w")
    columns = {"id": (table.ids, "int64"), "label": (table.labels, "int32"), "split": (table.split, "uint8"),
               "path": (np.array(table.paths, dtype=object), str),
               **{k: (v.codes, "int32") for k, v in table.levels.items()},
               "file_size": (identity.sizes, "int64"), "file_mtime_ns": (identity.mtimes_ns, "int64")}
    for name, (values, dtype) in columns.items():
        samples.create_array(name, shape=(n,), chunks=(shard_rows,), dtype=dtype)[:] = values
    samples.attrs.update({"kind": table.kind, "root": table.root, "class_names": table.class_names,
                          "levels": {k: v.names for k, v in table.levels.items()},
                          "split_codes": {"train": 0, "val": 1, "test": 2}, "split_recipe": table.split_recipe,
                          "provenance": table.provenance, "manifest_sha256": table.sha256(),
                          "identity": identity.attrs(), "shard_rows": shard_rows, "fgembed_version": "0.1.0"})
    zarr.open_group(path / "features", mode="w")
    zarr.create_group(path, attributes={"format": "fgembed-store", "version": 2})


def _legacy_group(path: Path, name: str, dim: int, shard_rows: int, n: int) -> zarr.Group:
    group = zarr.open_group(path / "features" / name, mode="w")
    group.create_array("emb", shape=(n, dim), chunks=(shard_rows, dim), dtype="float32", fill_value=np.nan)
    group.create_array("done", shape=(n,), chunks=(shard_rows,), dtype="bool", fill_value=False)
    group.create_array("status", shape=(n,), chunks=(shard_rows,), dtype="uint8", fill_value=0)
    group.attrs.update({"name": name, "dim": dim, "dtype": "float32", "fingerprint": {"source": "t", "member": name},
                        "recorded": {}, "fingerprint_schema": 2, "complete": False})
    return group


def _fill(store: FeatureStore, name: str, emb: np.ndarray, shards) -> None:
    for shard in shards:
        rows = store.shard_slice(shard)
        status = np.zeros(rows.stop - rows.start, np.uint8)
        status[0] = UNREADABLE  # one flagged row per shard: every status shard is an object too
        store.write_shard(name, shard, emb[rows], status)


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory) -> Path:
    """3000 rows whose images need not exist (features are written directly)."""
    csv = tmp_path_factory.mktemp("big") / "manifest.csv"
    csv.write_text("path,label,split\n" + "".join(f"x/{i}.jpg,c{i % 5},{'test' if i % 4 == 0 else 'train'}\n"
                                                  for i in range(3000)))
    return csv


def test_object_counts_sharded_vs_unsharded(big_manifest, tmp_path):
    """The formula counts both layouts exactly at a small shape, and gives ≤ 1,000 objects at
    iNat-2021 shape (train_mini + val: 600k rows, five backbones, 7 taxonomy levels)."""
    from fgembed._store_setup import auto_shard_rows, samples_shard_rows

    table = load_dataset("manifest", big_manifest, val_fraction=0.0)
    n, emb = len(table), np.random.default_rng(0).normal(size=(len(table), 8))
    legacy = tmp_path / "legacy.zarr"
    _write_legacy_store(legacy, table)
    for name in ("a", "b"):
        _legacy_group(legacy, name, 8, 256, n)
    store = FeatureStore.open(legacy, "r+")
    for name in ("a", "b"):
        _fill(store, name, emb, range(store.n_shards))
    sharded = FeatureStore.create(tmp_path / "sharded.zarr", table, shard_rows=1024)
    for name in ("a", "b"):
        sharded.prepare(name, {"source": "t", "member": name}, 8, "float32")
        _fill(sharded, name, emb, range(sharded.n_shards))
    arrays = 6  # id, label, split, path, file_size, file_mtime_ns (a manifest has no levels)
    assert len(_files(legacy)) == _store_objects(n, 256, 2, arrays, 256) == 1 + 1 + 6 + 1 + 8 + 6 * 12 + 6 * 12
    assert len(_files(sharded.path)) == _store_objects(n, 1024, 2, arrays, samples_shard_rows(n, 1024)) == 17 + 6 + 6 * 3
    kept = np.arange(n) % 256 != 0  # rows neither layout flagged: the same values either way
    np.testing.assert_array_equal(sharded.embeddings("a")[kept], store.embeddings("a")[kept])
    inat = 600_000
    shard = auto_shard_rows(inat)
    assert shard == 16384 and shard % 4 == 0
    assert _store_objects(inat, shard, 5, 4 + 7 + 2, samples_shard_rows(inat, shard)) <= 1000
    assert _store_objects(inat, 256, 5, 13, 256) > 50_000  # the unsharded layout at that shape


def test_a_store_written_before_sharding_opens_and_resumes(manifest, tmp_path):
    """Unsharded 256-row-chunk stores (here 4-row chunks) open, resume where they stopped, and
    take new groups with the same resume unit."""
    table = _table(manifest)
    path = tmp_path / "old.zarr"
    _write_legacy_store(path, table, shard_rows=4)
    _legacy_group(path, "a", 3, 4, len(table))
    emb = np.random.default_rng(1).normal(size=(len(table), 3)).astype(np.float32)
    old = FeatureStore.open(path, "r+")
    _fill(old, "a", emb, [0, 2])  # an interrupted extraction: shards 0 and 2 done
    store = FeatureStore.create(path, table, names=["a", "b"])  # resume: same dataset, nothing rewritten
    assert store.shard_rows == 4 and store.pending_shards("a") == [1, 3]
    store.prepare("a", {"source": "t", "member": "a"}, 3, "float32")
    _fill(store, "a", emb, store.pending_shards("a"))
    store.prepare("b", {"source": "t", "member": "b"}, 3, "float32")
    _fill(store, "b", emb, range(store.n_shards))
    store.release()
    reread = FeatureStore.open(path)
    flagged = np.arange(len(table)) % 4 == 0
    for name in ("a", "b"):
        got = reread.embeddings(name)
        np.testing.assert_array_equal(got[~flagged], emb[~flagged])
        assert np.isnan(got[flagged]).all() and reread.backbone_info(name).rows_done == len(table)
    plain = zarr.open_group(path, mode="r")
    assert plain["features/a/emb"].shards is None and plain["features/b/emb"].shards == (4, 3)
    assert plain["samples/id"].chunks == (4,)
