"""Fault injection: kill -9 at random moments, a full disk, concurrent writers, hostile inputs.

Every kill is a real SIGKILL of a real process running the `fgembed` command (children of a
multiprocessing forkserver that has imported fgembed once, so a child starts in milliseconds and
the kill lands in the command's own work: store setup or shard writes, not interpreter start).
After each kill, the store must open, and the same command, rerun, must leave exactly the store
an uninterrupted run makes. `make stress` runs the same tests with many more iterations
(FGEMBED_STRESS_KILLS) and writes the figures to FGEMBED_FAULTS_REPORT; tests/README.md has them.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr
from fgembed.cli.main import app, main
from PIL import Image
from typer.testing import CliRunner

from fgembed.errors import FgembedError
from fgembed.images import FAILED, OK, REFUSED_SIZE, TRUNCATED, UNREADABLE, load_rgb
from fgembed.locks import FileLock, lock_dir
from fgembed.synthetic import generate, write_manifest

KILLS = int(os.environ.get("FGEMBED_STRESS_KILLS", "4"))  # per kill test; `make stress` sets hundreds
FIGURES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if os.environ.get("FGEMBED_FAULTS_REPORT"):
        Path(os.environ["FGEMBED_FAULTS_REPORT"]).write_text(json.dumps(dict(FIGURES), indent=2) + "\n")


def _child(argv: list[str], log: str) -> None:
    """A forkserver child: one `fgembed` command, its stderr to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os._exit(main(argv))


@pytest.fixture(scope="module")
def ctx():
    context = multiprocessing.get_context("forkserver")
    # this module too: a child then unpickles `_child` from the server's copy, never re-imports it
    context.set_forkserver_preload(["fgembed.cli.main", "fgembed.extraction.interchange", "fgembed.extraction.extract", "timm", __name__])
    warm = context.Process(target=_child, args=(["--help"], os.devnull))  # start the server (imports) now,
    warm.start()                                                          # not inside a timed run
    warm.join()
    return context


def _kill(proc) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished before the kill
        pass
    proc.join()


def _start(ctx, argv, log):
    proc = ctx.Process(target=_child, args=([str(a) for a in argv], str(log)))
    proc.start()
    return proc


def _timed(ctx, argv, log) -> float:
    began = time.perf_counter()
    proc = _start(ctx, argv, log)
    proc.join()
    assert proc.exitcode == 0, Path(log).read_text()
    return time.perf_counter() - began


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A manifest of 16 small images and a 4000-row one whose images need not exist (import)."""
    root = tmp_path_factory.mktemp("faults")
    images = root / "images"
    csv = write_manifest(images, generate(images, groups=1, classes_per_group=2, per_class=8, size=(40, 32)))
    big = root / "big" / "manifest.csv"
    big.parent.mkdir()
    big.write_text("path,label,split\n" + "".join(f"x/{i}.jpg,c{i % 5},{'test' if i % 4 == 0 else 'train'}\n"
                                                  for i in range(4000)))
    matrix = np.random.default_rng(0).normal(size=(4000, 256)).astype(np.float32)
    np.save(root / "m.npy", matrix)
    np.save(root / "m2.npy", matrix[:, :16] * 2)
    return {"csv": csv, "big": big, "npy": root / "m.npy", "npy2": root / "m2.npy"}


def _import_argv(dataset, store, name="a", npy="npy"):
    return ["import", dataset[npy], "--store", store, "--name", name, "--dataset", "manifest",
            "--root", dataset["big"], "--quiet"]


def _extract_argv(dataset, store, backbone="timm:test_resnet"):
    return ["extract", "--dataset", "manifest", "--root", dataset["csv"], "--store", store, "--backbone", backbone,
            "--no-pretrained", "--workers", "0", "--batch-size", "4", "--shard-rows", "4", "--val-fraction", "0",
            "--quiet"]


def _snapshot(path: Path) -> dict:
    """Everything a store's reader sees, minus run-dependent records (throughput, host…)."""
    g = zarr.open_group(path, mode="r")
    snap = {f"samples/{k}": a[:] for k, a in g["samples"].arrays()}
    snap["samples.attrs"] = {k: v for k, v in g["samples"].attrs.items() if k != "identity"}
    for d in sorted(d for d in (path / "features").iterdir() if d.is_dir()):
        sub = g["features"][d.name]
        for k in ("emb", "done", "status"):
            snap[f"{d.name}/{k}"] = sub[k][:]
        snap[f"{d.name}.attrs"] = {k: v for k, v in sub.attrs.items()
                                   if k not in ("throughput_images_per_s", "recorded")}
    return snap


