"""Feature stores off local disk: how many objects a store is, and how fast a view reads from S3.

  objects  A store at iNat-2021 shape (train_mini + val: 600,000 rows; the five reference members
           of 768 / 1024 / 1024 / 1280 / 1536 dims, float16) built through `fgembed import`, file
           by file, against the layout fgembed wrote before sharding (every array chunked by 256
           rows, one object per chunk; written here with zarr directly, as the baseline). Counted:
           the store's files, its writer-lease folder excluded. The feature values are cheap
           deterministic patterns: what is counted does not depend on them.
  view     A five-member float16 view (`build_view`, concat: every member's rows of every split
           read and stacked) from a store on local disk and from the same store in S3 — moto's
           standalone server on a localhost port, in its own process, reached through
           `--storage-option endpoint_url=…` — side by side in one run. Each candidate runs in a
           fresh child process: one untimed build (imports, the first connection), then
           `--repeats` timed builds, min and median, the read rate in MB/s of float16 rows, and
           the child's peak RSS. Target: S3 ≥ 0.5 × the local rate over loopback.

Usage: python benchmarks/remote.py [--cases objects,view] [--rows 600000] [--view-rows 40000]
       [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

DIMS = (768, 1024, 1024, 1280, 1536)
MEMBERS = tuple(f"m{i}" for i in range(len(DIMS)))
LEGACY_CHUNK_ROWS = 256
FGEMBED = [sys.executable, "-m", "fgembed"]


# ---- building stores through `fgembed import` ----------------------------------------------------
def write_manifest(path: Path, n: int, classes: int) -> Path:
    """`n` rows of a manifest whose image files need not exist (features are imported, not extracted):
    60 % train, 20 % val, 20 % test."""
    split = np.where(np.arange(n) % 5 < 3, "train", np.where(np.arange(n) % 5 == 3, "val", "test"))
    with path.open("w") as f:
        f.write("path,label,split\n")
        f.writelines(f"img/{i}.jpg,c{i % classes},{split[i]}\n" for i in range(n))
    return path


def write_member(path: Path, n: int, dim: int, seed: int) -> Path:
    """A float16 [n, dim] .npy: a noisy class signal for views, written in blocks (bounded memory)."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, 32768):
        rows = np.arange(start, min(start + 32768, n))
        block = rng.standard_normal((len(rows), dim), dtype=np.float32)
        block[:, :8] += (rows % 97)[:, None] / 10  # class-correlated columns: a view a head can learn
        out[rows] = block
    out.flush()
    return path


