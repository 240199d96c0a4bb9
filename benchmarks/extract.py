"""Extraction speed: fgembed against a naive loop and the model's pure forward, same run.

1. Compute-bound (a mid-size model, resnet50, random init): (a) fgembed extract, (b) a naive
   loop — torchvision ImageFolder + DataLoader (2 workers) + model + np.save per batch, (c) the
   model's forward alone on pre-decoded tensors. Targets: a/c ≤ 1.3 and a ≤ b.
2. Decode-bound (three tiny backbones, what a GPU sees): fgembed, all three in one pass, versus
   three separate naive runs. Target: ≥ 2× faster.
On a CUDA machine it also reports images/s for a large model (ViT-L/14) in bf16.

Images are generated JPEGs of CUB-like size (~500×375). Usage: python benchmarks/extract.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
import torchvision

from fgembed.backbones import LoadOptions
from fgembed.datasets import load_dataset
from fgembed.extract import ExtractOptions, extract
from fgembed.synthetic import generate

TINY = ("timm:test_vit", "timm:test_convnext", "timm:test_resnet")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive(root: Path, model_name: str, out: Path, batch_size: int) -> None:
    """What people write first: ImageFolder + DataLoader + model + np.save per batch."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    data = torchvision.datasets.ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=2)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for i, (x, _) in enumerate(loader):
            np.save(out / f"{i:05d}.npy", model.forward_head(model.forward_features(x), pre_logits=True).numpy())


def pure_forward(root: Path, model_name: str, batch_size: int) -> float:
    """The floor: the same forward passes on tensors decoded and transformed beforehand."""
    model = timm.create_model(model_name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    data = torchvision.datasets.ImageFolder(str(root), transform=transform)
    batches = [torch.stack([data[i][0] for i in range(s, min(s + batch_size, len(data)))])
               for s in range(0, len(data), batch_size)]
    with torch.inference_mode():
        return timed(lambda: [model.forward_head(model.forward_features(x), pre_logits=True) for x in batches])


def run_fgembed(root: Path, store: Path, names: list[str], batch_size: int) -> float:
    table = load_dataset("folder", root, val_fraction=0)
    options = ExtractOptions(batch_size=batch_size, load=LoadOptions(pretrained=False), progress=False)
    return timed(lambda: extract(table, store, names, options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    n_compute, n_decode = (16, 48) if args.quick else (96, 600)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"\n1. compute-bound: resnet50 (random init), {n_compute} JPEGs of 500×375, batch 32")
        generate(tmp / "c", groups=2, classes_per_group=2, per_class=n_compute // 4, size=(500, 375))
        root = tmp / "c" / "images"
        a = run_fgembed(root, tmp / "c.zarr", ["timm:resnet50"], 32)
        b = timed(lambda: naive(root, "resnet50", tmp / "naive_c", 32))
        c = pure_forward(root, "resnet50", 32)
        print(f"   (a) fgembed {a:7.2f} s   (b) naive {b:7.2f} s   (c) pure forward {c:7.2f} s")
        print(f"   a/c = {a / c:.2f} (target ≤ 1.3)   a/b = {a / b:.2f} (target ≤ 1.0)")

        print(f"\n2. decode-bound: {', '.join(TINY)} (random init), {n_decode} JPEGs of 500×375, batch 64")
        generate(tmp / "d", groups=3, classes_per_group=4, per_class=n_decode // 12, size=(500, 375))
        root = tmp / "d" / "images"
        one_pass = run_fgembed(root, tmp / "d.zarr", list(TINY), 64)
        separate = sum(timed(lambda n=n: naive(root, n.split(":")[1], tmp / f"naive_{n[5:]}", 64)) for n in TINY)
        print(f"   fgembed one pass {one_pass:7.2f} s   three naive runs {separate:7.2f} s   "
              f"speed-up {separate / one_pass:.2f}× (target ≥ 2)")

        if torch.cuda.is_available():
            print("\n3. CUDA, bf16: timm vit_large_patch14_clip_224 (random init), 1,024 images, batch 128")
            generate(tmp / "g", groups=4, classes_per_group=4, per_class=64, size=(500, 375))
            table = load_dataset("folder", tmp / "g" / "images", val_fraction=0)
            options = ExtractOptions(batch_size=128, workers=min(16, os.cpu_count() or 1),
                                     load=LoadOptions(pretrained=False), progress=False)
            summary = extract(table, tmp / "g.zarr", ["timm:vit_large_patch14_clip_224"], options)
            print(f"   {summary.images_per_s:,.0f} images/s end to end (decode + bf16 forward + write)")


if __name__ == "__main__":
    main()