def _rows_lost(a: dict, b: dict) -> int:
    """Rows that differ between two snapshots (0 when the stores are the same)."""
    assert a.keys() == b.keys()
    lost = 0
    for k in a:
        if k.endswith(".attrs"):
            assert a[k] == b[k], k
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            same = (x == y) | ((x != x) & (y != y)) if x.dtype.kind == "f" else (x == y)
            lost += int((~same.reshape(len(x), -1).all(1)).sum())
    return lost


def _opens(path: Path) -> None:
    """What every command does first: open the store (or say in one line why it cannot)."""
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exception is None or isinstance(result.exception, FgembedError), result.exception
    message = str(result.exception or "")
    assert result.exception is None or "interrupted" in message or "no feature store" in message


def _clean(path: Path) -> None:
    assert not list(path.rglob("*.partial")), list(path.rglob("*.partial"))
    assert not [d for k in ("staging", "trash") for d in (path / ".fgembed" / k).glob("*")]


def _phase(store: Path) -> str:
    """Where a kill landed, read from what it left."""
    if not (store / "zarr.json").is_file():
        return "store setup"
    groups = [d for d in (store / "features").glob("*") if (d / "done" / "zarr.json").is_file()] \
        if (store / "features").is_dir() else []
    if not groups:
        return "group setup"
    done = [zarr.open_array(d / "done", mode="r")[:] for d in groups]
    if all(d.all() for d in done):
        complete = all(json.loads((d / "zarr.json").read_text())["attributes"]["complete"] for d in groups)
        return "the last steps" if not complete else "the exit"
    return "shard writes"


def _kill_loop(ctx, tmp_path, argv_for, clean, duration, iterations, label):
    rng = random.Random(int(os.environ.get("FGEMBED_STRESS_SEED", "0")))
    for i in range(iterations):
        store = tmp_path / f"{label}{i}.zarr"
        for _ in range(1 + i % 2):  # odd iterations kill twice: the second kill lands in a resume
            proc = _start(ctx, argv_for(store), tmp_path / "kill.log")
            time.sleep(rng.uniform(0, duration))
            _kill(proc)
            FIGURES[f"{label}: kills"] += 1
            FIGURES[f"{label}: kills landing in {_phase(store)}"] += 1
            if store.exists():
                _opens(store)
        _timed(ctx, argv_for(store), tmp_path / "resume.log")
        lost = _rows_lost(_snapshot(store), clean)
        FIGURES["rows lost"] += lost
        assert lost == 0
        _clean(store)
        FIGURES[f"{label}: resumed to the clean store"] += 1
        shutil.rmtree(store)


def test_kill_nine_during_import_then_resume_equals_clean(ctx, dataset, tmp_path):
    """Setup (store, samples, group) and shard writes of `fgembed import`, a second group too."""
    reference = tmp_path / "clean.zarr"
    duration = _timed(ctx, _import_argv(dataset, reference), tmp_path / "clean.log")
    _timed(ctx, _import_argv(dataset, reference, "b", "npy2"), tmp_path / "clean.log")
    clean = _snapshot(reference)

    def both(store):  # kill anywhere in the first import; the second then adds a group to a killed store
        return _import_argv(dataset, store)

    _kill_loop(ctx, tmp_path, both, _snapshot_after(reference, "a"), duration * 0.6, KILLS, "import")
    store = tmp_path / "second.zarr"  # a killed store gets a second group, killed too
    shutil.copytree(reference, store)
    shutil.rmtree(store / "features" / "b")
    second = _import_argv(dataset, store, "b", "npy2")
    proc = _start(ctx, second, tmp_path / "kill.log")
    time.sleep(random.Random(1).uniform(0, duration))
    _kill(proc)
    FIGURES["import: kills"] += 1
    _opens(store)
    assert main([str(a) for a in second]) == 0
    assert _rows_lost(_snapshot(store), clean) == 0


def _snapshot_after(reference: Path, only: str) -> dict:
    snap = _snapshot(reference)
    return {k: v for k, v in snap.items() if k.startswith(("samples", f"{only}/", f"{only}."))}


