"""iNat scale: the classifier stage against the previous approach, wall time and peak memory.

A synthetic iNat-2021-shaped store is generated in a temporary folder and filled through
`fgembed import` (`fgembed.extraction.interchange.import_features`, five `.npy` members of 768–1536 dims):
10,000 classes, 100,000 train, 25,000 val and 40,000 test rows. Each case runs in a fresh child process that reports its own wall time and peak
RSS (`resource.getrusage`), so no case inherits another's memory:

  (a) five single heads, one epoch each            new: `fit_run` over a float16 view (heads
                                                        in one batched loop, float16 logits)
                                                   old: members loaded float32, the previous
                                                        loop, float32 logits stacked
  (b) a five-member concat head, one epoch         same two paths, 5,632-d input
  (c) late fusion of all 26 subsets of five        new: `ensemble.score`, streamed over row blocks
                                                        (the scoring alone: no intervals, see (e))
                                                   old: per subset, every member's val and test
                                                        logits loaded, common rows copied, stacked
                                                        as float64 (the previous `ensemble._late`)
  (e) bootstrap intervals of that table            `ensemble.score` of the five singles and the 26
                                                        late subsets with 1,000 resamples (every row's
                                                        interval, every subset's paired difference to
                                                        its best member) against `--bootstrap 0`,
                                                        alternately, `--repeats` times each

The old (c) cannot run at full size on a 24 GB machine (40k × 10k logits × 5 members as float64
is 16 GB before the copies), so its ratio is taken on a second, smaller store (same 10,000
classes, 20,000 train, 3,000 val, 12,000 test rows) and the new path is shown at full size too.
With CUDA present, (d) times a 150-epoch iNat-shaped head and three seeds in one pass against one.

Targets (CPU): (c) ≥ 5× faster with ≥ 10× less peak memory than the old path; (e) ≤ 1.5 × the
scoring time without intervals, at the same peak memory. GPU: three seeds ≤ 1.4 × one, a
150-epoch iNat-shaped head ≤ 60 s.
Usage: python benchmarks/scale.py [--quick] [--parts a,b,c,d,e] [--repeats N] [--device auto|cpu|cuda] [--keep DIR]
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

from fgembed.classify.heads import MLPHead
from fgembed.classify.metrics import classification_metrics
from fgembed.datasets.table import SPLIT_NAMES, SampleTable, carve_validation
from fgembed.devices import resolve_device
from fgembed.extraction.interchange import import_features
from fgembed.store import FeatureStore

MEMBERS = ("m1", "m2", "m3", "m4", "m5")


@dataclass(frozen=True)
class Shape:
    classes: int
    train: int
    val: int        # given, not carved: a stratified carve needs ≥ 5 training rows per class
    test: int
    dims: tuple[int, ...]


FULL = Shape(10_000, 100_000, 25_000, 40_000, (768, 1024, 1024, 1280, 1536))
FUSION = Shape(10_000, 20_000, 3_000, 12_000, (768, 1024, 1024, 1280, 1536))  # the old late fusion survives it
QUICK = Shape(1_000, 10_000, 2_500, 4_000, (96, 128, 128, 160, 192))
QUICK_FUSION = Shape(1_000, 2_000, 500, 1_600, (96, 128, 128, 160, 192))


# ---- the synthetic store, built through `fgembed import` --------------------------------------
def build_store(path: Path, shape: Shape, seed: int = 0, members: tuple[str, ...] = MEMBERS) -> FeatureStore:
    """Rows in id order; each member a different noisy view of shared class latents, written as a
    float16 .npy and imported (row order match, as `fgembed import` does without ids). `members`
    picks a subset (case (d) alone needs only m3)."""
    rng = np.random.default_rng(seed)
    n = shape.train + shape.val + shape.test
    labels = np.arange(n) % shape.classes
    split = np.repeat(np.array([SPLIT_NAMES[s] for s in ("train", "val", "test")], np.uint8),
                      [shape.train, shape.val, shape.test])
    table = carve_validation(SampleTable("benchmark", "-", np.arange(n), [f"{i}.jpg" for i in range(n)], labels,
                                         [f"class {c}" for c in range(shape.classes)], split))  # keeps the given val
    store = FeatureStore.create(path, table)
    latent = rng.normal(size=(shape.classes, 32)).astype(np.float32)
    for index, (name, dim) in enumerate(zip(MEMBERS, shape.dims)):
        if name not in members:
            continue
        member_rng = np.random.default_rng((seed, index))  # own stream: m3 alone equals m3 of all five
        source = path.parent / f"{name}.npy"
        out = np.lib.format.open_memmap(source, mode="w+", dtype=np.float16, shape=(n, dim))
        projection = member_rng.normal(size=(32, dim)).astype(np.float32)
        for start in range(0, n, 16384):
            rows = slice(start, min(start + 16384, n))
            block = latent[labels[rows]] @ projection
            out[rows] = block + member_rng.normal(scale=6.0, size=block.shape).astype(np.float32)
        out.flush()
        del out
        import_features(store, name, source)
        source.unlink()
    return store


# ---- the previous approach, kept here as the baseline -----------------------------------------
def previous_train(make_model, X, y, X_val, y_val, n_classes: int, seeds: list[int], *, epochs: int, lr: float,
                   weight_decay: float, batch_size: int) -> list[dict]:
    """The previous loop: one nn.Module per seed, seeds one after another inside each epoch, the
    global RNG forked per seed for dropout, validation F1 per seed with a host sync."""
    from fgembed.classify.metrics import f1_torch
    device = X.device
    models, optimizers, generators, states = [], [], [], []
    with torch.random.fork_rng():
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(make_model().to(device))
            optimizers.append(torch.optim.AdamW(models[-1].parameters(), lr=lr, weight_decay=weight_decay))
            generators.append(torch.Generator(device=device).manual_seed(seed))
            states.append(torch.get_rng_state())
    best = [{"f1": -1.0, "state": None} for _ in seeds]
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for k, (model, optimizer, generator) in enumerate(zip(models, optimizers, generators)):
            with torch.random.fork_rng():
                torch.set_rng_state(states[k])
                model.train()
                order = torch.randperm(X.shape[0], device=device, generator=generator)
                for start in range(0, X.shape[0], batch_size):
                    idx = order[start:start + batch_size]
                    if len(idx) < 2:
                        continue
                    loss = loss_fn(model(X[idx]), y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                states[k] = torch.get_rng_state()
            model.eval()
            with torch.no_grad():
                f1 = f1_torch(y_val, model(X_val).argmax(1), n_classes)
            if f1 > best[k]["f1"]:
                best[k] = {"f1": f1, "state": {n: v.detach().clone() for n, v in model.state_dict().items()}}
    return best


def previous_fit_run(store: FeatureStore, members: tuple[str, ...], out: Path, epochs: int, device: torch.device) -> None:
    """The previous `runs._train`: every member as float32, concatenated, split slices copied,
    the previous loop, float32 logits of every seed stacked and written."""
    features = [store.features(m) for m in members]
    usable = np.logical_and.reduce([np.isfinite(f).all(1) for f in features])
    split, y = store.group["samples/split"][:], store.labels().astype(np.int64)
    rows = {s: np.flatnonzero((split == SPLIT_NAMES[s]) & usable) for s in ("train", "val", "test")}
    X = features[0] if len(features) == 1 else np.concatenate(features, axis=1)
    X_train, X_val = X[rows["train"]], X[rows["val"]]
    assert np.isfinite(X_train).all()
    n_classes, d = len(store.class_names), X.shape[1]
    make = lambda: MLPHead()._network(d, n_classes)
    t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)
    best = previous_train(make, t(X_train), t(y[rows["train"]], torch.long), t(X_val), t(y[rows["val"]], torch.long),
                          n_classes, [0], epochs=epochs, lr=1e-3, weight_decay=0.01, batch_size=128)
    modules = []
    for b in best:
        module = make().to(device)
        module.load_state_dict(b["state"])
        modules.append(module.eval())
    group = zarr.open_group(out / "logits.zarr", mode="w")
    for s in ("val", "test"):
        Xs = X[rows[s]]
        with torch.no_grad():
            stacked = np.stack([np.concatenate([m(t(Xs[i:i + 16384])).cpu().numpy() for i in range(0, len(Xs), 16384)])
                                for m in modules])
        group.create_array(s, data=stacked)
        group.create_array(f"{s}_rows", data=rows[s].astype(np.int64))
        if s == "test":
            per_seed = [classification_metrics(z, y[rows["test"]]) for z in stacked]
            (out / "metrics.json").write_text(json.dumps(per_seed))


def previous_late(store: FeatureStore, runs: dict[str, Path], subsets: list[tuple[str, ...]]) -> float:
    """The previous `ensemble._late`, one subset at a time: each member's val and test logits
    loaded whole, the common rows copied out, stacked as float64, fused seed by seed."""
    labels, best = store.labels().astype(np.int64), 0.0
    for subset in subsets:
        parts = {s: [_load(runs[m], s) for m in subset] for s in ("test", "val")}
        test_rows, test_logits = _common_rows(parts["test"])
        _common_rows(parts["val"])  # the previous code aligned val too (for --late-weights val)
        for k in range(min(z.shape[0] for z in test_logits)):
            stack = torch.as_tensor(np.stack([z[k] for z in test_logits]), dtype=torch.float64)
            fused = (torch.full((len(subset),), 1 / len(subset), dtype=torch.float64)[:, None, None] * stack).sum(0)
            best = max(best, classification_metrics(fused.float().numpy(), labels[test_rows])["f1"])
    return best


def _load(run: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(run / "logits.zarr", mode="r")
    return group[f"{split}_rows"][:], group[split][:].astype(np.float32)


def _common_rows(parts):
    common = parts[0][0]
    for rows, _ in parts[1:]:
        common = np.intersect1d(common, rows)
    return common, [logits[:, np.searchsorted(rows, common)] for rows, logits in parts]


# ---- the new path (views → batched heads → runs → streamed fusion) ----------------------------
def _config(members: tuple[str, ...], epochs: int = 1, seeds: tuple[int, ...] = (0,)):
    from fgembed.classify.config import HeadConfig, RunConfig
    from fgembed.classify.views import ViewConfig
    fusion = "single" if len(members) == 1 else "concat"
    return RunConfig(view=ViewConfig(features=members, fusion=fusion), head=HeadConfig(epochs=epochs, seeds=seeds))


def _fit(store: FeatureStore, members: tuple[str, ...], runs: Path, device: torch.device, **kw):
    from fgembed.classify.fitting import fit_run
    return fit_run(store, _config(members, **kw), runs, device=str(device))


def run_case(case: str, work: Path, device: torch.device) -> dict:
    """One case, in this (fresh) process; returns its wall time and whatever it reports."""
    store_name = "fusion.zarr" if case.endswith("-small") else "inat.zarr"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter, torch, the store
    store = FeatureStore.open(work / store_name)
    runs, old = work / f"runs-{store_name}", work / f"old-{store_name}"
    started, extra = time.perf_counter(), {}
    if case in ("single-new", "fusion-singles-small"):
        for m in MEMBERS:
            _fit(store, (m,), runs, device)
    elif case == "single-old":
        for m in MEMBERS:
            (old / m).mkdir(parents=True, exist_ok=True)
            previous_fit_run(store, (m,), old / m, 1, device)
    elif case == "concat-new":
        extra["input_dim"] = _fit(store, MEMBERS, runs, device).metrics.get("input_dim")
    elif case == "concat-old":
        (old / "concat").mkdir(parents=True, exist_ok=True)
        previous_fit_run(store, MEMBERS, old / "concat", 1, device)
    elif case.startswith("late-"):
        from fgembed.analysis.ensemble import score
        from fgembed.analysis.plan import plan
        from fgembed.classify.intervals import BootstrapConfig
        singles = {m: _fit(store, (m,), runs, device).path for m in MEMBERS}  # reused, not trained
        # (e): the table as `fgembed ensemble` scores it, singles included (the baseline of the deltas)
        table = case.startswith("late-ci")
        combos = [c for c in plan(list(MEMBERS), ["late"], ["all"]) if c.strategy == "late" or table]
        started = time.perf_counter()
        if case.startswith(("late-new", "late-ci")):
            entries = score(store, runs, combos, _config(("m1",)), device=str(device), late_weights="equal",
                            bootstrap=BootstrapConfig(1000 if case == "late-ci" else 0))
            extra["best_f1"] = max(e.metrics["f1"] for e in entries if e.combination.strategy == "late")
            if case == "late-ci":
                best = max((e for e in entries if e.combination.strategy == "late"), key=lambda e: e.metrics["f1"])
                extra["best_f1_ci"], extra["best_delta_f1"] = best.metrics["f1_ci"], best.metrics["delta_f1"]
                extra["best_delta_f1_ci"], extra["best_delta_f1_p"] = best.metrics["delta_f1_ci"], best.metrics[
                    "delta_f1_p"]
        else:
            extra["best_f1"] = previous_late(store, singles, [c.members for c in combos])
        extra["subsets"] = len(combos)
    elif case == "gpu-head":
        seconds = {}
        for seeds in ((0,), (0, 1, 2)):
            t0 = time.perf_counter()
            run = _fit(store, ("m3",), runs / f"gpu-{len(seeds)}", device, epochs=150, seeds=seeds)
            seconds[len(seeds)] = time.perf_counter() - t0
            extra[f"train_seconds_{len(seeds)}_seeds"] = run.metrics.get("train_seconds")
        extra["three_over_one"] = seconds[3] / seconds[1]  # whole fit_run: training, logits written
        extra["train_three_over_one"] = extra["train_seconds_3_seeds"] / extra["train_seconds_1_seeds"]
    else:
        raise SystemExit(f"unknown case {case}")
    return {"seconds": time.perf_counter() - started, **extra, "base_rss_mb": base_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_child(case: str, work: Path, device: str) -> dict:
    """Run a case in a fresh interpreter: its peak RSS is its own."""
    proc = subprocess.run([sys.executable, __file__, "--child", case, "--work", str(work), "--device", device],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
        return {"failed": f"exit {proc.returncode}: {reason}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bootstrap_cost(work: Path, device: str, repeats: int) -> None:
    """(e): the late table with and without its intervals, alternately (load hits both alike):
    seconds min / median, their ratio, and peak RSS."""
    runs = {"late-ci-off": [], "late-ci": []}
    for _ in range(repeats):
        for case, results in runs.items():
            results.append(in_child(case, work, device))
    if any("failed" in r for rs in runs.values() for r in rs):
        print(f"(e) bootstrap intervals: failed: {[r for rs in runs.values() for r in rs if 'failed' in r][:1]}")
        return
    seconds = {case: sorted(r["seconds"] for r in rs) for case, rs in runs.items()}
    median = {case: s[len(s) // 2] for case, s in seconds.items()}
    peak = {case: max(r["peak_rss_mb"] for r in rs) / 1024 for case, rs in runs.items()}
    best = runs["late-ci"][0]
    print(f"(e) late table (5 singles + 26 subsets), {repeats}× each: without intervals "
          f"{seconds['late-ci-off'][0]:.1f} / {median['late-ci-off']:.1f} s (min / median), peak {peak['late-ci-off']:.2f}"
          f" GiB; with 1,000 resamples {seconds['late-ci'][0]:.1f} / {median['late-ci']:.1f} s, peak "
          f"{peak['late-ci']:.2f} GiB; ratio {median['late-ci'] / median['late-ci-off']:.2f}× (medians), "
          f"{seconds['late-ci'][0] / seconds['late-ci-off'][0]:.2f}× (mins) (target ≤ 1.5×); best late F1 "
          f"{best['best_f1']:.4f} [{best['best_f1_ci'][0]:.4f}, {best['best_f1_ci'][1]:.4f}], Δ vs its best member "
          f"{best['best_delta_f1']:+.4f} [{best['best_delta_f1_ci'][0]:.4f}, {best['best_delta_f1_ci'][1]:.4f}] "
          f"p={best['best_delta_f1_p']:.3f}", flush=True)


def fmt(result: dict) -> str:
    if "failed" in result:
        return result["failed"]
    grown = (result["peak_rss_mb"] - result["base_rss_mb"]) / 1024
    return f"{result['seconds']:8.1f} s  peak {result['peak_rss_mb'] / 1024:5.2f} GiB (+{grown:.2f} over its start)"


def ratio(new: dict, old: dict) -> str:
    if "failed" in new or "failed" in old:
        return "n/a"
    grown = lambda r: max(r["peak_rss_mb"] - r["base_rss_mb"], 1.0)
    return (f"old/new: {old['seconds'] / new['seconds']:.1f}× time, {old['peak_rss_mb'] / new['peak_rss_mb']:.1f}× peak "
            f"memory, {grown(old) / grown(new):.1f}× memory grown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 classes and a tenth of the rows (smoke run)")
    parser.add_argument("--parts", default="a,b,c,d,e",
                        help="cases to run (d only with CUDA; c-ratio: only (c)'s ratio, on the smaller store)")
    parser.add_argument("--repeats", type=int, default=3, help="(e): runs of each of its two cases, alternately")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", help="build the stores in this folder and keep them (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, Path(args.work), resolve_device(args.device))))
        return
    device, parts = resolve_device(args.device), set(args.parts.split(","))
    full, small = (QUICK, QUICK_FUSION) if args.quick else (FULL, FUSION)
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        at_full = bool(parts - {"c-ratio"})  # c-ratio: only (c)'s old/new ratio on the smaller store
        if at_full:
            build_store(work / "inat.zarr", full, members=("m3",) if parts == {"d"} else MEMBERS)
        if parts & {"c", "c-ratio"}:
            build_store(work / "fusion.zarr", small, seed=1)
        shown = full if at_full else small
        print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f"; torch {torch.__version__}; store: {shown.classes} classes, {shown.train} train, "
              f"{shown.val} val, {shown.test} test rows, members {shown.dims} "
              f"(built through fgembed import in {time.perf_counter() - started:.0f} s)", flush=True)
        dev = str(device)
        # the new singles first: (c) fuses them at full size; (a)'s old path, the slowest, runs last
        singles = in_child("single-new", work, dev) if parts & {"a", "c"} else {}
        if parts & {"c", "c-ratio"}:
            in_child("fusion-singles-small", work, dev)
            new, old = in_child("late-new-small", work, dev), in_child("late-old-small", work, dev)
            print(f"(c) late fusion, 26 subsets, {small.test} test rows   new {fmt(new)}   old {fmt(old)}   "
                  f"{ratio(new, old)}   (target ≥ 5× time, ≥ 10× memory); best fused F1 new "
                  f"{new.get('best_f1', float('nan')):.4f}, old {old.get('best_f1', float('nan')):.4f}", flush=True)
        if "c" in parts:
            full_new = in_child("late-new", work, dev)
            gib = (5 * (full.test + full.val) * full.classes * 4 * 2 + 2 * 5 * full.test * full.classes * 8) / 2 ** 30
            print(f"    the same at full size, {full.test} test rows   new {fmt(full_new)}   old: not run (≈ {gib:.1f} "
                  "GiB: five members' logits, their row-aligned copies, the float64 stack and its weighted copy)",
                  flush=True)
        if "e" in parts:
            if not parts & {"a", "c"}:
                in_child("single-new", work, dev)
            bootstrap_cost(work, dev, args.repeats)
        if "b" in parts:
            new, old = in_child("concat-new", work, dev), in_child("concat-old", work, dev)
            print(f"(b) five-member concat, 1 epoch  new {fmt(new)}   old {fmt(old)}   {ratio(new, old)}", flush=True)
        if "a" in parts:
            old = in_child("single-old", work, dev)
            print(f"(a) five single heads, 1 epoch   new {fmt(singles)}   old {fmt(old)}   {ratio(singles, old)}",
                  flush=True)
        if "d" in parts and device.type == "cuda":
            gpu = in_child("gpu-head", work, dev)
            print(f"(d) GPU, 150-epoch iNat-shaped head (1024-d): {gpu}  (targets: one seed ≤ 60 s, "
                  f"three seeds ≤ 1.4 × one)", flush=True)
        elif "d" in parts:
            print("(d) GPU figures: no CUDA device here — they wait for a GPU", flush=True)


if __name__ == "__main__":
    main()
