"""Extraction speed: fgembed against what a user would run instead, and against the pure forward.

Every candidate runs on the same generated 500×375 JPEGs (CUB-sized), same model, same
transform; warm-up first (imports, page cache, CUDA context), then `--repeats` runs of each,
interleaved, reported as min / median, with peak RSS of the largest process.

Cases (`--cases`, comma-separated):

- `cpu`: (1) the peer case: `timm:resnet50`, random init, fp32, 200 JPEGs, batch 32, as whole
  processes — fgembed (`python -m fgembed extract … --json --profile`), the naive script
  (`peers/naive.py`: timm model + timm transform + DataLoader), and thingsvision (`peers/
  thingsvision_peer.py`, under `--thingsvision-python`, which must have thingsvision installed; it
  pins TensorFlow and an older NumPy, so it lives in its own virtual environment). Whole process
  and steady state (after the first batch), ratios printed, fgembed's start-up in stages.
  (2) the thread split: the same job in-process with the forward's threads fixed at
  `cores − workers` (the previous policy), fixed at `cores`, and measured (`threads.py`).
- `gpu`: (1) the peer case: `timm:vit_large_patch14_dinov2.lvd142m` (ViT-L/14 at 518 px),
  random init, the naive script with bf16 autocast vs fgembed (bf16 weights), 4,096 images
  (`--peer-images 4096,16384` for more sizes), batch 128, `cores − 1` workers each; fgembed's
  steady state against the floor of the same model. (2) the feed-bound case: ViT-B/16 at batch
  256, CPU decode vs `--decode device`, against the floor. (3) floor MFU of the five reference
  architectures, eager and `--compile`: images/s of the forward alone on batches already on the
  GPU × FLOPs per image (`torch.utils.flop_counter`, multiply-add = 2) / the GPU's dense bf16 peak.

Usage: python benchmarks/extract.py --cases cpu [--thingsvision-python PATH] [--repeats 3]
       python benchmarks/extract.py --cases gpu [--repeats 1]     # one H200: ~5 minutes
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fgembed.backbones import REFERENCE, LoadOptions, load_backbone
from fgembed.cpu import available_cores
from fgembed.datasets import load_dataset
from fgembed.devices import DeviceModel, backend_flags, resolve_device, resolve_precision
from fgembed.extraction.bench import count_macs
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.images import load_rgb
from fgembed.synthetic import generate

PEERS = Path(__file__).parent / "peers"
CUB_SIZE = (500, 375)
UNIQUE = 1024  # distinct images generated; more are copies (decoding costs the same)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}  # dense, SXM where both


def say(text: str = "") -> None:
    print(text, flush=True)


def spread(values: list[float], unit: str = "") -> str:
    return f"min {min(values):8.2f}{unit}  median {statistics.median(values):8.2f}{unit}"


def _part(args: tuple[Path, int, int]) -> None:
    folder, count, seed = args
    generate(folder, groups=1, classes_per_group=1, per_class=count, size=CUB_SIZE, seed=seed, test_fraction=0)


def make_images(root: Path, n: int) -> Path:
    """`n` JPEGs in class folders under root/images (the `folder` format): up to UNIQUE drawn in
    parallel, the rest copies."""
    unique = min(n, UNIQUE)
    parts = min(16, available_cores(), unique)
    sizes = [len(c) for c in np.array_split(np.arange(unique), parts)]
    with multiprocessing.get_context("fork").Pool(parts) as pool:
        pool.map(_part, [(root / f"part{i}", s, i) for i, s in enumerate(sizes)])
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(parts):
        for folder in (root / f"part{i}" / "images").iterdir():
            folder.rename(images / f"{folder.name}_p{i}")
    files = sorted(images.rglob("*.jpg"))
    for k in range(n - unique):
        source = files[k % unique]
        shutil.copyfile(source, source.with_name(f"copy{k:06d}_{source.name}"))
    return images


# Runs a candidate and reports its wall time and the peak RSS of the largest process among it and
# its workers (RUSAGE_CHILDREN: each waited-for descendant's peak), on its own last stderr line.
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}),
      file=sys.stderr)
sys.exit(code)
"""


