"""Host memory while building several backbones for extraction: all built, then placed (the old
order) against each placed on its device, in its weights dtype, before the next is built.

Each way runs in a fresh subprocess (peak RSS is a high-water mark: one process per figure), with
every source library imported before the baseline is read, so the figures are the models' own:

- **old**: `load_backbone` for every name (fp32, on the host), then a `DeviceModel` each (move and cast).
- **new**: `load_backbone(name, options, device, weights dtype)` for every name (each model placed
  before the next is built), then the same `DeviceModel`s (nothing left to move).

Random-initialised (`LoadOptions(pretrained=False)`, the `--no-pretrained` path). Devices: `cuda`
when present; without one, `meta` stands in for the accelerator as far as the host is concerned
(the weights leave the host; the probe forward runs on shapes only), and `cpu` with bf16 weights
is the real CPU path. Default: three reference architectures (DINOv3 ViT-L/16, DINOv2 ViT-L/14,
ConvNeXt V2-L); `--all` adds OpenCLIP ViT-L/14 and SigLIP ViT-L/16-256; `--quick` uses ViT-B-size
models of the same libraries (timm ViT-B/16, timm ConvNeXt V2-B, open_clip ViT-B-16).

Usage: python benchmarks/build_memory.py [--quick | --all] [--devices meta,cpu] [--precision bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REFERENCE_THREE = ["dinov3_vitl16", "dinov2_vitl14", "convnextv2_large"]
REFERENCE_FIVE = [*REFERENCE_THREE, "openclip_vitl14", "siglip_vitl16_256"]
VIT_B = ["timm:vit_base_patch16_224", "timm:convnextv2_base", "open_clip:ViT-B-16"]
MIB = 2**20


def rss_now() -> int:
    """Resident bytes of this process now (/proc: no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(way: str, names: list[str], device_name: str, precision_name: str) -> dict:
    """Build `names` the `way` way in this (fresh) process; the figures as a dict."""
    import open_clip  # noqa: F401 — every library imported before the baseline
    import timm  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from fgembed.backbones import LoadOptions, load_backbone
    from fgembed.devices import DeviceModel, resolve_precision

    device = torch.device(device_name)
    precision = resolve_precision(precision_name, device)
    options = LoadOptions(pretrained=False)
    baseline = rss_now()
    began = time.perf_counter()
    if way == "old":
        backbones = [load_backbone(name, options) for name in names]
    else:
        backbones = [load_backbone(name, options, device, precision.weights) for name in names]
    models = [DeviceModel(b, device, precision, compile_model=False) for b in backbones]
    seconds = time.perf_counter() - began
    weights = {b.name: sum(p.numel() * p.element_size() for p in b.model.parameters()) for b in backbones}
    fp32 = {b.name: sum(p.numel() * 4 for p in b.model.parameters()) for b in backbones}
    on_target = all(p.device.type == device.type and p.dtype == precision.weights
                    for m in models for p in m.backbone.model.parameters() if p.is_floating_point())
    out = {"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "end": rss_now(), "seconds": seconds, "weights": weights, "fp32": fp32, "on_target": on_target}
    if device.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    return out


def measure(way: str, names: list[str], device: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", way, "--names", ",".join(names), "--devices", device,
           "--precision", precision]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{way} on {device} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="ViT-B-size models of the same libraries")
    size.add_argument("--all", action="store_true", help="all five reference architectures")
    parser.add_argument("--devices", default=None, help="comma-separated: cuda, meta, cpu (default: cuda if "
                                                        "present, else meta,cpu)")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--names", default=None, help="comma-separated backbone names (overrides the sets)")
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = args.names.split(",") if args.names else VIT_B if args.quick else REFERENCE_FIVE if args.all \
        else REFERENCE_THREE
    if args.child:
        print(json.dumps(child(args.child, names, args.devices, args.precision)))
        return
    import torch
    devices = (args.devices or ("cuda" if torch.cuda.is_available() else "meta,cpu")).split(",")
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; random init; "
          f"precision {args.precision}; {', '.join(names)}")
    for device in devices:
        old, new = (measure(way, names, device, args.precision) for way in ("old", "new"))
        fp32 = old["fp32"]
        print(f"\ndevice {device}: fp32 weights {sum(fp32.values()) / MIB:,.0f} MiB in all, largest "
              f"{max(fp32.values()) / MIB:,.0f} MiB; on the target after: "
              f"{sum(new['weights'].values()) / MIB:,.0f} MiB ({args.precision})")
        print(f"{'way':<44} {'peak RSS':>10} {'above base':>11} {'RSS after':>10} {'build s':>8}")
        for label, r in (("old: all built, then moved + cast", old), ("new: each placed before the next", new)):
            assert r["on_target"], f"{label}: weights not all on {device} in {args.precision}"
            print(f"{label:<44} {r['peak'] / MIB:>8,.0f} M {(r['peak'] - r['baseline']) / MIB:>9,.0f} M "
                  f"{r['end'] / MIB:>8,.0f} M {r['seconds']:>8.1f}"
                  + (f"  GPU peak {r['gpu_peak'] / 2**30:.2f} GiB" if "gpu_peak" in r else ""))
        ratio = (new["peak"] - new["baseline"]) / (old["peak"] - old["baseline"])
        print(f"new / old, peak above the imports' baseline: {ratio:.2f} (peak RSS {new['peak'] / old['peak']:.2f})")


if __name__ == "__main__":
    main()
