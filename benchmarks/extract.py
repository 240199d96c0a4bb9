"""Extraction speed, measured honestly: fgembed against the pure forward of the same models.

Per case, a warm-up run first (models built once, page cache and cuDNN autotuning warm), then
`--repeats` timed runs of each candidate, reported as min / median:

- **fgembed**: `extract()` end to end into a fresh store, profiled per stage (decode and transform
  in the workers, host-to-device, device preprocessing, forward, device-to-host, write, and how
  long the loop sat waiting for workers). The steady state (after the first batch) is timed apart
  from start-up (model build, store set-up, worker spawn, first batch).
- **floor**: the same `DeviceModel`s fgembed builds (same precision and weights dtype, same
  channels-last memory format, same compile setting) run over the same number of images from
  input batches prepared on the device beforehand: what no pipeline can beat.

Cases: CPU (always) — timm test_vit + test_convnext + test_resnet (random init). CUDA (when
present) — the five reference architectures random-initialised (`--no-pretrained`) at batch 128
on ≥ 4,096 generated CUB-sized JPEGs; target fgembed ≥ 0.9 × the floor.

Usage: python benchmarks/extract.py [--quick] [--repeats 3] [--images N] [--cases cpu,cuda] [--compile]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fgembed.backbones import REFERENCE, LoadOptions, load_backbone
from fgembed.datasets import load_dataset
from fgembed.devices import (
    DeviceModel,
    backend_flags,
    default_workers,
    resolve_device,
    resolve_precision,
)
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.images import load_rgb
from fgembed.synthetic import generate

TINY = ["timm:test_vit", "timm:test_convnext", "timm:test_resnet"]
CUB_SIZE = (500, 375)


def floor_images_per_s(names: list[str], table, n_images: int, batch_size: int, device: torch.device,
                       precision: str, compile_model: bool, repeats: int) -> list[float]:
    """Images/s of the forward passes alone, on inputs already on the device; one figure per repeat."""
    resolved = resolve_precision(precision, device)
    images = [load_rgb(Path(table.root) / p)[0] for p in table.paths[:batch_size]]
    models, inputs = [], []
    for name in names:
        b = load_backbone(name, LoadOptions(pretrained=False))
        m = DeviceModel(b, device, resolved, compile_model)
        models.append(m)
        inputs.append(m.prepare(torch.stack([b.transform(im) for im in images]).to(device)))
    n_batches = max(1, n_images // batch_size)
    rates = []
    with backend_flags(device, resolved), torch.inference_mode():
        for m, x in zip(models, inputs):  # warm-up: autotuning, compilation, caches
            m.forward(x)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for _ in range(n_batches):
                for m, x in zip(models, inputs):
                    m.forward(x)
            sync(device)
            rates.append(n_batches * batch_size / (time.perf_counter() - start))
    return rates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    host = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    text = f"host peak RSS {host:,.0f} MiB (main process + largest worker)"
    if device.type == "cuda":
        text += f", GPU peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return text


def spread(values: list[float]) -> str:
    return f"min {min(values):8.1f}  median {statistics.median(values):8.1f}"


def run_case(title: str, names: list[str], root: Path, tmp: Path, batch_size: int, repeats: int,
             device: torch.device, precision: str, compile_model: bool) -> None:
    table = load_dataset("folder", root, val_fraction=0)
    n = len(table)
    print(f"\n{title}: {len(names)} backbones, {n} JPEGs of {CUB_SIZE[0]}×{CUB_SIZE[1]}, batch {batch_size}, "
          f"{default_workers()} workers, precision {resolve_precision(precision, device).name}"
          f"{', compiled' if compile_model else ''}")

    def options() -> ExtractOptions:
        return ExtractOptions(batch_size=batch_size, device=str(device), precision=precision, progress=False,
                              compile=compile_model, profile=True, load=LoadOptions(pretrained=False))

    # warm-up on two batches of other images: libraries imported, kernels autotuned / compiled
    # (the generated JPEGs are fresh in the page cache already, as a re-read dataset would be)
    generate(tmp / "warm", groups=1, classes_per_group=2, per_class=batch_size, size=CUB_SIZE)
    extract(load_dataset("folder", tmp / "warm" / "images", val_fraction=0), tmp / "warm.zarr", names, options())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [extract(table, tmp / f"run{i}.zarr", names, options()) for i in range(repeats)]
    peak = peak_memory(device)  # fgembed's own, before the floor builds its models
    floors = floor_images_per_s(names, table, n, batch_size, device, precision, compile_model, repeats)
    steady = [r.steady_images_per_s for r in runs]
    print(f"  fgembed steady state   images/s  {spread(steady)}   (start-up "
          f"{spread([r.startup_seconds for r in runs])} s; end to end {spread([r.images_per_s for r in runs])} img/s)")
    print(f"  floor (pure forward)   images/s  {spread(floors)}")
    ratio = statistics.median(steady) / statistics.median(floors)
    print(f"  fgembed / floor (medians) = {ratio:.2f}" + ("  (target ≥ 0.9)" if device.type == "cuda" else ""))
    median_run = sorted(runs, key=lambda r: r.steady_images_per_s)[len(runs) // 2]
    print(f"  stages of the median run ({median_run.processed} images; worker stages are CPU time summed "
          f"over {median_run.workers or 1} process(es), device stages {'GPU' if device.type == 'cuda' else 'wall'}"
          " time; they overlap):")
    for stage, seconds in median_run.stages.items():
        print(f"    {stage:<28} {seconds:8.2f} s  {1000 * seconds / median_run.processed:7.2f} ms/image")
    print(f"  fgembed: {peak}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and one repeat (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, help="images per case (default: CPU 512, CUDA 4096)")
    parser.add_argument("--cases", default="cpu,cuda", help="which of cpu,cuda to run (cuda needs a GPU)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones (fgembed and floor)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores available, torch "
          f"{torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    cases = set(args.cases.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "cpu" in cases:
            n = args.images or (96 if args.quick else 512)
            generate(tmp / "cpu", groups=4, classes_per_group=4, per_class=-(-n // 16), size=CUB_SIZE)
            run_case("CPU: timm test models", TINY, tmp / "cpu" / "images", tmp / "cpu", 64, repeats,
                     torch.device("cpu"), "fp32" if args.precision == "auto" else args.precision, args.compile)
        if "cuda" in cases:
            if not torch.cuda.is_available():
                print("\nCUDA case skipped: torch sees no CUDA device")
                return
            n = args.images or (1024 if args.quick else 4096)
            generate(tmp / "gpu", groups=8, classes_per_group=8, per_class=-(-n // 64), size=CUB_SIZE)
            run_case("CUDA: the five reference architectures (random init)", list(REFERENCE),
                     tmp / "gpu" / "images", tmp / "gpu", 128, repeats, resolve_device("cuda"), args.precision,
                     args.compile)


if __name__ == "__main__":
    main()
