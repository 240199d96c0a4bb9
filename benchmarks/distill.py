"""Distillation cost: a 150-epoch distilled student against a plain 150-epoch head on the same view.

CUB shape (5,994 train images, 20 % of them held out as val: 4,795 train + 1,199 val; 5,794
test; 200 classes), generated features written through the store's API as `fit.py` writes them,
five members of the reference widths 1024, 1024, 1536, 768, 1024. Each member sees its own
48-dimensional subspace of a 64-d class latent plus an image's own deviation from its class
(shared by every member: what no fusion removes) plus its own noise, so members are weak alone
(a nearest-mean classifier gets 67–78 %) and complementary (93 % on all five): a teacher with
something to teach. The teacher is the late fusion of all five single runs (trained first, at
the student's settings, as `fgembed distill` trains them); the student is member m1.

  plain    `fit_run` of m1's plain head: view, 150 epochs, logits, metrics.json
  distill  the same run distilled: view, the teacher's top-k targets from the five runs' saved
           heads (`distill.training_targets`), 150 epochs with the KD term, logits, metrics.json

Each case runs in a fresh child process (its peak RSS is its own), warmed up by a 2-epoch head
of the same shape first, `--repeat` times; printed: min and median seconds, their ratio, the
targets' share, peak RSS, and test accuracy of teacher, student and plain head.

Usage: python benchmarks/distill.py [--epochs 150] [--repeat 2] [--device auto] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.distill import plain_config, teacher_config, training_targets
from fgembed.classify.fitting import fit_run
from fgembed.classify.heads import MLPHead
from fgembed.classify.views import ViewConfig, build_view
from fgembed.datasets.table import SampleTable, carve_validation
from fgembed.store import FeatureStore

N_TRAIN, N_TEST, CLASSES = 5_994, 5_794, 200
MEMBERS = ("m1", "m2", "m3", "m4", "m5")
DIMS = (1024, 1024, 1536, 768, 1024)
LATENT, VIEW_RANK, DEVIATION, NOISE = 64, 48, 1.5, 24.0
STUDENT = MEMBERS[0]


def cub_store(path: Path, seed: int = 0) -> FeatureStore:
    """The CUB-shaped store of the module docstring (float16 members, val carved from train)."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    labels = np.arange(n) % CLASSES
    split = np.r_[np.zeros(N_TRAIN, np.uint8), np.full(N_TEST, 2, np.uint8)]
    table = carve_validation(SampleTable("benchmark", "-", np.arange(n), [f"{i}.jpg" for i in range(n)], labels,
                                         [f"class {c}" for c in range(CLASSES)], split), 0.2, 0)
    store = FeatureStore.create(path, table, shard_rows=4096)
    latent = rng.normal(size=(CLASSES, LATENT))[labels] + rng.normal(scale=DEVIATION, size=(n, LATENT))
    for name, dim in zip(MEMBERS, DIMS):
        view = np.linalg.qr(rng.normal(size=(LATENT, VIEW_RANK)))[0] @ rng.normal(size=(VIEW_RANK, dim))
        emb = latent @ view + rng.normal(scale=NOISE, size=(n, dim))
        store.prepare(name, {"benchmark": name}, dim)
        for shard in range(store.n_shards):
            rows = store.shard_slice(shard)
            store.write_shard(name, shard, emb[rows], np.zeros(rows.stop - rows.start, np.uint8))
        store.mark_complete(name, None)
    return store


def config(epochs: int) -> RunConfig:
    return RunConfig(ViewConfig(features=(STUDENT,)), HeadConfig(epochs=epochs, teacher=MEMBERS))


def child(case: str, store_path: str, runs: str, epochs: int, device: str) -> None:
    """One timed case in this process; prints one JSON line."""
    store = FeatureStore.open(store_path)
    student = config(epochs)
    teachers = [fit_run(store, teacher_config(student, m), runs, device=device) for m in MEMBERS]  # reused
    view = build_view(store, student.view, device=device)
    y, y_val = view.labels("train"), view.labels("val")
    MLPHead(epochs=2, device=device).fit_grid(view.X("train"), y, view.X("val"), y_val, seeds=[0],
                                              n_classes=view.n_classes())  # warm-up: thread pools, allocator
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    view = build_view(store, student.view, device=device)
    targets_s = 0.0
    if case == "plain":
        run = fit_run(store, plain_config(student), runs, device=device, force=True, view=view)
    else:
        t0 = time.perf_counter()
        view, targets = training_targets(store, view, teachers, student, device)
        targets_s = time.perf_counter() - t0
        run = fit_run(store, student, runs, device=device, force=True, view=view, soft_targets=targets)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - started, "targets_seconds": targets_s,
                      "train_seconds": run.metrics["train_seconds"], "accuracy": run.metrics["accuracy"],
                      "base_rss_mb": base, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "mean_residual": run.meta.get("distillation", {}).get("mean_residual")}))


def in_child(case: str, store: str, runs: str, epochs: int, device: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", case, "--store", store, "--runs", runs,
                           "--epochs", str(epochs), "--device", device], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def teacher_accuracy(store: FeatureStore, teachers: list) -> float:
    """Late fusion of the five runs' stored test logits (one seed), in numpy."""
    rows = teachers[0].rows("test")
    fused = np.mean([run.logits("test")[1][0].astype(np.float32) for run in teachers], 0)
    return float((fused.argmax(1) == store.labels()[rows]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", help="build the store and runs here and keep them")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args.case, args.store, args.runs, args.epochs, args.device)
        return
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        store_path, runs = str(Path(tmp) / "cub.zarr"), str(Path(tmp) / "runs")
        store = cub_store(Path(store_path))
        started = time.perf_counter()
        teachers = [fit_run(store, teacher_config(config(args.epochs), m), runs, device=args.device) for m in MEMBERS]
        accuracy = teacher_accuracy(store, teachers)
        print(f"teacher: {len(MEMBERS)} single runs of {args.epochs} epochs (what distill trains for them) in "
              f"{time.perf_counter() - started:.0f} s; late fusion test accuracy {100 * accuracy:.2f}")
        results = {case: [in_child(case, store_path, runs, args.epochs, args.device) for _ in range(args.repeat)]
                   for case in ("plain", "distill")}
    seconds = {case: sorted(r["seconds"] for r in rs) for case, rs in results.items()}
    median = {case: float(np.median(s)) for case, s in seconds.items()}
    for case, rs in results.items():
        peak = max(r["peak_rss_mb"] for r in rs) / 1024
        grown = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in rs) / 1024
        extra = (f"; teacher targets {min(r['targets_seconds'] for r in rs):.1f} s, mean residual mass "
                 f"{rs[0]['mean_residual']:.3f}" if case == "distill" else "")
        print(f"{case:8s} {args.epochs} epochs: {seconds[case][0]:.1f} / {median[case]:.1f} s (min / median; training "
              f"{min(r['train_seconds'] for r in rs):.1f} s), peak RSS {peak:.2f} GiB (+{grown:.2f} over its start)"
              f"{extra}; test accuracy {100 * rs[0]['accuracy']:.2f}")
    print(f"distill / plain: {median['distill'] / median['plain']:.2f}× (medians); load average now "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
