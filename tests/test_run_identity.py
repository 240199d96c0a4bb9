"""A run belongs to the data it was trained on: two stores whose images differ never share a run."""
from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from fgembed.backbones import LoadOptions
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.rundir import Run
from fgembed.classify.views import ViewConfig
from fgembed.datasets import load_dataset
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.store import FeatureStore
from fgembed.synthetic import generate, write_manifest


def test_two_stores_that_differ_in_one_image_never_share_a_run(tmp_path):
    records = generate(tmp_path / "good", groups=2, classes_per_group=2, per_class=8, size=(48, 40))
    write_manifest(tmp_path / "good", records)
    test_image = next(r for r in records if not r.train).path
    shutil.copytree(tmp_path / "good", tmp_path / "broken")
    (tmp_path / "broken" / test_image).write_bytes(b"not a jpeg")  # a flagged row in that store
    shutil.copytree(tmp_path / "good", tmp_path / "edited")
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(tmp_path / "edited" / test_image)  # another picture
    options = ExtractOptions(batch_size=16, workers=0, device="cpu", progress=False, load=LoadOptions(pretrained=False))
    stores = {}
    for name in ("good", "broken", "edited"):
        extract(load_dataset("manifest", tmp_path / name / "manifest.csv"), tmp_path / f"{name}.zarr",
                ["timm:test_vit"], options)
        stores[name] = FeatureStore.open(tmp_path / f"{name}.zarr")
    # same ids, paths, labels and splits in all three: only the images differ
    assert len({s.samples_attrs["manifest_sha256"] for s in stores.values()}) == 1
    config = RunConfig(ViewConfig(features=("timm:test_vit",)), HeadConfig(epochs=3, batch_size=16))
    runs = tmp_path / "runs"
    broken = fit_run(stores["broken"], config, runs, device="cpu")
    good = fit_run(stores["good"], config, runs, device="cpu")
    edited = fit_run(stores["edited"], config, runs, device="cpu")
    assert len({broken.path, good.path, edited.path}) == 3 and not (good.reused or edited.reused)
    assert broken.metrics["test_rows_dropped"] == 1 and good.metrics["test_rows_dropped"] == 0
    assert broken.metrics["n_test"] == good.metrics["n_test"] - 1
    # --force on one store retrains its own run only
    forced = fit_run(stores["broken"], config, runs, device="cpu", force=True)
    assert forced.path == broken.path and Run.load(good.path).metrics == good.metrics
    again = fit_run(stores["good"], config, runs, device="cpu")
    assert again.reused and again.path == good.path and again.metrics["test_rows_dropped"] == 0