def run_process(cmd: list[str]) -> tuple[float, dict]:
    """(wall seconds of the whole process, the JSON report it printed last on stdout, with the
    peak RSS of its largest process added as `rss_mib`)."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… failed ({proc.returncode}): {proc.stderr[-3000:]}")
    measured = json.loads(proc.stderr.splitlines()[-1])
    lines = proc.stdout.splitlines()
    try:
        report = json.loads(lines[-1])
    except ValueError:  # fgembed --json: an indented object
        first = next(i for i, line in enumerate(lines) if line.startswith("{"))
        report = json.loads("\n".join(lines[first:]))
    return measured["wall"], {**report, "rss_mib": measured["rss_mib"]}


def fgembed_cmd(root: Path, store: Path, names: list[str], batch: int, device: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "fgembed", "extract", "--dataset", "folder", "--root", str(root), "--store",
           str(store), "--no-pretrained", "--val-fraction", "0", "--batch-size", str(batch), "--device", device,
           "--json", "--profile", "--quiet", *extra]
    for name in names:
        cmd += ["--backbone", name]
    return cmd


def peer_case(title: str, model: str, root: Path, tmp: Path, batch: int, device: str, repeats: int,
              thingsvision: str | None) -> float:
    """Whole processes side by side; returns fgembed's median steady images/s."""
    n = len(list(root.rglob("*.jpg")))
    workers = available_cores() - 1
    say(f"\n{title}: timm {model}, random init, {n} JPEGs of {CUB_SIZE[0]}×{CUB_SIZE[1]}, batch {batch}, "
        f"{workers} workers ({'bf16' if device.startswith('cuda') else 'fp32'})")
    candidates = {
        "naive script": lambda images, arch, tag: [sys.executable, str(PEERS / "naive.py"), str(images), arch,
                                                   str(tmp / f"naive{tag}.npy"), str(batch), str(workers), device],
        "fgembed": lambda images, arch, tag: fgembed_cmd(images, tmp / f"fg{tag}.zarr", [f"timm:{arch}"], batch,
                                                         device),
    }
    if thingsvision and not device.startswith("cuda"):
        candidates["thingsvision"] = lambda images, arch, tag: [
            thingsvision, str(PEERS / "thingsvision_peer.py"), str(images), arch, str(tmp / f"tv{tag}"), str(batch),
            device]
    warm = tmp / "warm" / "images"  # imports, bytecode, the CUDA context: warm for every candidate (tiny convnet)
    if not warm.exists():
        make_images(tmp / "warm", 2 * batch)
    for cmd in candidates.values():
        run_process(cmd(warm, "test_resnet", f"warm{n}"))
    results: dict[str, list[tuple[float, dict]]] = {k: [] for k in candidates}
    for i in range(repeats):
        for name, cmd in candidates.items():
            results[name].append(run_process(cmd(root, model, f"{n}-{i}")))
    say(f"  {'candidate':<14} {'whole process':>36}   {'steady img/s':>34}   peak RSS")
    for name, runs in results.items():
        say(f"  {name:<14} {spread([w for w, _ in runs], ' s')}   "
            f"{spread([r['steady_images_per_s'] for _, r in runs])}   {max(r['rss_mib'] for _, r in runs):,.0f} MiB")
    fg_whole = statistics.median(w for w, _ in results["fgembed"])
    fg_steady = statistics.median(r["steady_images_per_s"] for _, r in results["fgembed"])
    for name in (k for k in candidates if k != "fgembed"):
        whole = statistics.median(w for w, _ in results[name])
        steady = statistics.median(r["steady_images_per_s"] for _, r in results[name])
        say(f"  fgembed / {name}: whole process {fg_whole / whole:.2f}× the time, steady state "
            f"{steady / fg_steady:.2f}× the time per image")
    median = sorted(results["fgembed"], key=lambda r: r[0])[len(results["fgembed"]) // 2][1]
    say(f"  fgembed start-up of the median run ({median['startup_seconds']:.2f} s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in median["startup"].items()))
    if median.get("forward_threads"):
        say("  fgembed CPU forward threads (threads, other work in cores): "
            + " → ".join(f"{t} ({d:.2f})" for t, d in median["forward_threads"]))
    from fgembed.store import FeatureStore
    ours = FeatureStore.open(tmp / f"fg{n}-0.zarr").features(f"timm:{model}")
    theirs = np.load(tmp / f"naive{n}-0.npy")
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    say(f"  same features as the naive script (same seeded init): min cosine {cos.min():.6f}")
    return fg_steady


def thread_case(root: Path, tmp: Path, repeats: int) -> None:
    """The same fgembed job in-process under three thread policies."""
    from fgembed.extraction import _pass, threads

    class Fixed(threads.ForwardThreads):
        count = 1

        def __init__(self, workers: int) -> None:
            super().__init__(workers)
            self.threads = self._clamp(Fixed.count)
            self.history = [(self.threads, 0.0)]

        def _window(self, per_image: float, demand: float) -> None:
            pass

    cores = available_cores()
    table = load_dataset("folder", root, val_fraction=0)
    say(f"\nCPU thread split: timm:resnet50, {len(table)} JPEGs, batch 32, {cores - 1} worker(s), {cores} cores")
    policies = {f"fixed {cores - 1} (cores − workers)": cores - 1, f"fixed {cores} (all cores)": cores,
                "measured (threads.py)": None}
    rates: dict[str, list[float]] = {k: [] for k in policies}
    history = {}
    for i in range(repeats):
        for k, (label, fixed) in enumerate(policies.items()):
            Fixed.count = fixed or 0
            with contextlib.ExitStack() as stack:
                if fixed is not None:
                    stack.callback(setattr, _pass, "ForwardThreads", _pass.ForwardThreads)
                    _pass.ForwardThreads = Fixed
                summary = extract(table, tmp / f"threads-{k}-{i}.zarr", ["timm:resnet50"], ExtractOptions(
                    batch_size=32, device="cpu", progress=False, load=LoadOptions(pretrained=False)))
            rates[label].append(summary.steady_images_per_s)
            history[label] = summary.forward_threads
    for label, values in rates.items():
        say(f"  {label:<32} steady img/s {spread(values)}   threads {history[label]}")


def floor(names: list[str], table, batch: int, device: torch.device, precision: str, batches: int,
          compile_modes: tuple[bool, ...] = (False,)) -> tuple[dict[bool, list[float]], float, dict[bool, float]]:
    """Images/s of the forwards alone, per timed pass, for each compile mode (the models built once),
    FLOPs per image summed over the models, and seconds spent compiling; inputs prepared on the
    device beforehand."""
    resolved = resolve_precision(precision, device)
    images = [load_rgb(Path(table.root) / p)[0] for p in table.paths[:batch]]
    backbones, inputs, flops = [], [], 0
    for name in names:
        b = load_backbone(name, LoadOptions(pretrained=False), device, resolved.weights)
        flops += 2 * count_macs(b.embed, torch.zeros(1, *b.input_shape, device=device, dtype=resolved.weights))
        backbones.append(b)
        inputs.append(DeviceModel(b, device, resolved, False).prepare(
            torch.stack([b.transform(im) for im in images]).to(device)))
    rates, compiling = {}, {}
    for compile_model in compile_modes:
        models = [DeviceModel(b, device, resolved, compile_model) for b in backbones]
        rates[compile_model] = []
        with backend_flags(device, resolved), torch.inference_mode():
            began = time.perf_counter()
            for m, x in zip(models, inputs):  # warm-up: autotuning, compilation
                m.forward(x)
            sync(device)
            compiling[compile_model] = time.perf_counter() - began
            for _ in range(2):
                sync(device)
                start = time.perf_counter()
                for _ in range(batches):
                    for m, x in zip(models, inputs):
                        m.forward(x)
                sync(device)
                rates[compile_model].append(batches * batch / (time.perf_counter() - start))
    del backbones, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rates, flops, compiling


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given"
    if device.type != "cuda":
        return float("nan"), "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{key} dense bf16 spec"
    return float("nan"), f"unknown for {name}: pass --peak-tflops"


def fgembed_steady(root: Path, tmp: Path, names: list[str], batch: int, repeats: int, device: str,
                   *extra: str) -> list[dict]:
    runs = []
    for i in range(repeats):
        tag = f"{names[0].replace(':', '_')}-{'-'.join(extra) or 'cpu'}-{i}"
        wall, report = run_process(fgembed_cmd(root, tmp / f"{tag}.zarr", names, batch, device, *extra))
        runs.append({**report, "wall": wall})
    return runs


def identity_case(tmp: Path, rows: int) -> None:
    """Dataset identity and store set-up at scale: `rows` small files (a stat each, 16 sampled
    files hashed at both ends; never a read of every image)."""
    from fgembed.datasets.identity import file_identity
    from fgembed.datasets.table import TRAIN, SampleTable
    from fgembed.store import FeatureStore

    root = tmp / "many"
    paths = [f"{i // 1000:04d}/{i:07d}.jpg" for i in range(rows)]
    for folder in sorted({p.split("/")[0] for p in paths}):
        (root / folder).mkdir(parents=True)
    payload = bytes(4096)
    for p in paths:
        (root / p).write_bytes(payload)
    table = SampleTable("synthetic", str(root), np.arange(rows), paths, np.zeros(rows), ["x"], np.full(rows, TRAIN))
    began = time.perf_counter()
    file_identity(table)
    identity = time.perf_counter() - began
    began = time.perf_counter()
    FeatureStore.create(tmp / "many.zarr", table, names=["x"]).release()
    created = time.perf_counter() - began
    began = time.perf_counter()
    FeatureStore.create(tmp / "many.zarr", table, names=["x"]).release()
    reopened = time.perf_counter() - began
    say(f"\nDataset identity at {rows:,} rows (page cache warm): identity {identity:.2f} s "
        f"({1e6 * identity / rows:.1f} µs/row); store set-up {created:.2f} s (identity included); "
        f"a resume's check of the same store {reopened:.2f} s")


# What the GPU cases run; `--smoke` runs the same code on the CPU with tiny models (checks the script).
GPU = {"device": "cuda", "peer": "vit_large_patch14_dinov2.lvd142m", "peer_batch": 128, "feed": "vit_base_patch16_224",
       "feed_batch": 256, "feed_images": 4096, "floor_models": list(REFERENCE), "floor_batch": 128, "batches": 8}
SMOKE = {"device": "cpu", "peer": "test_vit", "peer_batch": 16, "feed": "test_vit", "feed_batch": 16,
         "feed_images": 48, "floor_models": ["timm:test_vit", "timm:test_resnet"], "floor_batch": 16, "batches": 2}


def gpu_cases(tmp: Path, args) -> None:
    setup = SMOKE if args.smoke else GPU
    device = resolve_device(setup["device"])
    begun = time.perf_counter()

    def within_budget(case: str) -> bool:
        spent = time.perf_counter() - begun
        if spent > args.budget_s:
            say(f"\n{case}: skipped, {spent:.0f} s spent of a {args.budget_s:.0f} s budget (--budget-s)")
            return False
        return True

    def elapsed() -> None:
        say(f"  [{time.perf_counter() - begun:.0f} s elapsed]")

    for n in args.peer_images:
        if not within_budget(f"GPU peer case ({n} images)"):
            continue
        root = make_images(tmp / f"peer{n}", n)
        steady = peer_case(f"GPU peer case ({n} images)", setup["peer"], root, tmp, setup["peer_batch"],
                           setup["device"], args.repeats, None)
        table = load_dataset("folder", root, val_fraction=0)
        rates, flops, _ = floor([f"timm:{setup['peer']}"], table, setup["peer_batch"], device, "auto",
                                setup["batches"])
        say(f"  floor (pure forward): {spread(rates[False])} img/s; {flops / 1e9:.1f} GFLOP/image; "
            f"fgembed steady / floor = {steady / statistics.median(rates[False]):.2f} (target ≥ 0.9)")
        elapsed()
    if not within_budget("GPU feed-bound case"):
        return
    root = make_images(tmp / "feed", setup["feed_images"])
    table = load_dataset("folder", root, val_fraction=0)
    model, batch = setup["feed"], setup["feed_batch"]
    say(f"\nGPU feed-bound case: timm:{model}, {setup['feed_images']} JPEGs, batch {batch}, "
        f"{available_cores() - 1} workers")
    rates = floor([f"timm:{model}"], table, batch, device, "auto", setup["batches"])[0][False]
    say(f"  floor (pure forward)              img/s {spread(rates)}")
    steady = {}
    for label, extra in (("CPU decode (workers)", ()), ("--decode device", ("--decode", "device"))):
        if extra and device.type != "cuda":
            say(f"  fgembed, {label:<22} skipped: needs CUDA")
            continue
        runs = fgembed_steady(root, tmp, [f"timm:{model}"], batch, args.repeats, setup["device"], *extra)
        steady[label] = statistics.median(r["steady_images_per_s"] for r in runs)
        say(f"  fgembed, {label:<22} steady img/s {spread([r['steady_images_per_s'] for r in runs])}; "
            f"whole process {spread([r['wall'] for r in runs], ' s')}; "
            f"/ floor {steady[label] / statistics.median(rates):.2f}")
    if len(steady) == 2:
        say(f"  device decode / CPU decode = {steady['--decode device'] / steady['CPU decode (workers)']:.2f} "
            "(target ≥ 2)")
    elapsed()
    peak, source = peak_tflops(device, args.peak_tflops)
    names = setup["floor_models"]
    say(f"\nGPU floor MFU: {len(names)} models ({', '.join(names)}), batch {setup['floor_batch']}, peak {peak} TFLOP/s "
        f"({source})")
    if not within_budget("floor MFU"):
        return
    rates, flops, compiling = floor(names, table, setup["floor_batch"], device, "auto", setup["batches"],
                                    (False, True))
    for compile_model, values in rates.items():
        mfu = statistics.median(values) * flops / (peak * 1e12)
        say(f"  {'--compile' if compile_model else 'eager':<10} {spread(values)} img/s  {flops / 1e9:.1f} GFLOP/image  "
            f"MFU {100 * mfu:.1f} %  (first batch {compiling[compile_model]:.0f} s)")
    elapsed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="cpu", help="any of cpu, identity, gpu, comma-separated")
    parser.add_argument("--repeats", type=int, help="runs of each candidate (default: cpu 3, gpu 1)")
    parser.add_argument("--images", type=int, default=200, help="JPEGs of the CPU peer case")
    parser.add_argument("--peer-images", default="4096", help="GPU peer case sizes, comma-separated")
    parser.add_argument("--thingsvision-python", help="a Python with thingsvision installed (CPU peer)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--skip-threads", action="store_true", help="CPU: leave out the thread-split case")
    parser.add_argument("--budget-s", type=float, default=420, help="GPU: start no case after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="run the GPU cases' code on the CPU with tiny models")
    parser.add_argument("--identity-rows", type=int, default=100_000, help="rows of the identity case")
    args = parser.parse_args()
    args.peer_images = [int(n) for n in args.peer_images.split(",")]
    cases = set(args.cases.split(","))
    say(f"machine: {platform.processor() or platform.machine()}, {available_cores()} cores available "
        f"(load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}, "
        f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "cpu" in cases:
            root = make_images(tmp / "cpu", args.images)
            peer_case("CPU peer case", "resnet50", root, tmp, 32, "cpu", args.repeats or 3, args.thingsvision_python)
            if not args.skip_threads:
                thread_case(root, tmp, args.repeats or 3)
        if "identity" in cases:
            identity_case(tmp, args.identity_rows)
        if "gpu" in cases:
            if not torch.cuda.is_available() and not args.smoke:
                say("\nGPU cases skipped: torch sees no CUDA device")
                return
            args.repeats = args.repeats or 1
            gpu_cases(tmp, args)


if __name__ == "__main__":
    main()
