"""The reference paper's iNat-2021 study as one command: every row of its Table III, plus gated
late fusion and a distilled student, from an iNat-2021-train_mini-shaped store.

"Fine Grained Image Classification Using Image Embedding Ensembles" (Işıktaş) reports, on
iNaturalist 2021, five single backbones, concatenation and PCA-sum of (DINOv3 + DINOv2) and
(DINOv3 + ConvNeXt), and late fusion of all five, of DINOv3 + DINOv2 + ConvNeXt and of the two
pairs. This script builds a store of that shape through `fgembed import` (400,000 train,
100,000 val, 100,000 test rows, 10,000 classes, the five reference widths: DINOv3 ViT-L/16
1024, DINOv2 ViT-L/14 1024, ConvNeXt V2-L 1536, OpenCLIP ViT-L/14 768, SigLIP ViT-L/16 1024;
generated features, each a noisy view of shared class latents) and scores those rows with the
commands a user runs — `fgembed ensemble` (150 epochs, three seeds, 95 % bootstrap intervals),
then input-gated late fusion of all five, and `fgembed distill` of a DINOv3 student from the
five-member teacher — each as its own timed step.

With CUDA it runs the whole study and prints the table and each step's wall time (target: the
study ≤ 15 minutes on one H200, the store's build not counted). On CPU it prints the plan and
runs the same study at one epoch and one seed: each head's training time is one epoch of it
(`train_seconds` in the run's metrics.json), and the step times say what the rest costs.
`--scale 0.01` shrinks every split (a pipeline check in about a minute).

Usage: python benchmarks/study.py [--device auto|cpu|cuda] [--scale F] [--epochs N]
       [--seeds 0,1,2] [--keep DIR]
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
from scale import MEMBERS, Shape, build_store  # noqa: E402  (the store generator the scale benchmark uses)

from fgembed.classify.gate import GateConfig  # noqa: E402
from fgembed.devices import resolve_device  # noqa: E402

PAPER_NAMES = dict(zip(MEMBERS, ("DINOv3", "DINOv2", "ConvNeXt V2", "OpenCLIP", "SigLIP")))
INAT_MINI = Shape(10_000, 400_000, 100_000, 100_000, (1024, 1024, 1536, 768, 1024))
DINOV3, DINOV2, CONVNEXT = MEMBERS[:3]
# Table III's fusion rows: (strategy, members); the singles come with every table
FUSIONS = [("late", MEMBERS), ("late", (DINOV3, DINOV2, CONVNEXT)), ("late", (DINOV3, DINOV2)),
           ("late", (DINOV3, CONVNEXT)), ("concat", (DINOV3, DINOV2)), ("concat", (DINOV3, CONVNEXT)),
           ("sum", (DINOV3, DINOV2)), ("sum", (DINOV3, CONVNEXT))]


def scaled(shape: Shape, factor: float) -> Shape:
    """Every split shrunk by `factor`, at least two rows per class in train (a class seen once
    cannot be scored) — classes too shrink below 1.0 so the rows per class stay iNat's."""
    classes = max(10, round(shape.classes * min(1.0, factor * 10)))
    rows = lambda n: max(2 * classes, round(n * factor))
    return Shape(classes, rows(shape.train), rows(shape.val), rows(shape.test), shape.dims)


def fgembed(*args: str) -> tuple[float, str]:
    """One fgembed command as a user runs it; its wall time and stdout (a failure stops the study)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fgembed", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"fgembed {args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - started, proc.stdout


def plan_lines(epochs: int, seeds: str) -> list[str]:
    named = lambda members: " + ".join(PAPER_NAMES[m] for m in members)
    lines = [f"single  {PAPER_NAMES[m]} ({m})" for m in MEMBERS]
    lines += [f"{strategy:7s} {named(members)}" for strategy, members in FUSIONS]
    lines += [f"gated   {named(MEMBERS)} (per-image member weights, trained on val)",
              f"distill {PAPER_NAMES[DINOV3]} student of the {named(MEMBERS)} teacher"]
    return [f"{line}   [{epochs} epochs, seeds {seeds}]" for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every split (a pipeline check)")
    parser.add_argument("--epochs", type=int, help="default: 150 with CUDA, 1 on the CPU")
    parser.add_argument("--seeds", help="default: 0,1,2 with CUDA, 0 on the CPU")
    parser.add_argument("--keep", help="build the store and runs in this folder and keep them")
    args = parser.parse_args()
    device = resolve_device(args.device)
    full = device.type == "cuda"
    epochs, seeds = args.epochs or (150 if full else 1), args.seeds or ("0,1,2" if full else "0")
    shape = scaled(INAT_MINI, args.scale) if args.scale != 1.0 else INAT_MINI
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if full else "") + f"; torch {torch.__version__}")
    print(f"store: {shape.classes} classes, {shape.train} train, {shape.val} val, {shape.test} test rows, "
          f"members {', '.join(f'{m}={PAPER_NAMES[m]} ({d})' for m, d in zip(MEMBERS, shape.dims))}")
    print("plan:\n  " + "\n  ".join(plan_lines(epochs, seeds)), flush=True)
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        work = Path(tmp)
        store, runs = str(work / "inat.zarr"), str(work / "runs")
        started = time.perf_counter()
        build_store(Path(store), shape)
        print(f"store built through fgembed import in {time.perf_counter() - started:.0f} s", flush=True)
        common = ["--store", store, "--runs", runs, "--epochs", str(epochs), "--seeds", seeds,
                  "--device", str(device)]
        combos = ",".join(f"{s}:{'+'.join(m)}" for s, m in FUSIONS)
        steps: dict[str, float] = {}
        steps["ensemble (singles and Table III fusions)"], _ = fgembed(
            "ensemble", *common, "--members", ",".join(MEMBERS), "--strategies", "late,concat,sum",
            "--combinations", combos, "--name", "table3", "--quiet")
        steps["gated late fusion of all five"], _ = fgembed(
            "ensemble", *common, "--members", ",".join(MEMBERS), "--strategies", "gated",
            "--combinations", "gated:full", "--name", "gated", "--quiet")
        steps["distilled DINOv3 student"], distilled = fgembed(
            "distill", *common, "--teacher", ",".join(MEMBERS), "--student", DINOV3, "--json", "--quiet")
        student = json.loads(distilled)["student"]["runs"][0]
        _, table = fgembed("ensemble", *common, "--members", ",".join(MEMBERS), "--strategies",
                           "late,concat,sum,gated", "--combinations", f"{combos},gated:full",
                           "--run", student, "--name", "study", "--quiet")
        print(table)
        heads = {}
        for metrics in sorted(Path(runs).glob("*/metrics.json")):
            record = json.loads(metrics.read_text())
            if "train_seconds" in record:
                heads[metrics.parent.name] = record["train_seconds"]
        print(f"training time per run ({epochs} epoch{'s' * (epochs > 1)}, seeds {seeds}; a gate trains for its "
              f"own GateConfig.epochs = {GateConfig.epochs}): "
              + ", ".join(f"{name} {s:.1f} s" for name, s in heads.items()))
        for step, seconds in steps.items():
            print(f"  {step:45s} {seconds:8.1f} s")
        total = sum(steps.values())
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
        target = "  (target ≤ 15 min on one H200)" if full and args.scale == 1.0 else ""
        print(f"study: {total:.0f} s ({total / 60:.1f} min), largest step peak RSS {peak:.2f} GiB{target}")


if __name__ == "__main__":
    main()
