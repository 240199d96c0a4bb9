"""`fgembed export-model`: the file runs where fgembed, timm, open_clip and transformers cannot be
imported, and classifies the store's test images as `fgembed predict` does.

Each exported file is run in a subprocess that blocks those packages (and torchvision; for ONNX,
torch too) before anything loads, fed what the libraries' own transforms make of the images
(timm's rebuilt from nothing but the file's metadata; the transformers image processors), and
its probabilities are compared with `fgembed predict` on the same image files.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fgembed.cli.main import main
from PIL import Image

from fgembed.backbones import LoadOptions
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.fusion import FUSIONS, Concat, register_fusion
from fgembed.classify.gate import GateConfig
from fgembed.classify.gated import fit_gated
from fgembed.classify.rundir import Run
from fgembed.classify.views import ViewConfig
from fgembed.datasets import load_dataset
from fgembed.errors import FgembedError
from fgembed.export_model import export_model, load_exported
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.predict import predict
from fgembed.store import FeatureStore

MEMBERS = ("timm:test_vit", "timm:test_resnet")  # bicubic and bilinear resizes: two inputs
BLOCKED = ("fgembed", "timm", "open_clip", "transformers", "torchvision")

# Runs the file with torch alone (or onnxruntime alone): argv = format, model, inputs, output.
RUNNER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
for name in {blocked!r}:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(name + " is importable: the blocker failed")
import json
fmt, model, inputs, output = sys.argv[1:]
if fmt == "onnx":
    import numpy as np
    import onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["fgembed.json"])
    arrays = np.load(inputs)
    probs = session.run(None, {{i.name: arrays[i.name] for i in session.get_inputs()}})[0].tolist()
else:
    import torch
    files = {{"fgembed.json": ""}}
    if fmt == "export":
        module = torch.export.load(model, extra_files=files).module()
    else:
        module = torch.jit.load(model, _extra_files=files)
    meta = json.loads(files["fgembed.json"])
    images = torch.load(inputs)
    probs = module(*[images[spec["name"]] for spec in meta["inputs"]]).tolist()
with open(output, "w") as f:
    json.dump({{"probs": probs, "class_names": meta["class_names"]}}, f)
"""


class NoTorchForm(Concat):
    """A plug-in fusion that gives no torch form (the default `Fusion.torch_module`)."""

    title = "no torch form"

    def torch_module(self):
        return None


