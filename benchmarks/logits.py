"""Writing a run's logits: the previous path against today's `_logits.write_head_logits`, same run.

What `fit_run` does after training, at a smaller iNat shape by default (10,000 classes; 8,000 val
and 12,000 test rows, iNat's 25:40 ratio; a tiny head 256 → 64 → 10,000 so the forward is not the
point): predict val and test, mask held-out columns, store `logits.zarr/{val,test}` float16
`[seeds, rows, classes]` chunked `(1, LOGIT_ROWS, classes)`, score the test split from the stored
float16 values (MetricCounts) and take its argmax for the frequency bins.

  old       the loop fit_run had until 2026-11-23: `head.predict_logits` (a float32 host copy),
            masked and cast to float16 by numpy, written under zarr's default zstd codec with
            the empty-chunk check, scored in the same thread; the argmax re-read from the store.
  new       `_logits.write_head_logits`: forward, mask and float16 cast on the head's device (half the
            bytes to the host), one whole chunk per write, no codec, written and scored by a
            thread while the next block is predicted; the argmax taken while scoring.
  new-zstd  the new path under the old codec (zarr's default zstd): what the codec costs alone.

Each candidate runs in a fresh interpreter (its peak RSS is its own), after a warm-up on two
blocks of each split; candidates alternate within each repeat. Reported: wall time min / median,
peak RSS (and what it grew over the inputs), bytes on disk, old/new ratio; the stored logits and
metrics of old and new are compared for equality.

Usage: python benchmarks/logits.py [--quick] [--repeats N] [--classes C] [--val N] [--test N]
       [--dim D] [--hidden H] [--seeds S] [--holdout F] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from fgembed.classify import _logits
from fgembed.classify.heads import MLPHead
from fgembed.classify.metrics import MetricCounts
from fgembed.classify.trained import TestScores
from fgembed.devices import resolve_device

CASES = ("old", "new", "new-zstd")


def inputs(args) -> tuple[list, dict, dict, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded heads, design rows, store rows, masked classes, test labels, seen test rows."""
    rng = np.random.default_rng(0)
    device = resolve_device(args.device)
    heads = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        module = MLPHead(hidden=(args.hidden,))._build(args.dim, args.classes)
        with torch.no_grad():  # logits of a trained head's spread (std ~4), not random init's ~0.5
            module[-1].weight.mul_(8.0)
        params = MLPHead(hidden=(args.hidden,), random_state=seed, device=str(device)).get_params()
        head = MLPHead.from_state(params, args.dim, args.classes, module.state_dict())
        head.module_.to(device)
        heads.append(head)
    X = {s: rng.normal(size=(n, args.dim)).astype(np.float16) for s, n in (("val", args.val), ("test", args.test))}
    rows = {"val": np.arange(args.val), "test": np.arange(args.val, args.val + args.test)}
    excluded = np.sort(rng.choice(args.classes, int(args.holdout * args.classes), replace=False))
    y_test = rng.integers(0, args.classes, args.test)
    seen = ~np.isin(y_test, excluded)
    return heads, X, rows, excluded, y_test, seen


def old_path(group, heads, X, rows, excluded, n_classes, y_test, seen):
    """fit_run's logits loop as it was before the float16 logits writer (runs.py `_train`), verbatim but for names."""
    counts = [MetricCounts(n_classes) for _ in heads]
    for split in ("val", "test"):
        Xs = X[split]
        array = group.create_array(split, shape=(len(heads), len(Xs), n_classes), dtype="float16",
                                   chunks=(1, _logits.LOGIT_ROWS, n_classes))
        group.create_array(f"{split}_rows", data=rows[split].astype(np.int64))
        for k, fitted in enumerate(heads):
            for start in range(0, len(Xs), _logits.LOGIT_ROWS):
                z = np.asarray(fitted.predict_logits(Xs[start:start + _logits.LOGIT_ROWS]), np.float32)
                z[:, excluded] = _logits.MASKED
                z = z.astype(np.float16)
                array[k, start:start + len(z)] = z
                if split == "test":
                    keep = seen[start:start + len(z)]
                    counts[k].update(z[keep].astype(np.float32), y_test[start:start + len(z)][keep])
    per_seed = [c.metrics() for c in counts]
    preds = [np.asarray(group["test"][k]).astype(np.float32).argmax(1) for k in range(len(heads))]
    return per_seed, preds


def candidate(case: str, group, heads, X, rows, excluded, n_classes, y_test, seen):
    if case == "old":
        return old_path(group, heads, X, rows, excluded, n_classes, y_test, seen)
    _logits.LOGIT_COMPRESSORS = "auto" if case == "new-zstd" else None  # "auto": zarr's default (zstd)
    scorers = [_Scorer(y_test, seen, n_classes) for _ in heads]  # what fit_run scores each test block with
    _logits.write_run_logits(group, [h.module_ for h in heads], X, rows, [("", n_classes, excluded)],
                             lambda k, start, blocks: scorers[k].update(start, blocks))
    return [s.counts.metrics() for s in scorers], [s.pred for s in scorers]


