"""Every command that takes a store takes it at a URL: extraction into a real S3 API (moto's
server, started by `tests/conftest.py`), then `info`, `fit`, `ensemble` (late and concat) and
`export` reading from it give what they give from the same extraction on local disk; and runs are
portable: one trained from an S3 store predicts from another folder after it is copied, with no
access to the store at all.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from fgembed.classify.rundir import Run
from fgembed.store import FeatureStore

MEMBERS = "timm:test_vit,timm:test_resnet"
FIT = ["--epochs", "3", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def stores(s3_endpoint, manifest_csv, tmp_path_factory):
    """The manifest's images extracted twice through the CLI: to local disk, and to s3:// with
    the endpoint given as a storage option."""
    local = tmp_path_factory.mktemp("remote-cli") / "local.zarr"
    url = f"s3://fgembed-test/cli-{uuid.uuid4().hex[:8]}/store.zarr"
    options = ["--storage-option", f"endpoint_url={s3_endpoint['AWS_ENDPOINT_URL']}"]
    for store, extra in ((str(local), []), (url, options)):
        argv = ["extract", "--dataset", "manifest", "--root", str(manifest_csv), "--store", store, "--no-pretrained",
                "--device", "cpu", "--workers", "0", "--quiet", *extra]
        for name in MEMBERS.split(","):
            argv += ["--backbone", name]
        assert main(argv) == 0
    return local, url, options


def _json(capsys, argv: list[str]) -> dict | list:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_info_reads_the_store_through_the_storage_option_alone(stores, capsys, monkeypatch):
    local, url, options = stores
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --storage-option says where the S3 API is
    remote = _json(capsys, ["info", url, *options, "--json"])
    here = _json(capsys, ["info", str(local), "--json"])
    assert remote["rows"] == here["rows"] and remote["splits"] == here["splits"]
    assert [b["rows_done"] for b in remote["backbones"]] == [b["rows_done"] for b in here["backbones"]]
    np.testing.assert_array_equal(FeatureStore.open(url, storage_options={"endpoint_url": options[1].split("=", 1)[1]})
                                  .embeddings("timm:test_vit"), FeatureStore.open(local).embeddings("timm:test_vit"))


def test_storage_option_errors_are_one_line(stores, capsys):
    local, url, _ = stores
    for argv, message in ((["info", url, "--storage-option", "endpoint_url"], "expected KEY=VALUE"),
                          (["info", str(local), "--storage-option", "anon=true"], "has no effect on a local")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_fit_and_ensemble_from_s3_equal_local(stores, capsys, tmp_path):
    local, url, options = stores
    fits = {}
    for where, extra in ((str(local), []), (url, options)):
        fits[where] = _json(capsys, ["fit", "--store", where, *extra, "--features", "timm:test_vit+timm:test_resnet",
                                     "--runs", str(tmp_path / where.split(":")[0].strip("/")), *FIT, "--json"])
    a, b = fits.values()
    for key in ("accuracy", "f1", "f1_macro", "top5", "n_test", "best_epoch"):
        assert a[key] == b[key], key
    tables = {}
    for where, extra in ((str(local), []), (url, options)):
        runs = tmp_path / ("ens-" + where.split(":")[0].strip("/"))
        capsys.readouterr()
        assert main(["ensemble", "--store", where, *extra, "--members", MEMBERS, "--strategies", "late,concat",
                     "--runs", str(runs), *FIT, "--format", "json"]) == 0, capsys.readouterr().err
        tables[where] = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    local_rows, s3_rows = tables.values()
    assert set(local_rows) == set(s3_rows) and {r["strategy"] for r in local_rows.values()} >= {"late", "concat"}
    for key, row in local_rows.items():
        for metric in ("accuracy", "f1", "f1_macro"):
            assert s3_rows[key][metric] == row[metric], (key, metric)


def test_a_run_copied_elsewhere_predicts_without_its_store(stores, tmp_path, monkeypatch):
    """Fit from s3://, copy the run directory, cut all access to S3, predict from another folder:
    the copy still names its classes (recorded in the run) and its top-1 equals the stored logits."""
    local, url, options = stores
    assert main(["fit", "--store", url, *options, "--features", "timm:test_vit", "--runs", str(tmp_path / "runs"),
                 *FIT]) == 0
    (trained,) = (tmp_path / "runs").iterdir()
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(trained, copy)
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = Run.load("run")
    assert run.store_path == url and run.meta["class_names"] == FeatureStore.open(local).class_names
    rows, logits = run.logits("test")
    table = FeatureStore.open(local).table()
    listing = Path("images.csv")
    listing.write_text("path\n" + "".join(f"{Path(table.root) / table.paths[r]}\n" for r in rows))
    assert main(["predict", "--run", "run", "--images", str(listing), "--out", "p.json", "--top-k", "1",
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    predicted = [r["pred_1"] for r in json.loads(Path("p.json").read_text())]
    stored = [run.meta["class_names"][c] for c in np.asarray(logits, np.float32).mean(0).argmax(1)]
    assert sum(p != s for p, s in zip(predicted, stored)) <= 2  # float16 ties may flip an argmax


def test_a_relative_local_store_is_recorded_resolved(stores, tmp_path, monkeypatch):
    local, _, _ = stores
    monkeypatch.chdir(local.parent)
    assert main(["fit", "--store", local.name, "--features", "timm:test_resnet", "--runs", str(tmp_path), *FIT]) == 0
    (path,) = tmp_path.iterdir()
    monkeypatch.chdir(tmp_path)
    assert Run.load(path).store_path == local.resolve()
    assert Run.load(path).open_store().n_rows == FeatureStore.open(local).n_rows


def test_export_and_similarity_read_a_store_at_a_url(stores, capsys, tmp_path):
    """`export` and `similarity` from s3:// give what they give from the local copy."""
    import h5py

    local, url, options = stores
    for where, extra, name in ((str(local), [], "local.h5"), (url, options, "s3.h5")):
        assert main(["export", where, *extra, "--to", str(tmp_path / name)]) == 0
    with h5py.File(tmp_path / "local.h5") as a, h5py.File(tmp_path / "s3.h5") as b:
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(a[key], h5py.Dataset):
                np.testing.assert_array_equal(a[key][()], b[key][()])
    results = [_json(capsys, ["similarity", "--source", where, "--target", str(local), *extra,
                              "--features", "timm:test_vit", "--format", "json", "--quiet"])
               for where, extra in ((str(local), []), (url, options))]
    assert [r["similarity"] for r in results[0]] == [r["similarity"] for r in results[1]]
