"""The embedded default: a generated fine-grained image set run through the whole pipeline.

Offline by construction: three tiny random-init backbones of different families (ViT,
ConvNeXt, ResNet) from timm, so no weights are downloaded. The same code paths as a real run:
extraction into a store, single MLP heads (the reference recipe), concat / sum / late / gated
late fusion of every subset, the ranked table and its bar chart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .analysis.ensemble import Entry, score
from .analysis.plan import plan
from .analysis.report import write_report
from .backbones import LoadOptions
from .classify.fusion import fusion_strategies
from .classify.config import HeadConfig, RunConfig
from .classify.views import ViewConfig
from .datasets import load_dataset
from .extraction.extract import ExtractOptions, ExtractSummary, extract
from .store import FeatureStore
from .synthetic import generate, write_folder_layout

DEMO_BACKBONES = ("timm:test_vit", "timm:test_convnext", "timm:test_resnet")


@dataclass
class DemoResult:
    images: Path
    store: Path
    runs: Path
    extraction: ExtractSummary
    entries: list[Entry]
    report: list[Path]


def run_demo(out: str | Path = "demo-output", progress: bool = True, epochs: int = 150) -> DemoResult:
    out = Path(out)
    images = out / "images"
    if not (images / "train").is_dir():
        records = generate(out / "generated", groups=3, classes_per_group=4, per_class=30)
        write_folder_layout(out / "generated", records, images)
    table = load_dataset("folder", images)
    summary = extract(table, out / "demo.zarr", list(DEMO_BACKBONES),
                      ExtractOptions(load=LoadOptions(pretrained=False), progress=progress, batch_size=32))
    combinations = plan(list(DEMO_BACKBONES), list(fusion_strategies()), ["all"])
    entries = score(FeatureStore.open(out / "demo.zarr"), out / "runs", combinations,
                    RunConfig(ViewConfig(features=DEMO_BACKBONES, fusion="sum"), HeadConfig(epochs=epochs)), progress=progress)
    report = write_report(entries, out, "demo-ranking", "demo: weighted F1 on the test split (random-init backbones)")
    return DemoResult(images, out / "demo.zarr", out / "runs", summary, entries, report)