class _Scorer(TestScores):
    """fit_run's test scorer without the frequency bins (this benchmark has no train counts)."""

    def __init__(self, y: np.ndarray, seen: np.ndarray, n_classes: int) -> None:
        super().__init__(y, seen, n_classes, np.zeros(n_classes, np.int64), (20, 100))


def child(case: str, out: Path, args) -> dict:
    heads, X, rows, excluded, y_test, seen = inputs(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    warm = {s: x[:2 * _logits.LOGIT_ROWS] for s, x in X.items()}
    warm_rows = {s: r[:2 * _logits.LOGIT_ROWS] for s, r in rows.items()}
    candidate(case, zarr.open_group(out / "warm.zarr", mode="w"), heads, warm, warm_rows, excluded, args.classes,
              y_test[:2 * _logits.LOGIT_ROWS], seen[:2 * _logits.LOGIT_ROWS])
    started = time.perf_counter()
    per_seed, preds = candidate(case, zarr.open_group(out / "logits.zarr", mode="w"), heads, X, rows, excluded,
                                args.classes, y_test, seen)
    seconds = time.perf_counter() - started
    np.save(out / "preds.npy", np.stack(preds))
    (out / "metrics.json").write_text(json.dumps(per_seed))
    size = sum(p.stat().st_size for p in (out / "logits.zarr").rglob("*") if p.is_file())
    return {"seconds": seconds, "base_rss_mb": base, "bytes": size,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_child(case: str, out: Path, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", case, "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_results(a: Path, b: Path) -> str:
    """Whether two candidates stored the same logits and scored the same metrics and argmax."""
    ga, gb = zarr.open_group(a / "logits.zarr", mode="r"), zarr.open_group(b / "logits.zarr", mode="r")
    for name in ("val", "test", "val_rows", "test_rows"):
        if not all(np.array_equal(x, y) for x, y in zip(_blocks(ga[name]), _blocks(gb[name]))):
            return f"NO: {name} differs"
    if json.loads((a / "metrics.json").read_text()) != json.loads((b / "metrics.json").read_text()):
        return "NO: metrics differ"
    if not np.array_equal(np.load(a / "preds.npy"), np.load(b / "preds.npy")):
        return "NO: argmax differs"
    return "yes (logits bit-equal, metrics and argmax equal)"


def _blocks(array):
    if array.ndim == 1:
        yield array[:]
        return
    for k in range(array.shape[0]):
        for start in range(0, array.shape[1], _logits.LOGIT_ROWS):
            yield array[k, start:start + _logits.LOGIT_ROWS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 classes, 4,000 + 6,000 rows, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--val", type=int, default=8_000)
    parser.add_argument("--test", type=int, default=12_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--holdout", type=float, default=0.0, help="fraction of classes masked")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.classes, args.val, args.test, args.repeats = 2_000, 4_000, 6_000, 1
    if args.child:
        print(json.dumps(child(args.child, Path(args.out), args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--quick"] + ["--classes", str(args.classes), "--val", str(args.val),
                                                          "--test", str(args.test)]
    cases = args.cases.split(",")
    device = resolve_device(args.device)
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; torch {torch.__version__},"
          f" zarr {zarr.__version__}; {args.classes} classes, {args.val} val + {args.test} test rows, "
          f"{args.seeds} seed(s), head {args.dim}→{args.hidden}→{args.classes}, {args.holdout:.0%} masked", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for case in cases:
                out = Path(tmp) / case
                out.mkdir(exist_ok=True)
                results[case].append(in_child(case, out, argv))
                print(f"  repeat {repeat + 1} {case:9s} {results[case][-1]['seconds']:7.2f} s", flush=True)
        print("\n| candidate | seconds, min / median | peak RSS MiB (grown over inputs) | MiB on disk |")
        print("|---|---|---|---|")
        for case, rs in results.items():
            secs = [r["seconds"] for r in rs]
            peak = max(r["peak_rss_mb"] for r in rs)
            grown = max(r["peak_rss_mb"] - r["base_rss_mb"] for r in rs)
            print(f"| {case} | {min(secs):.2f} / {statistics.median(secs):.2f} | {peak:.0f} (+{grown:.0f}) "
                  f"| {rs[-1]['bytes'] / 2 ** 20:.0f} |")
        med = {c: statistics.median(r["seconds"] for r in rs) for c, rs in results.items()}
        if "old" in med and "new" in med:
            print(f"\nold / new (medians): {med['old'] / med['new']:.2f}×; same results: "
                  f"{same_results(Path(tmp) / 'old', Path(tmp) / 'new')}")
        if "new" in med and "new-zstd" in med:
            ratio = results["new-zstd"][-1]["bytes"] / results["new"][-1]["bytes"]
            print(f"zstd: {med['new-zstd'] / med['new']:.2f}× the new path's time for {ratio:.1%} of its bytes")


if __name__ == "__main__":
    main()
