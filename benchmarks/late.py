"""Late fusion of every subset of five members in one pass: the streamed scorer against the
previous loop, on iNat-shaped test logits.

Five members' float16 test logits `[1, rows, classes]` are written as a run writes them
(`classify._logits.create_logits`: chunks of 4,096 rows, no codec): a shared class signal plus
each member's own noise, so a fused subset beats its members as real ones do. The 26 subsets of
two or more members are scored by:

  new  `late_stream.stream_late` (chunk-aligned blocks read once a block ahead in a thread,
       cache-sized pieces on one thread, each subset's sum one addition from an earlier one's,
       numpy's argmax and a one-pass top-5 count)
  old  the previous loop, kept here (one level, equal weights: what this case runs): blocks of
       2**25 float32 over the members, each subset summed afresh by `late.combine`, torch's
       argmax and topk as `MetricCounts` had them, torch's default threads

Each run is a fresh child process (peak RSS: VmHWM, and its growth over the child's start); a warm-up pair on a small shape first, then `--repeats` pairs, old and new alternately
(load hits both alike). Printed: min / median seconds, old / new, peak, and how far the two
agree (max |Δ| over the 26 subsets of accuracy, weighted F1 and top-5).
Usage: python benchmarks/late.py [--quick] [--repeats N] [--mode logits|proba] [--keep DIR]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from fgembed.analysis.late_stream import LateScores, LogitSource, stream_late
from fgembed.classify.late import combine, prepare
from fgembed.classify.metrics import MetricCounts, _counts

FULL = (40_000, 10_000)   # test rows, classes: iNat 2021's test split as benchmarks/scale.py shapes it
QUICK = (4_000, 1_000)
WARM = (2_000, 500)
MEMBERS = 5
SUBSETS = [s for r in range(2, MEMBERS + 1) for s in itertools.combinations(range(MEMBERS), r)]


def build(folder: Path, rows: int, classes: int, seed: int = 0) -> None:
    """Five members' logits: unit noise, 0.8² of its variance shared by all members (their errors
    agree, as real backbones' do), the true class lifted by about the largest of the others'
    noise (√(2 ln C)), less 0.6 to 0.0 (each member its own)."""
    from fgembed.classify._logits import LOGIT_ROWS, create_logits
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    np.save(folder / "labels.npy", y)
    groups = [zarr.open_group(folder / f"m{m}.zarr", mode="w") for m in range(MEMBERS)]
    arrays = [create_logits(group, "test", 1, rows, classes) for group in groups]
    for start in range(0, rows, LOGIT_ROWS):
        stop = min(rows, start + LOGIT_ROWS)
        shared = 0.8 * rng.standard_normal((stop - start, classes), dtype=np.float32)
        for m, array in enumerate(arrays):
            z = shared + 0.6 * rng.standard_normal((stop - start, classes), dtype=np.float32)
            z[np.arange(stop - start), y[start:stop]] += np.sqrt(2 * np.log(classes)) - 0.6 + 0.15 * m
            array[0:1, start:stop] = z[None].astype(np.float16)
    for group in groups:
        group.create_array("test_rows", data=np.arange(rows))


# ---- the previous loop, kept as the baseline -------------------------------------------------
class PreviousCounts(MetricCounts):
    """`MetricCounts.update` as it was: torch's argmax, topk and bincounts over all classes."""

    def update(self, logits, y_true) -> torch.Tensor:
        logits, y = torch.as_tensor(logits), torch.as_tensor(y_true, dtype=torch.long)
        pred = logits.argmax(1)
        tp, support, predicted = _counts(y, pred, self.n_classes)
        self.tp += tp
        self.support += support
        self.predicted += predicted
        self.top5 += int((logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]).any(1).sum())
        self.correct += int((pred == y).sum())
        self.rows += len(y)
        return pred


class PreviousScores(LateScores):
    def __init__(self, widths: list[int]) -> None:
        super().__init__(widths)
        self.counts = [PreviousCounts(w) for w in widths]