def import_all(store: str, manifest: Path, sources: list[Path], extra: list[str] = ()) -> float:
    """Import every member into `store` with the `fgembed import` command; seconds taken."""
    started = time.perf_counter()
    for k, (name, source) in enumerate(zip(MEMBERS, sources)):
        new = ["--dataset", "manifest", "--root", str(manifest), "--val-fraction", "0"] if k == 0 else []
        proc = subprocess.run([*FGEMBED, "import", str(source), "--store", store, "--name", name, *new, *extra,
                               "--quiet"], capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"fgembed import {name} into {store} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def write_legacy(path: Path, manifest: Path, sources: list[Path]) -> None:
    """The layout fgembed wrote before sharding, as the baseline: samples/ columns and each member's
    emb / done / status, every array chunked by 256 rows, one object per chunk."""
    import zarr

    path.mkdir()
    n = sum(1 for _ in manifest.open()) - 1
    chunks = (LEGACY_CHUNK_ROWS,)
    samples = zarr.open_group(path / "samples", mode="w")
    for name, dtype in (("id", "int64"), ("label", "int32"), ("split", "uint8"), ("file_size", "int64"),
                        ("file_mtime_ns", "int64")):
        samples.create_array(name, shape=(n,), chunks=chunks, dtype=dtype)[:] = np.arange(n) % 200 + 1
    samples.create_array("path", shape=(n,), chunks=chunks, dtype=str)[:] = np.array(
        [f"img/{i}.jpg" for i in range(n)], dtype=object)
    for name, source in zip(MEMBERS, sources):
        matrix = np.load(source, mmap_mode="r")
        group = zarr.open_group(path / "features" / name, mode="w")
        emb = group.create_array("emb", shape=matrix.shape, chunks=(LEGACY_CHUNK_ROWS, matrix.shape[1]),
                                 dtype="float16", fill_value=np.nan)
        for start in range(0, n, 32768):
            emb[start:start + 32768] = matrix[start:start + 32768]
        group.create_array("done", shape=(n,), chunks=chunks, dtype="bool", fill_value=False)[:] = True
        group.create_array("status", shape=(n,), chunks=chunks, dtype="uint8", fill_value=0)[:] = \
            (np.arange(n) % LEGACY_CHUNK_ROWS == 0).astype(np.uint8)  # a flagged row per chunk: every chunk an object
    zarr.open_group(path / "features", mode="a")
    zarr.create_group(path, attributes={"format": "fgembed-store", "version": 2})


def count_objects(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file() and ".fgembed" not in p.relative_to(path).parts)


def case_objects(work: Path, rows: int) -> dict:
    manifest = write_manifest(work / "manifest.csv", rows, 10_000)
    sources = [write_member(work / f"{name}.npy", rows, dim, seed) for seed, (name, dim) in enumerate(zip(MEMBERS, DIMS))]
    seconds = import_all(str(work / "sharded.zarr"), manifest, sources)
    write_legacy(work / "legacy.zarr", manifest, sources)
    for source in sources:
        source.unlink()
    return {"rows": rows, "sharded": count_objects(work / "sharded.zarr"), "legacy": count_objects(work / "legacy.zarr"),
            "import_seconds": round(seconds, 1)}


# ---- the view from S3 and from local disk ---------------------------------------------------------
def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server in its own process (not a thread of the timed child's)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        sys.exit("moto_server did not start")
    return server, endpoint


def child(spec: dict) -> dict:
    """Build the concat view of every member `repeats` times after one untimed build."""
    from fgembed.classify.views import ViewConfig, build_view
    from fgembed.store import FeatureStore

    store = FeatureStore.open(spec["store"], storage_options=spec["options"] or None)
    config = ViewConfig(features=MEMBERS, fusion="concat")
    build_view(store, config)  # warm-up: imports, the first connection, BLAS threads
    times = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        view = build_view(store, config)
        times.append(time.perf_counter() - started)
        del view
    return {"times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(spec: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False, env=env)
    if proc.returncode:
        sys.exit(f"child {spec['store']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case_view(work: Path, rows: int, repeats: int) -> dict:
    manifest = write_manifest(work / "view.csv", rows, 200)
    sources = [write_member(work / f"v{name}.npy", rows, dim, 10 + seed)
               for seed, (name, dim) in enumerate(zip(MEMBERS, DIMS))]
    import_all(str(work / "view.zarr"), manifest, sources)
    server, endpoint = start_moto()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("AWS_ENDPOINT_URL", None)  # the endpoint comes only as a storage option
    try:
        import fsspec

        fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing").mkdir("bench")
        url = f"s3://bench/{uuid.uuid4().hex[:8]}/view.zarr"
        option = ["--storage-option", f"endpoint_url={endpoint}"]
        saved_env = dict(os.environ)
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        try:
            import_all(url, manifest, sources, option)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
        megabytes = sum(rows * d * 2 for d in DIMS) / 1e6
        results = {}
        for name, store, options in (("local disk", str(work / "view.zarr"), {}),
                                     ("S3 (moto, loopback)", url, {"endpoint_url": endpoint})):
            r = run_child({"store": store, "options": options, "repeats": repeats}, env)
            results[name] = r | {"mb_per_s": megabytes / min(r["times"])}
    finally:
        server.kill()
        server.wait()
        for source in sources:
            source.unlink(missing_ok=True)
    return {"rows": rows, "megabytes": megabytes, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--cases", default="objects,view")
    parser.add_argument("--rows", type=int, default=600_000, help="rows of the object-count store (iNat: 600,000)")
    parser.add_argument("--view-rows", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="fgembed-remote-") as tmp:
        work = Path(tmp)
        if "objects" in cases:
            r = case_objects(work, args.rows)
            print(f"\nobjects at {r['rows']:,} rows × five members ({'/'.join(map(str, DIMS))} dims), float16:")
            print(f"  before sharding (256-row chunks): {r['legacy']:>7,}")
            print(f"  fgembed import (sharded):         {r['sharded']:>7,}   ({r['legacy'] / r['sharded']:.0f}× fewer; "
                  f"import took {r['import_seconds']} s)")
        if "view" in cases:
            r = case_view(work, args.view_rows, args.repeats)
            print(f"\nfive-member float16 concat view, {r['rows']:,} rows ({r['megabytes']:.0f} MB of rows), "
                  f"{args.repeats} timed builds each:")
            print(f"  {'store':<22}{'min s':>8}{'median s':>10}{'MB/s':>8}{'peak RSS MB':>13}")
            for name, x in r["results"].items():
                print(f"  {name:<22}{min(x['times']):>8.2f}{statistics.median(x['times']):>10.2f}"
                      f"{x['mb_per_s']:>8.0f}{x['peak_rss_mb']:>13.0f}")
            local, s3 = r["results"].values()
            print(f"  S3 / local read rate: {s3['mb_per_s'] / local['mb_per_s']:.2f}× (target ≥ 0.5×)")


if __name__ == "__main__":
    main()
