"""`fgembed export-model`: trained runs and their backbones as one model file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ._common import app, out, plural
from ._options import CACHE_DIR, LATE_MODE, MEMBER_WEIGHTS, OFFLINE, RUN_DIRS, member_weights


@app.command("export-model")
def export_model(
    run: list[Path] = RUN_DIRS,
    to: Path = typer.Option(..., "--out", metavar="FILE", help="The model file: .pt2 (export), .pt "
                            "(torchscript) or .onnx."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="FMT", help="export (torch.export: TorchScript "
                                      "is deprecated since torch 2.5), torchscript (torch.jit.trace, for "
                                      "LibTorch) or onnx (onnxruntime; pip install 'fgembed[onnx]'). Default: "
                                      "from --out's suffix, else export."),
    late_mode: str = LATE_MODE,
    device: str = typer.Option("cpu", metavar="NAME", help="Where the model is traced, in the precision its "
                               "members were extracted in: cpu (the file runs anywhere), cuda, cuda:N."),
    weights: list[str] = MEMBER_WEIGHTS,
    cache_dir: Optional[Path] = CACHE_DIR,
    offline: bool = OFFLINE,
) -> None:
    """Write trained runs, late-fused when several, and their backbones as one model file.

    It takes uint8 RGB images `[N, 3, H, W]` already resized and cropped by each backbone
    library's own eval transform (one input per distinct preprocessing, named in the file's
    metadata; a library that resizes in float gives its float output) and returns class
    probabilities `[N, C]`; the class names are in its metadata. It
    runs with torch alone (onnx: onnxruntime). Each file is checked against fgembed's own
    forward before it is written. A gated run ships with its member runs and gates; a kNN head
    cannot be exported.
    """
    from fgembed.backbones import LoadOptions
    from fgembed.export_model import export_model as write_model

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    made = write_model(run, to, fmt=fmt, late_mode=late_mode, device=device, load=LoadOptions(cache_dir=cache_dir),
                       weights=member_weights(weights))
    meta = made.metadata
    size = sum(p.stat().st_size for p in made.files) / 1e6
    out.print(f"{made.path} ({made.format}, {size:.1f} MB): {plural(len(meta['runs']), 'run')}, "
              f"{plural(len(meta['backbones']), 'backbone')}, {plural(len(meta['class_names']), 'class')}",
              highlight=False, markup=False)
    for spec in meta["inputs"]:
        shape = ", ".join(map(str, spec["shape"]))
        out.print(f"input {spec['name']}: {spec['dtype']} RGB [{shape}] for {', '.join(spec['backbones'])}, made by "
                  f"{spec['source']}: {spec['transform']}", highlight=False, markup=False)
    out.print(f"output {meta['output']['name']}: float32 [N, {len(meta['class_names'])}]; class names and the rest "
              f"in the file's metadata (fgembed.json); checked against fgembed: max |Δp| {made.max_error:.1g}",
              highlight=False, markup=False)
