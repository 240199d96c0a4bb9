"""The embedded default: a generated fine-grained image set run through the real pipeline.

Offline by construction: three tiny random-init backbones of different families (ViT,
ConvNeXt, ResNet) from timm, so no weights are downloaded. The same code paths as a real run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backbones import LoadOptions
from .datasets import load_dataset
from .extract import ExtractOptions, ExtractSummary, extract
from .synthetic import generate, write_folder_layout

DEMO_BACKBONES = ("timm:test_vit", "timm:test_convnext", "timm:test_resnet")


@dataclass
class DemoResult:
    images: Path
    store: Path
    extraction: ExtractSummary


def run_demo(out: str | Path = "demo-output", progress: bool = True) -> DemoResult:
    out = Path(out)
    images = out / "images"
    if not (images / "train").is_dir():
        records = generate(out / "generated", groups=3, classes_per_group=4, per_class=30)
        write_folder_layout(out / "generated", records, images)
    table = load_dataset("folder", images)
    summary = extract(table, out / "demo.zarr", list(DEMO_BACKBONES),
                      ExtractOptions(load=LoadOptions(pretrained=False), progress=progress, batch_size=32))
    return DemoResult(images, out / "demo.zarr", summary)