@contextlib.contextmanager
def _no_torch_form() -> Iterator[None]:
    """`NoTorchForm` registered as `notorch` meanwhile; the registry left as it was found."""
    register_fusion("notorch")(NoTorchForm)
    try:
        yield
    finally:
        FUSIONS.pop("notorch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, manifest_csv):
    """A store of the manifest images; runs of each member (two seeds on the ViT), a PCA sum of
    both, their gated fusion, a kNN head and a fusion without a torch form."""
    tmp = tmp_path_factory.mktemp("export")
    table = load_dataset("manifest", manifest_csv)
    extract(table, tmp / "s.zarr", list(MEMBERS),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp / "s.zarr")

    def fit(features, seeds=(0,), **view) -> Path:
        config = RunConfig(view=ViewConfig(features=features, **view), head=HeadConfig(epochs=3, seeds=seeds))
        return fit_run(store, config, tmp / "runs", device="cpu").path

    runs = {"vit": fit(MEMBERS[:1], (0, 1)), "resnet": fit(MEMBERS[1:]), "sum": fit(MEMBERS, fusion="sum")}
    runs["gated"] = fit_gated(store, [Run.load(runs["vit"]), Run.load(runs["resnet"])], tmp / "runs",
                              config=GateConfig(epochs=5), device="cpu").path
    runs["knn"] = fit_run(store, RunConfig(view=ViewConfig(features=MEMBERS[:1]), head=HeadConfig(head="knn")),
                          tmp / "runs", device="cpu").path
    with _no_torch_form():
        runs["notorch"] = fit(MEMBERS, fusion="notorch")
    rows = Run.load(runs["vit"]).rows("test")
    return tmp, [Path(table.root) / table.paths[r] for r in rows], store, runs


def _library_inputs(meta: dict, files: list[Path]) -> dict[str, torch.Tensor]:
    """Each input of the file from timm's own eval transform of the data config in the metadata,
    without its ToTensor and Normalize (which the file does itself), as uint8."""
    import timm.data
    import torchvision.transforms as T

    inputs = {}
    for spec in meta["inputs"]:
        assert spec["source"] == "timm" and spec["dtype"] == "uint8"
        steps = timm.data.create_transform(**spec["preprocessing"], is_training=False).transforms
        assert [type(s).__name__ for s in steps[-2:]] == ["MaybeToTensor", "Normalize"]
        geometric = T.Compose([*steps[:-2], T.PILToTensor()])
        assert all(f"{type(step).__name__}(" in spec["transform"] for step in geometric.transforms)
        inputs[spec["name"]] = torch.stack([geometric(Image.open(f).convert("RGB")) for f in files])
        assert list(inputs[spec["name"]].shape[1:]) == spec["shape"][1:]
    return inputs


def _run_alone(tmp: Path, fmt: str, model: Path, inputs: dict[str, torch.Tensor]) -> dict:
    """The file's probabilities from a subprocess where fgembed and the model libraries are blocked."""
    tmp.mkdir(exist_ok=True)
    script, where, result = tmp / "runner.py", tmp / "inputs", tmp / "result.json"
    script.write_text(RUNNER.format(blocked=BLOCKED + (("torch",) if fmt == "onnx" else ())))
    if fmt == "onnx":
        where = where.with_suffix(".npz")
        np.savez(where, **{k: v.numpy() for k, v in inputs.items()})
    else:
        torch.save(inputs, where)
    proc = subprocess.run([sys.executable, str(script), fmt, str(model), str(where), str(result)],
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return json.loads(result.read_text())


def _predicted(runs: list[Path], files: list[Path], n_classes: int, late_mode: str) -> np.ndarray:
    """`fgembed predict`'s full probability matrix (its top-k over every class, put back in class order)."""
    found = predict(runs, files, top_k=n_classes, late_mode=late_mode, device="cpu", workers=0, progress=False)
    assert set(found.status) == {"ok"}
    probs = np.zeros((len(files), n_classes))
    np.put_along_axis(probs, found.top_ids, found.top_probs, axis=1)
    return probs


@pytest.mark.parametrize("fmt, which, late_mode", [
    ("export", ["vit"], "logits"),               # one run, its two seeds fused
    ("torchscript", ["vit", "sum"], "logits"),   # two runs late-fused, the PCA sum reading both inputs; by the CLI
    ("onnx", ["gated", "resnet"], "proba"),      # a gated run (of vit and resnet) and another; onnxruntime alone
])
def test_the_file_classifies_as_predict_does(trained, tmp_path, capsys, fmt, which, late_mode):
    _, files, store, runs = trained
    n_classes = len(store.class_names)
    path = tmp_path / f"model{ {'export': '.pt2', 'torchscript': '.pt', 'onnx': '.onnx'}[fmt]}"
    if fmt == "torchscript":
        args = [a for w in which for a in ("--run", str(runs[w]))]
        assert main(["export-model", *args, "--out", str(path), "--late-mode", late_mode]) == 0
        printed = capsys.readouterr().out
        assert f"{path} (torchscript," in printed and "2 runs, 2 backbones" in printed
        assert "input images0: uint8 RGB [N, 3, 160, 160] for timm:test_vit, made by timm: Compose(" in printed
        assert f"output probabilities: float32 [N, {n_classes}]" in printed
        meta = load_exported(path)[1]
    else:
        made = export_model([runs[w] for w in which], path, late_mode=late_mode)
        assert made.format == fmt and made.max_error <= 1e-3 and made.files == [path]
        meta = made.metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the file alone: no temporary folder left
    assert meta["class_names"] == list(store.class_names) and meta["late_mode"] == late_mode
    assert len(meta["inputs"]) == 2 - (which == ["vit"])  # bicubic (ViT) ≠ bilinear (ResNet) resizes
    alone = _run_alone(tmp_path / "alone", fmt, path, _library_inputs(meta, files))
    assert alone["class_names"] == list(store.class_names)
    got = np.asarray(alone["probs"])
    want = _predicted([runs[w] for w in which], files, n_classes, late_mode)
    assert got.shape == want.shape == (len(files), n_classes)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) != want.argmax(1)).sum() <= 1  # a float near-tie may flip (CONVENTIONS)