@pytest.mark.slow  # ~25 s on two busy cores: each kill and resume runs the model; import covers the rest fast
def test_kill_nine_during_extract_then_resume_equals_clean(ctx, dataset, tmp_path):
    reference = tmp_path / "clean.zarr"
    duration = _timed(ctx, _extract_argv(dataset, reference), tmp_path / "clean.log")
    _kill_loop(ctx, tmp_path, lambda s: _extract_argv(dataset, s), _snapshot(reference), duration,
               max(2, KILLS // 2), "extract")


def test_disk_full_mid_import_then_resume_equals_clean(dataset, tmp_path, monkeypatch):
    """ENOSPC injected at the library boundary (zarr's LocalStore.set, which writes every chunk and
    metadata file) after a random number of writes; `make stress` also fills a real tmpfs."""
    reference = tmp_path / "clean.zarr"
    assert main([str(a) for a in _import_argv(dataset, reference)]) == 0
    clean = _snapshot(reference)
    real = zarr.storage.LocalStore.set
    rng = random.Random(0)
    for i in range(max(3, KILLS // 2)):
        store, budget = tmp_path / f"full{i}.zarr", rng.randint(1, 110)

        async def limited(self, key, value, _left=[budget]):  # noqa: B006 (a per-iteration counter)
            _left[0] -= 1
            if _left[0] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real(self, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", limited)
        try:
            from fgembed.cli.interchange import import_ as command

            command(source=dataset["npy"], store=store, name="a", key=None, order=None, dataset="manifest",
                    root=dataset["big"], val_fraction=0.2, seed=0, overwrite=False, storage_option=(), quiet=True)
        except FgembedError as exc:  # a disk that fills late may not be hit: then the run simply finished
            assert "disk full" in str(exc) and "the store is intact" in str(exc)
            FIGURES["disk-full faults injected"] += 1
        monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
        _opens(store)
        assert main([str(a) for a in _import_argv(dataset, store)]) == 0
        assert _rows_lost(_snapshot(store), clean) == 0
        _clean(store)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="a real tmpfs needs root")
def test_disk_full_on_a_real_small_filesystem(dataset, tmp_path):
    """A 256 KiB tmpfs: the store does not fit; one line; moved to a roomy disk, the rerun is clean."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        with pytest.raises(FgembedError, match="disk full .*store is intact"):
            from fgembed.cli.interchange import import_ as command

            command(source=dataset["npy"], store=mount / "s.zarr", name="a", key=None, order=None,
                    dataset="manifest", root=dataset["big"], val_fraction=0.2, seed=0, overwrite=False, storage_option=(), quiet=True)
        FIGURES["disk-full faults injected"] += 1
        FIGURES["disk-full on a real tmpfs"] += 1
        _opens(mount / "s.zarr")
        shutil.copytree(mount / "s.zarr", tmp_path / "moved.zarr")  # the user frees space (here: a bigger disk)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert main([str(a) for a in _import_argv(dataset, tmp_path / "moved.zarr")]) == 0
    reference = tmp_path / "clean.zarr"
    assert main([str(a) for a in _import_argv(dataset, reference)]) == 0
    assert _rows_lost(_snapshot(tmp_path / "moved.zarr"), _snapshot(reference)) == 0


def test_concurrent_writers(ctx, dataset, tmp_path):
    """Two jobs on different backbones of one new store both finish (setup serialised) and equal
    the sequential runs; two on the same backbone: the second refuses in one line or, if the first
    was done, finds nothing left. A held lock refuses deterministically."""
    reference = tmp_path / "seq.zarr"
    for name, npy in (("a", "npy"), ("b", "npy2")):
        assert main([str(a) for a in _import_argv(dataset, reference, name, npy)]) == 0
    clean = _snapshot(reference)
    for i in range(max(2, KILLS // 2)):
        store = tmp_path / f"both{i}.zarr"
        procs = [_start(ctx, _import_argv(dataset, store, n, f), tmp_path / f"{n}.log")
                 for n, f in (("a", "npy"), ("b", "npy2"))]
        for p in procs:
            p.join()
        assert [p.exitcode for p in procs] == [0, 0], [(tmp_path / f"{n}.log").read_text() for n in "ab"]
        assert _rows_lost(_snapshot(store), clean) == 0
        FIGURES["concurrent jobs, different backbones"] += 2
        same = tmp_path / f"same{i}.zarr"
        procs = [_start(ctx, _import_argv(dataset, same), tmp_path / f"same{k}.log") for k in range(2)]
        for p in procs:
            p.join()
        for k, p in enumerate(procs):
            log = (tmp_path / f"same{k}.log").read_text().strip()
            assert p.exitcode == 0 or (p.exitcode == 2 and log.count("\n") == 0
                                       and "another fgembed job" in log and "Traceback" not in log), log
            FIGURES["concurrent jobs, same backbone: refused in one line"] += p.exitcode == 2
        FIGURES["concurrent jobs, same backbone"] += 2
        assert main([str(a) for a in _import_argv(dataset, same)]) == 0
        assert _rows_lost(_snapshot(same), _snapshot_after(reference, "a")) == 0
    lock = FileLock(lock_dir(reference) / "features-a")
    assert lock.acquire(wait=False)
    try:
        proc = _start(ctx, _import_argv(dataset, reference, "a", "npy"), tmp_path / "held.log")
        proc.join()
        log = (tmp_path / "held.log").read_text().strip()
        assert proc.exitcode == 2 and log.startswith("error: another fgembed job (pid") and "\n" not in log
    finally:
        lock.release()


def _hostile_images(folder: Path) -> dict[str, tuple[int, ...]]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "ok.jpg")
    data = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"<html>not an image</html>" * 20)
    (folder / "header_only.png").write_bytes(data[:20])
    Image.new("RGB", (20000, 1)).save(folder / "strip.png")
    Image.new("RGB", (1, 3000)).save(folder / "tall.png")
    Image.fromarray(np.full((30, 30), 60000, np.uint16)).save(folder / "gray16.png")
    Image.fromarray(np.full((30, 30), 60000, np.uint16)).save(folder / "gray16.tif")
    Image.new("I", (30, 30), 40000).save(folder / "int32.tif")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(folder / "transparent.png")
    Image.new("CMYK", (30, 30)).save(folder / "cmyk.jpg")
    Image.new("RGB", (30, 30)).save(folder / "actually_png.jpg", format="PNG")
    return {"ok.jpg": (OK,), "truncated.jpg": (TRUNCATED,), "empty.jpg": (UNREADABLE,), "junk.jpg": (UNREADABLE,),
            "header_only.png": (UNREADABLE, TRUNCATED), "strip.png": (REFUSED_SIZE,), "tall.png": (REFUSED_SIZE,),
            "gray16.png": (OK,), "gray16.tif": (OK,), "int32.tif": (OK,), "transparent.png": (OK,),
            "cmyk.jpg": (OK,), "actually_png.jpg": (OK,), "absent.jpg": (FAILED)}


def test_hostile_inputs_are_one_line_or_a_flagged_row(dataset, tmp_path, capsys):
    for name, allowed in _hostile_images(tmp_path / "img").items():
        image, status = load_rgb(tmp_path / "img" / name)
        assert status in allowed, (name, status)
        if name.startswith("gray16"):
            assert np.asarray(image)[0, 0, 0] == round(60000 / 257)
        FIGURES["bad inputs tried"] += 1
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "short.csv": "path,label\na.jpg\n", "long.csv": "path,label\na.jpg,x,train,extra\n",
        "dupes.csv": "path,label,split\na.jpg,x,train\na.jpg,x,test\n", "noheader.csv": "a.jpg,x\n",
        "empty.csv": "path,label\n", "badsplit.csv": "path,label,split\na.jpg,x,holdout\n",
        "binary.csv": "\x00\x01\x02", "quote.csv": 'path,label\n"a.jpg,x\n',
    }
    argv = []
    for name, text in cases.items():
        (bad / name).write_text(text)
        argv.append(["extract", "--dataset", "manifest", "--root", bad / name, "--store", tmp_path / "x.zarr",
                     "--backbone", "timm:test_resnet", "--no-pretrained", "--quiet"])
    ids = np.arange(4010)
    import h5py

    with h5py.File(bad / "more_ids.h5", "w") as f:
        f["ids"], f["features"] = ids, np.ones((4000, 3))
    with h5py.File(bad / "dup_ids.h5", "w") as f:
        f["ids"], f["features"] = np.zeros(4000, int), np.ones((4000, 3))
    np.save(bad / "three_d.npy", np.ones((2, 2, 2)))
    store = tmp_path / "imp.zarr"
    assert main([str(a) for a in _import_argv(dataset, store)]) == 0
    capsys.readouterr()
    for source in ("more_ids.h5", "dup_ids.h5", "three_d.npy", "absent.npy"):
        argv.append(["import", bad / source, "--store", store, "--name", "bad", "--quiet"])
    argv.append(["info", bad])  # not a store
    argv.append(["info", bad / "short.csv"])
    for args in argv:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (args, err)
        FIGURES["bad inputs tried"] += 1
    assert not (store / "features" / "bad").exists()  # no half-made group from a refused import
