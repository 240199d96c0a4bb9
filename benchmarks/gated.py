"""Gated late fusion against `--late-weights val`: what learning per-image member weights costs
beside learning one weight per member, on the same five single runs.

A synthetic store of the chosen shape is generated through `fgembed import` (`scale.build_store`)
and one single run per member trained (one epoch). Then, alternately and each in a fresh child
process (its peak RSS its own), `--repeats` times:

  late-val   `ensemble.score` of late fusion of all five with `--late-weights val` (L-BFGS on a
             sample of the validation rows, then the streamed test scoring), no intervals
  gated      `gated.fit_gated` of the five (`--force`: a gate trained each time; the default
             GateConfig, 100 epochs per seed), which writes the gated run's val and test logits

Shapes: `cub` (CUB-200-2011: 200 classes, 4,795 train, 1,199 val, 5,794 test rows, the five
reference widths), `quick` (1,000 classes, tenth-size rows), `inat` (scale.py's 10,000 classes,
100,000 / 25,000 / 40,000 rows; meant for a GPU).

Usage: python benchmarks/gated.py [--shape cub|quick|inat] [--seeds 0,1,2] [--repeats N]
       [--device auto|cpu|cuda] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale import FULL, MEMBERS, QUICK, Shape, build_store  # noqa: E402

SHAPES = {"cub": Shape(200, 4_795, 1_199, 5_794, (1024, 1024, 1536, 768, 1024)), "quick": QUICK, "inat": FULL}


def _singles(store, runs: Path, seeds: tuple[int, ...], device: str) -> list:
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.fitting import fit_run
    from fgembed.classify.views import ViewConfig
    return [fit_run(store, RunConfig(ViewConfig(features=(m,)), HeadConfig(epochs=1, seeds=seeds)), runs, device=device)
            for m in MEMBERS]


def run_case(case: str, work: Path, seeds: tuple[int, ...], device: str) -> dict:
    """One case in this (fresh) process: its seconds, the row's weighted F1, peak RSS."""
    from fgembed.store import FeatureStore

    store = FeatureStore.open(work / "store.zarr")
    members = _singles(store, work / "runs", seeds, device)  # reused: trained by the parent
    started = time.perf_counter()
    if case == "late-val":
        from fgembed.analysis.ensemble import score
        from fgembed.analysis.plan import Combination
        from fgembed.classify.intervals import BootstrapConfig
        base = members[0].config
        entry, = score(store, work / "runs", [Combination("late", MEMBERS)], base, device=device, late_weights="val",
                       bootstrap=BootstrapConfig(0))
        f1 = entry.metrics["f1"]
    elif case == "gated":
        from fgembed.classify.gated import fit_gated
        f1 = fit_gated(store, members, work / "runs", device=device, force=True).metrics["f1"]
    else:
        raise SystemExit(f"unknown case {case}")
    return {"seconds": time.perf_counter() - started, "f1": f1,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_child(case: str, work: Path, seeds: str, device: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--work", str(work), "--seeds", seeds,
                           "--device", device], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cub")
    parser.add_argument("--seeds", default="0", help="seeds of the singles (a gate per seed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, alternately")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the store and runs here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.child:
        print(json.dumps(run_case(args.child, args.work, seeds, args.device)))
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="fgembed-gated-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    print(f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}; shape {args.shape}: {shape.classes} classes, {shape.train}/{shape.val}/{shape.test} "
          f"train/val/test rows, dims {shape.dims}, seeds {args.seeds}", flush=True)
    if not (work / "store.zarr").exists():
        from fgembed.store import FeatureStore
        build_store(work / "store.zarr", shape)
        _singles(FeatureStore.open(work / "store.zarr"), work / "runs", seeds, args.device)
    in_child("gated", work, args.seeds, args.device)  # warm-up: the page cache, the gated run's folder
    results: dict[str, list[dict]] = {"late-val": [], "gated": []}
    for _ in range(args.repeats):
        for case, found in results.items():
            found.append(in_child(case, work, args.seeds, args.device))
    summary = {}
    for case, found in results.items():
        seconds = sorted(r["seconds"] for r in found)
        summary[case] = (seconds[0], seconds[len(seconds) // 2], max(r["peak_rss_mb"] for r in found) / 1024)
        print(f"{case:9s} {seconds[0]:7.2f} / {summary[case][1]:7.2f} s (min / median of {args.repeats})  peak "
              f"{summary[case][2]:.2f} GiB  F1 (w) {found[0]['f1']:.4f}", flush=True)
    print(f"gated / late-val: {summary['gated'][1] / summary['late-val'][1]:.2f}× (medians), "
          f"{summary['gated'][0] / summary['late-val'][0]:.2f}× (mins)")


if __name__ == "__main__":
    main()