def test_transformers_members_one_fed_uint8_one_float(hf_models, manifest_csv, tmp_path):
    """DINOv2's processor splits into a uint8 resize/crop; DINOv3's resizes in float, so its input
    is the processor's whole output, as extraction feeds it. Inputs come from the processors."""
    from transformers import AutoImageProcessor

    table = load_dataset("manifest", manifest_csv)
    names = [f"hf:{hf_models['dinov2']}", f"hf:{hf_models['dinov3']}"]
    extract(table, tmp_path / "s.zarr", names, ExtractOptions(workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp_path / "s.zarr")
    runs = [fit_run(store, RunConfig(view=ViewConfig(features=(n,)), head=HeadConfig(epochs=3)), tmp_path / "runs",
                    device="cpu").path for n in names]
    made = export_model(runs, tmp_path / "model.pt2")
    inputs = made.metadata["inputs"]
    assert [(i["dtype"], i["backbones"]) for i in inputs] == [("uint8", names[:1]), ("float32", names[1:])]
    assert inputs[0]["transform"].startswith("BitImageProcessor(") and "do_rescale=False" in inputs[0]["transform"]
    files = [Path(table.root) / table.paths[r] for r in Run.load(runs[0]).rows("test")]
    images = [Image.open(f).convert("RGB") for f in files]
    split = {"do_rescale": False, "do_normalize": False}
    fed = {spec["name"]: AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt",
                                                                    **(split if spec["dtype"] == "uint8" else {}))
           ["pixel_values"] for spec, folder in zip(inputs, (hf_models["dinov2"], hf_models["dinov3"]))}
    assert [fed[i["name"]].dtype for i in inputs] == [torch.uint8, torch.float32]
    got = np.asarray(_run_alone(tmp_path, "export", made.path, fed)["probs"])
    np.testing.assert_allclose(got, _predicted(runs, files, len(store.class_names), "logits"), atol=1e-4)


def test_a_multi_level_run_ships_its_finest_level(cub_root, tmp_path):
    """A taxonomy-aware run's file gives the fine level's probabilities (as `predict` does), and
    its metadata maps each class to its ancestors."""
    table = load_dataset("cub", cub_root)
    extract(table, tmp_path / "cub.zarr", list(MEMBERS[:1]),
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    store = FeatureStore.open(tmp_path / "cub.zarr")
    head = HeadConfig(epochs=3, seeds=(0, 1), levels=("family", "label"))
    run = fit_run(store, RunConfig(ViewConfig(features=MEMBERS[:1]), head), tmp_path / "runs", device="cpu").path
    made = export_model([run], tmp_path / "model.pt")
    files = [Path(table.root) / table.paths[r] for r in Run.load(run).rows("test")]
    fn, meta = load_exported(made.path)
    assert meta["runs"][0]["levels"] == ["family", "label"]
    names = store.samples_attrs["levels"]["family"]
    assert all(meta["taxonomy"]["family"][c] == names[f] for c, f in zip(store.labels(), store.labels(level="family")))
    inputs = _library_inputs(meta, files)
    got = fn(*[inputs[spec["name"]] for spec in meta["inputs"]])
    np.testing.assert_allclose(got, _predicted([run], files, len(store.class_names), "logits"), atol=1e-4)


def test_refusals_are_one_line_and_exit_2(trained, tmp_path, capsys):
    _, _, _, runs = trained
    cases = [
        (["--run", runs["knn"], "--out", tmp_path / "m.pt2"], "knn head cannot be exported"),
        (["--run", runs["notorch"], "--out", tmp_path / "m.pt2"], "notorch fusion has no torch form"),
        (["--run", runs["vit"], "--out", tmp_path / "m.bin"], "end in .pt2"),
        (["--run", runs["vit"], "--out", tmp_path / "m.pt2", "--format", "tflite"], "unknown --format"),
        (["--run", runs["vit"], "--out", tmp_path / "m.pt2", "--late-mode", "max"], "logits or proba"),
        (["--run", tmp_path, "--out", tmp_path / "m.pt2"], "not a finished run"),
    ]
    for args, message in cases:
        with _no_torch_form():
            assert main(["export-model", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary folder
    with pytest.raises(FgembedError, match="name at least one --run"):
        export_model([], tmp_path / "x.pt2")


def test_command_line_defaults_are_the_library_s():
    import inspect

    from fgembed.cli._options import LATE_MODE
    from fgembed.cli.export_model import export_model as command

    library = inspect.signature(export_model).parameters
    cli = inspect.signature(command).parameters
    assert LATE_MODE.default == library["late_mode"].default == inspect.signature(predict).parameters["late_mode"].default
    assert cli["device"].default.default == library["device"].default