def previous_stream_late(sources: list[LogitSource], subsets: list[tuple[int, ...]], labels: np.ndarray,
                         mode: str) -> list[dict]:
    """The previous `stream_late_levels`, one level, equal weights: per block of 2**25 float32 over
    the members, each member widened (and softmaxed) into a zero-filled block, each subset summed
    afresh by `combine`, then counted."""
    union = functools.reduce(np.union1d, [s.rows for s in sources])
    n_classes = int(sources[0].array.shape[2])
    block = int(np.clip(2 ** 25 // (len(sources) * n_classes), 64, 4096))
    scores = [PreviousScores([n_classes]) for _ in subsets]
    for start in range(0, len(union), block):
        rows = union[start:start + block]
        aligned = []
        for source in sources:  # the previous `_aligned`
            lo, hi = np.searchsorted(source.rows, [rows[0], rows[-1] + 1])
            own = source.rows[lo:hi]
            idx = np.minimum(np.searchsorted(own, rows), len(own) - 1)
            present = own[idx] == rows
            out = torch.zeros(len(rows), n_classes)
            out[torch.as_tensor(present)] = prepare(source.array[0, lo:hi], mode)[torch.as_tensor(idx[present])]
            aligned.append(out)
        y = torch.as_tensor(labels[rows])
        for subset, score in zip(subsets, scores):
            score.update([combine([aligned[m] for m in subset], None, mode)], [y], None)
    return [s.metrics(None, None, (20, 100)) for s in scores]


# ---- one run in a child process --------------------------------------------------------------
def peak_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec; getrusage's ru_maxrss keeps the forking
    parent's), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(which: str, folder: Path, mode: str) -> dict:
    if which == "build":
        build(folder, *json.loads((folder / "shape.json").read_text()))
        return {}
    base = peak_mb()
    labels = np.load(folder / "labels.npy")
    sources = []
    for m in range(MEMBERS):
        group = zarr.open_group(folder / f"m{m}.zarr", mode="r")
        sources.append(LogitSource(group["test_rows"][:], group["test"]))
    started = time.perf_counter()
    if which == "new":
        metrics = [per_seed[0] for per_seed, _, _ in stream_late(sources, SUBSETS, labels, mode)]
    else:
        metrics = previous_stream_late(sources, SUBSETS, labels, mode)
    return {"seconds": time.perf_counter() - started, "base_mb": base,
            "peak_mb": peak_mb(),
            "metrics": [{k: m[k] for k in ("accuracy", "f1", "top5")} for m in metrics]}


def in_child(which: str, folder: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--work", str(folder), "--mode", mode],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK[0]:,} rows, {QUICK[1]:,} classes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="logits", choices=("logits", "proba"))
    parser.add_argument("--keep", help="write the logits in this folder (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.mode)))
        return
    rows, classes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        warm, work = Path(tmp) / "warm", Path(tmp) / "work"
        for folder, shape in ((warm, WARM), (work, (rows, classes))):  # built in a child: this process stays small
            folder.mkdir()
            (folder / "shape.json").write_text(json.dumps(shape))
            in_child("build", folder, args.mode)
        print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
              f"numpy {np.__version__}, zarr {zarr.__version__}; {MEMBERS} members' float16 test logits, "
              f"{rows:,} rows × {classes:,} classes, {len(SUBSETS)} subsets, mode {args.mode}", flush=True)
        for which in ("old", "new"):
            in_child(which, warm, args.mode)
        results = {"old": [], "new": []}
        for _ in range(args.repeats):
            for which, runs in results.items():
                runs.append(in_child(which, work, args.mode))
                print(f"  {which}: {runs[-1]['seconds']:.1f} s", flush=True)
    seconds = {w: sorted(r["seconds"] for r in runs) for w, runs in results.items()}
    median = {w: s[len(s) // 2] for w, s in seconds.items()}
    for which, runs in results.items():
        peak, base = max(r["peak_mb"] for r in runs), min(r["base_mb"] for r in runs)
        print(f"{which}: {seconds[which][0]:.1f} / {median[which]:.1f} s (min / median), peak {peak:,.0f} MiB "
              f"(+{peak - base:,.0f} over the child's start)")
    agree = max(abs(a[k] - b[k]) for a, b in zip(results["old"][0]["metrics"], results["new"][0]["metrics"])
                for k in ("accuracy", "f1", "top5"))
    best = max(m["f1"] for m in results["new"][0]["metrics"])
    print(f"old / new: {median['old'] / median['new']:.2f}× (medians), {seconds['old'][0] / seconds['new'][0]:.2f}× "
          f"(mins); metrics max |Δ| {agree:.1e}; best subset F1 {best:.4f} (target: the 26 subsets ≤ 40 s at "
          "40,000 × 10,000 on a quiet 2-core machine, at the same peak memory)")


if __name__ == "__main__":
    main()
