"""CPU threads for head training: fgembed's choice against torch's default, idle and under load.

torch starts one intra-op thread per core. A head's training step is a chain of small kernels;
when another process holds a core, the thread waiting for it stalls every barrier of every
kernel. fgembed trains a small step on one thread and a large one on every core the process
really has (`fgembed.classify.train.cpu_threads`). This times, in fresh processes (thread pools
start clean), the same training run under

  fgembed   the policy (one thread below `SMALL_STEP_MACS` multiply-adds per step)
  all       torch's default: every available core, whatever the step

for a demo-sized head (d=64, 12 classes), a CUB-sized head (1024-d, 200 classes) and three
CUB-sized seeds in one pass, first on an idle machine, then beside `--load N` busy-loop
processes (default: as many as the available cores). Prints min / median wall seconds per cell,
the ratio all / fgembed, and peak RSS. Usage: python benchmarks/threads.py [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import subprocess
import sys
import time

import numpy as np

SHAPES = {  # name → (dim, classes, train rows, seeds, epochs)
    "demo head (64-d, 12 classes)": (64, 12, 260, 1, 150),
    "CUB head (1024-d, 200 classes)": (1024, 200, 4795, 1, 10),
    "CUB head, 3 seeds in one pass": (1024, 200, 4795, 3, 10),
}


def _train(dim: int, classes: int, rows: int, seeds: int, epochs: int, policy: str) -> tuple[float, float]:
    """One run in this process: (wall seconds of train_grid, peak RSS in MiB)."""
    import torch

    from fgembed.classify import train
    from fgembed.classify.heads import MLPHead

    if policy == "all":
        train.SMALL_STEP_MACS = 0  # every step counts as large: every available core, as torch's default
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)) * 2
    y = np.arange(rows + rows // 4) % classes
    X = torch.tensor(centres[y] + rng.normal(size=(len(y), dim)), dtype=torch.float16)
    y = torch.as_tensor(y)
    make = lambda: MLPHead(device="cpu")._network(dim, classes)  # noqa: E731
    started = time.perf_counter()
    train.train_grid(make, X[:rows], y[:rows], X[rows:], y[rows:], classes, list(range(seeds)), [1e-3], [0.01],
                     epochs=epochs, batch_size=128)
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _busy() -> None:
    while True:
        pass


def _cell(shape: tuple, policy: str, repeats: int) -> tuple[list[float], float]:
    times, peak = [], 0.0
    for _ in range(repeats + 1):  # the first run warms the page cache and imports: not counted
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps([*shape, policy])],
                             capture_output=True, text=True, check=True).stdout
        seconds, rss = json.loads(out.strip().splitlines()[-1])
        times.append(seconds)
        peak = max(peak, rss)
    return times[1:], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", type=int, default=None, help="busy-loop processes beside the runs "
                        "(default: the available cores)")
    parser.add_argument("--quick", action="store_true", help="2 repeats, the demo and one CUB shape")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_train(*json.loads(args.one))))
        return
    from fgembed.classify.train import SMALL_STEP_MACS
    from fgembed.cpu import available_cores

    cores = available_cores()
    repeats = 2 if args.quick else args.repeats
    shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {cores} available cores; "
          f"one thread below {SMALL_STEP_MACS:,} MACs per step; {repeats} runs per cell after one warm-up")
    for load in (0, cores if args.load is None else args.load):
        busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(load)]
        for p in busy:
            p.start()
        try:
            print(f"\n{'idle' if not load else f'beside {load} busy-loop processes'}")
            print(f"{'':34} {'fgembed min / med':>18} {'all cores min / med':>20} {'all/fgembed':>12} {'peak MiB':>9}")
            for name, shape in shapes.items():
                ours, peak_ours = _cell(shape, "fgembed", repeats)
                theirs, peak_theirs = _cell(shape, "all", repeats)
                print(f"{name:34} {min(ours):8.2f} / {np.median(ours):6.2f} s {min(theirs):9.2f} / "
                      f"{np.median(theirs):6.2f} s {np.median(theirs) / np.median(ours):11.2f}x "
                      f"{max(peak_ours, peak_theirs):8.0f}", flush=True)
        finally:
            for p in busy:
                p.terminate()


if __name__ == "__main__":
    main()
