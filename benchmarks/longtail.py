"""Long-tail re-balancing on a synthetic store: many / medium / few-shot accuracy per `--balance`.

    python benchmarks/longtail.py [--quick] [--device cpu|cuda] [--seeds 0,1,2]

A store with 100 classes whose training counts follow a Zipf law (500 rows for the head class
down to 5 for the tail; val and test balanced, 10 and 20 rows per class) is written through the
store's own API; each class is a Gaussian around its own mean, so the tail is hard only because
it is rare. The same MLP head is trained once per `--balance` mode (`fgembed.classify.fitting.fit_run`, the
code `fgembed fit` runs) and the table prints accuracy per shot bin (20, 100), overall accuracy
and macro F1, mean over seeds. No timing: the figures are accuracies.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.train import BALANCES
from fgembed.classify.views import ViewConfig
from fgembed.datasets.table import SampleTable
from fgembed.store import FeatureStore


def zipf_counts(n_classes: int, largest: int = 500, smallest: int = 5) -> np.ndarray:
    """Training rows per class ∝ 1 / rank^s, with s chosen so the ends are `largest` and `smallest`."""
    s = np.log(largest / smallest) / np.log(n_classes)
    return np.maximum(smallest, np.round(largest / np.arange(1, n_classes + 1) ** s)).astype(int)


def write_store(path: Path, counts: np.ndarray, d: int = 64, val: int = 10, test: int = 20, seed: int = 0,
                spread: float = 0.2) -> FeatureStore:
    rng = np.random.default_rng(seed)
    C = len(counts)
    labels = np.concatenate([np.repeat(np.arange(C), counts), np.repeat(np.arange(C), val),
                             np.repeat(np.arange(C), test)])
    split = np.concatenate([np.zeros(counts.sum()), np.ones(C * val), np.full(C * test, 2)]).astype(np.uint8)
    n = len(labels)
    table = SampleTable("longtail", "/synthetic", np.arange(1, n + 1), [f"c{y}/{i}.jpg" for i, y in enumerate(labels)],
                        labels, [f"class {c}" for c in range(C)], split, {})
    store = FeatureStore.create(path, table, shard_rows=4096)
    means = rng.normal(size=(C, d)) * spread
    emb = (means[labels] + rng.normal(size=(n, d)) / np.sqrt(d) * 4).astype(np.float32)
    store.prepare("synthetic", {"source": "benchmarks/longtail.py", "seed": seed}, d, dtype="float32")
    for shard in range(store.n_shards):
        rows = store.shard_slice(shard)
        store.write_shard("synthetic", shard, emb[rows], np.zeros(len(emb[rows]), np.uint8))
    store.mark_complete("synthetic", None)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 epochs, one seed (a smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    seeds = (0,) if args.quick else tuple(int(s) for s in args.seeds.split(","))
    epochs = 30 if args.quick else 100
    counts = zipf_counts(args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "longtail.zarr", counts)
        print(f"{args.classes} classes, {counts.sum()} train rows ({counts.max()}…{counts.min()} per class), "
              f"MLP head, {epochs} epochs, seeds {','.join(map(str, seeds))}; {platform.processor() or platform.machine()}"
              f", torch {torch.__version__}, device {args.device}")
        print("| --balance | many | medium | few | accuracy | F1 (macro) | classes many/medium/few |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for balance in BALANCES:
            config = RunConfig(ViewConfig(features=("synthetic",)),
                               HeadConfig(epochs=epochs, seeds=seeds, balance=balance))
            m = fit_run(store, config, Path(tmp) / "runs", device=args.device).metrics
            bins = m["by_frequency"]
            cells = [f"{100 * bins[b]['accuracy']:.1f}" for b in ("many", "medium", "few")]
            sizes = "/".join(f"{bins[b]['n_classes']:.0f}" for b in ("many", "medium", "few"))
            print(f"| {balance} | {' | '.join(cells)} | {100 * m['accuracy']:.1f} | {100 * m['f1_macro']:.1f} | {sizes} |",
                  flush=True)


if __name__ == "__main__":
    main()
