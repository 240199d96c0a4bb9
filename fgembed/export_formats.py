"""The file formats of `fgembed export-model`: how a traced module is saved with its metadata,
and loaded back as a user without fgembed loads it.

`export` (torch.export, a .pt2 file) is the default: TorchScript is deprecated since torch 2.5,
and torch 2.14's `torch.jit.trace`, `save` and `load` warn that they are going away.
`torchscript` (`torch.jit.trace`) is for LibTorch and runtimes that load only TorchScript. `onnx`
goes through torch.onnx's exporter (onnxscript) and runs with onnxruntime (`fgembed[onnx]`).
The metadata is a JSON document: an extra file of the archive (`METADATA`) for the torch formats,
a `metadata_props` entry of that name for ONNX.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FgembedError

FORMATS = ("export", "torchscript", "onnx")
SUFFIXES = {".pt2": "export", ".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}
METADATA = "fgembed.json"  # the file's extra file (torch formats) or metadata_props key (ONNX)


def format_of(out: str | Path, fmt: str | None = None) -> str:
    """The format asked for, else the one `out`'s suffix names (.pt2, .onnx, .pt/.ts); an export
    file must end in .pt2."""
    fmt = fmt or SUFFIXES.get(Path(out).suffix.lower(), "export")
    if fmt not in FORMATS:
        raise FgembedError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "export" and Path(out).suffix.lower() != ".pt2":
        raise FgembedError(f"--out {out}: torch.export files end in .pt2 (torch.export.load wants the suffix)")
    return fmt


def _dynamic(examples: tuple[torch.Tensor, ...]) -> tuple:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in examples)


def _save_export(model: nn.Module, examples: tuple, target: Path, metadata: str) -> None:
    program = torch.export.export(model, examples, dynamic_shapes=(_dynamic(examples),))
    torch.export.save(program, target, extra_files={METADATA: metadata})


def _save_torchscript(model: nn.Module, examples: tuple, target: Path, metadata: str) -> None:
    with _quiet_torchscript():
        traced = torch.jit.trace(model, examples, check_trace=False)
        torch.jit.save(traced, str(target), _extra_files={METADATA: metadata})


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """TorchScript's deprecation (the format was asked for by name: see FORMATS) and the tracer's
    warnings about Python values it keeps constant (image sizes, fixed per file): `export_model`
    runs the file on another batch size, which is what those warnings are about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _save_onnx(model: nn.Module, examples: tuple, target: Path, metadata: str) -> None:
    onnx, _ = onnx_modules()
    names = [f"images{i}" for i in range(len(examples))] if len(examples) > 1 else ["images"]
    with warnings.catch_warnings():  # that every input's batch axis is one and the same, "batch"
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(model, examples, dynamo=True, dynamic_shapes=(_dynamic(examples),),
                                    input_names=names, output_names=["probabilities"], verbose=False)
    program.save(str(target))
    proto = onnx.load(str(target), load_external_data=False)  # weights over 2 GB stay in FILE.data
    onnx.helper.set_model_props(proto, {METADATA: metadata})
    onnx.save(proto, str(target))


def _load_export(target: Path, device: torch.device) -> tuple[Callable, dict]:
    files = {METADATA: ""}
    module = torch.export.load(str(target), extra_files=files).module()
    return _as_numpy(module), json.loads(files[METADATA])


def _load_torchscript(target: Path, device: torch.device) -> tuple[Callable, dict]:
    files = {METADATA: ""}
    with _quiet_torchscript():
        module = torch.jit.load(str(target), map_location=device, _extra_files=files)
    return _as_numpy(module), json.loads(files[METADATA])


def _as_numpy(module: Callable) -> Callable:
    """The loaded module as a function giving numpy probabilities (no autograd graph kept)."""
    def run(*x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(*x).float().cpu().numpy()
    return run


def _load_onnx(target: Path, device: torch.device) -> tuple[Callable, dict]:
    _, ort = onnx_modules()
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    run = lambda *x: session.run(None, {n: t.cpu().numpy() for n, t in zip(names, x)})[0]  # noqa: E731
    return run, json.loads(session.get_modelmeta().custom_metadata_map[METADATA])


def onnx_modules():
    """(onnx, onnxruntime), or one line saying how to install them (onnxscript: torch.onnx's exporter)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise FgembedError(f"--format onnx needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
                           "pip install 'fgembed[onnx]'") from None
    return onnx, onnxruntime


SAVERS = {"export": _save_export, "torchscript": _save_torchscript, "onnx": _save_onnx}
LOADERS = {"export": _load_export, "torchscript": _load_torchscript, "onnx": _load_onnx}
