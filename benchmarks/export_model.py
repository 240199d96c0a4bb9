"""`fgembed export-model`: what exporting costs, and whether the file is as fast as fgembed's own forward.

One run is made on generated images (a random-init backbone of real size, default timm's ViT-B/16,
and a 3-epoch MLP head); then for each format, in a child process of its own (clean peak memory):
the export's seconds, the file's size and the process's peak RSS, and images/s of the loaded file
against the eager module it was traced from (`export_model.build_model`) on the same uint8 batch,
after a warm-up, `--repeats` times each, interleaved: min and median, and file / eager.

    python benchmarks/export_model.py [--backbone timm:vit_base_patch16_224] [--formats export,torchscript,onnx]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_run(work: Path, backbone: str) -> Path:
    from fgembed.backbones import LoadOptions
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig
    from fgembed.datasets import load_dataset
    from fgembed.extraction.extract import ExtractOptions, extract
    from fgembed.store import FeatureStore
    from fgembed.synthetic import generate, write_manifest

    records = generate(work, groups=3, classes_per_group=2, per_class=10, size=(256, 192))
    table = load_dataset("manifest", write_manifest(work, records))
    extract(table, work / "s.zarr", [backbone],
            ExtractOptions(load=LoadOptions(pretrained=False), workers=0, progress=False, device="cpu"))
    config = RunConfig(view=ViewConfig(features=(backbone,)), head=HeadConfig(epochs=3))
    return fit_run(FeatureStore.open(work / "s.zarr"), config, work / "runs", device="cpu").path


def child(run: str, fmt: str, out: str, batch: int, repeats: int) -> dict:
    import torch

    from fgembed.export_model import build_model, examples, export_model, load_exported

    began = time.perf_counter()
    made = export_model([run], out, fmt=fmt)
    seconds = time.perf_counter() - began
    size = sum(p.stat().st_size for p in made.files)
    loaded, meta = load_exported(out)
    model, _ = build_model([run])
    x = examples(meta, batch, seed=2)
    times: dict[str, list[float]] = {"file": [], "eager": []}
    with torch.no_grad():
        for fn in (loaded, model):  # warm-up
            fn(*x)
        for _ in range(repeats):
            for name, fn in (("file", loaded), ("eager", model)):
                t = time.perf_counter()
                fn(*x)
                times[name].append(time.perf_counter() - t)
    return {"format": fmt, "export_s": seconds, "size_mb": size / 1e6, "max_error": made.max_error,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **{f"{k}_img_s": [batch / v for v in (min(t), statistics.median(t))] for k, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="timm:vit_base_patch16_224")
    parser.add_argument("--formats", default="export,torchscript,onnx")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("RUN", "FORMAT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="fgembed-bench-export-") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        run = make_run(work, args.backbone)
        print(f"{args.backbone} (random init): store and run in {time.perf_counter() - began:.0f} s; batch "
              f"{args.batch}, {args.repeats} repeats", flush=True)
        suffix = {"export": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}
        for fmt in args.formats.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", str(run), fmt, str(work / f"m{suffix[fmt]}"),
                                   "--batch", str(args.batch), "--repeats", str(args.repeats)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{fmt}: failed\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            (fmin, fmed), (emin, emed) = r["file_img_s"], r["eager_img_s"]
            print(f"{fmt:12s} export {r['export_s']:6.1f} s, {r['size_mb']:7.1f} MB, peak RSS {r['peak_rss_mib']:6.0f} MiB"
                  f", max |Δp| {r['max_error']:.1g}; img/s file {rates(fmin, fmed)} vs eager {rates(emin, emed)}"
                  f" (best / median), file/eager {fmed / emed:.2f} at the median", flush=True)


def rates(best_rate: float, median_rate: float) -> str:
    """Rates from the min and median times: the best and the median rate."""
    return f"{best_rate:.1f} / {median_rate:.1f}"


if __name__ == "__main__":
    main()
