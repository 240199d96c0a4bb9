"""PCA-sum views: fgembed's exact PCA (`PCASum`: scikit-learn's `covariance_eigh` solver on
float64 centred rows, or torch's `eigh` on a GPU) against the previous fit (scikit-learn's `PCA` with its
`auto` solver, which takes the randomized solver for 768 components of ≥ 1,024 dimensions).

Five float16 members of 768 / 1024 / 1024 / 1280 / 1536 dims (the paper's five), reduced to 768
components each and summed. Each member is class latents mixed in, plus noise with a decaying
spectrum under a random rotation, plus an offset mean (embeddings are not centred), so the
components are well defined and the candidates can be checked against a float64 reference.

  fit   `PCASum.fit` on 8,000 in-memory training rows
  view  `build_view(fusion="sum")` end to end on a store of those members (8,000 train, 2,000
        val, 8,000 test rows, 200 classes): read, fit, project every split
  inat  `PCASum.fit` at iNat shape, 100,000 training rows (the previous fit only with --inat-old:
        about 12× its 8,000-row time)

Every candidate runs in a fresh child process (its own peak RSS, `resource.getrusage`, shown also
as the growth over the child's RSS before the timed work): a warm-up on a small problem, then
`--repeats` timed runs, min and median. Agreement: each candidate's fused projection of 2,000
held-out rows against scikit-learn's `full` SVD in float64, as max |Δ| over the RMS of the
reference. A `cuda` candidate (the new path on the GPU) joins when torch sees one.
Usage: python benchmarks/views.py [--quick] [--cases fit,view,inat] [--repeats 3] [--inat-old]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import sklearn
import torch
from sklearn.decomposition import PCA

from fgembed.classify.fusion import PCASum
from fgembed.classify.views import ViewConfig, build_view
from fgembed.datasets.table import SPLIT_NAMES, SampleTable, carve_validation
from fgembed.extraction.interchange import import_features
from fgembed.store import FeatureStore

DIMS = (768, 1024, 1024, 1280, 1536)
QUICK_DIMS = (96, 128, 128, 160, 192)
HELD_OUT = 2_000


# ---- the previous approach, kept here as the baseline -----------------------------------------
def previous_fit_member(self: PCASum, i: int, train: np.ndarray) -> None:
    """The previous `PCASum.fit_member`: scikit-learn's PCA with its `auto` solver."""
    pca = PCA(n_components=self.n_components_, random_state=0).fit(train)
    self.means_[i], self.components_[i] = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


# ---- synthetic members ----------------------------------------------------------------------
def members(n: int, dims: tuple[int, ...], classes: int = 200, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """float16 [n, d] members of the same rows (labels row % classes): class latents through a
    random map, noise of a decaying spectrum under a random rotation, an offset mean."""
    labels = np.arange(n) % classes
    latent = np.random.default_rng(seed).normal(size=(classes, 32)).astype(np.float32)
    out = []
    for m, d in enumerate(dims):
        rng = np.random.default_rng(seed + 1 + m)
        mixing = rng.normal(size=(32, d)).astype(np.float32) / 4
        rotation = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
        scales = (2.0 * (1 + np.arange(d)) ** -0.35).astype(np.float32)
        offset = rng.normal(0, 2.0, d).astype(np.float32)
        x = np.empty((n, d), np.float16)
        for start in range(0, n, 8192):
            rows = slice(start, min(start + 8192, n))
            noise = (rng.normal(size=(rows.stop - start, d)).astype(np.float32) * scales) @ rotation
            x[rows] = latent[labels[rows]] @ mixing + noise + offset
        out.append(x)
    return out, labels


def build_store(path: Path, n_train: int, n_val: int, n_test: int, dims: tuple[int, ...]) -> FeatureStore:
    """A store of `members` rows, filled through `fgembed import` (float16 .npy files)."""
    n = n_train + n_val + n_test
    feats, labels = members(n, dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    split = np.repeat(np.array([SPLIT_NAMES[s] for s in ("train", "val", "test")], np.uint8),
                      [n_train, n_val, n_test])
    table = carve_validation(SampleTable("benchmark", "-", np.arange(n), [f"{i}.jpg" for i in range(n)], labels,
                                         [f"class {c}" for c in range(labels.max() + 1)], split))
    store = FeatureStore.create(path, table)
    for m, x in enumerate(feats):
        np.save(path.parent / f"m{m}.npy", x)
        import_features(store, f"m{m}", path.parent / f"m{m}.npy")
        (path.parent / f"m{m}.npy").unlink()
    return store


# ---- one candidate in a child process ---------------------------------------------------------
def child(spec: dict) -> dict:
    """Time one candidate (`old`, `new` or `cuda`) of one case; write its projection for the check."""
    old, device = spec["candidate"] == "old", "cuda" if spec["candidate"] == "cuda" else "cpu"
    patch = mock.patch.object(PCASum, "fit_member", previous_fit_member) if old else contextlib.nullcontext()
    dims = tuple(spec["dims"])
    if spec["case"] == "view":
        store = FeatureStore.open(spec["store"])
        config = ViewConfig(features=tuple(f"m{m}" for m in range(len(dims))), fusion="sum")
        run = lambda: build_view(store, config, device=device).fusion.pca  # the fitted PCASum
    else:
        feats = [f.astype(np.float32) for f in members(spec["rows"], dims)[0]]  # as a view hands them over
        run = lambda: PCASum(device=device).fit(feats)
    with patch:
        small, _ = members(500, tuple(d // 8 for d in dims), seed=1)  # warm-up: imports, BLAS threads, CUDA context
        PCASum(device=device).fit(small)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            projection = run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    np.savez(spec["out"], **projection.arrays())
    return {"times": times, "base_rss_mb": base_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"child {spec['case']}/{spec['candidate']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(projection_file: Path, held_out: list[np.ndarray] | None,
              reference: np.ndarray | None) -> tuple[float, np.ndarray | None]:
    """(max |Δ| / RMS against the reference, fused held-out rows) of a saved projection."""
    if held_out is None:
        return float("nan"), None
    with np.load(projection_file) as arrays:
        fused = PCASum.from_arrays(dict(arrays)).transform(held_out)
    return float(np.abs(fused - reference).max() / np.sqrt((reference ** 2).mean())), fused


def reference_rows(train: list[np.ndarray], held_out: list[np.ndarray], k: int) -> np.ndarray:
    """The fused held-out rows under scikit-learn's full SVD in float64 (the exact PCA)."""
    return sum(PCA(k, svd_solver="full").fit(t.astype(np.float64)).transform(h.astype(np.float64))
               for t, h in zip(train, held_out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="dims / 8 (96–192), 2,000 train rows, iNat 12,500")
    parser.add_argument("--cases", default="fit,view,inat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inat-old", action="store_true", help="also time the previous fit at iNat shape")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    dims = QUICK_DIMS if args.quick else DIMS
    n_train, n_inat = (2_000, 12_500) if args.quick else (8_000, 100_000)
    k = min(dims)
    candidates = ["old", "new"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, scikit-learn "
          f"{sklearn.__version__}, numpy {np.__version__}; members {dims}, {k} components; candidates "
          f"{', '.join(candidates)}; {args.repeats} repeats after a warm-up")
    print("| case | candidate | min s | median s | peak RSS MiB (growth) | max \\|Δ\\| / RMS vs float64 full SVD |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="fgembed-views-") as tmp:
        tmp = Path(tmp)
        for case in args.cases.split(","):
            rows = n_inat if case == "inat" else n_train
            # rows: train, then val (the view's), then the held-out rows checked (the view's test split)
            feats = members(rows + 2 * HELD_OUT, dims)[0] if case != "inat" else None  # no reference at iNat size
            held_out = [f[rows + HELD_OUT:] for f in feats] if feats else None
            reference = reference_rows([f[:rows] for f in feats], held_out, k) if feats else None
            spec = {"case": case, "dims": dims, "rows": rows, "repeats": args.repeats}
            if case == "view":  # `members` draws each row the same whatever n, so the store's train rows are `train`
                spec["store"] = str(build_store(tmp / "view" / "s.zarr", rows, HELD_OUT, HELD_OUT, dims).path)
            del feats
            medians, fused = {}, {}
            for candidate in candidates:
                if case == "inat" and candidate == "old" and not args.inat_old:
                    continue
                out = tmp / f"{case}-{candidate}.npz"
                result = run_child({**spec, "candidate": candidate, "out": str(out)})
                error, fused[candidate] = agreement(out, held_out, reference)
                medians[candidate] = statistics.median(result["times"])
                print(f"| {case} | {candidate} | {min(result['times']):.2f} | {medians[candidate]:.2f} | "
                      f"{result['peak_rss_mb']:.0f} (+{result['peak_rss_mb'] - result['base_rss_mb']:.0f}) | "
                      f"{error:.1e} |", flush=True)
            if "old" in medians:
                print(f"| {case} | old / new (median) | {medians['old'] / medians['new']:.1f}× | | | |")
            if "cuda" in medians and fused["new"] is not None:
                gap = np.abs(fused["cuda"] - fused["new"]).max() / np.sqrt((fused["new"] ** 2).mean())
                print(f"| {case} | new / cuda (median) | {medians['new'] / medians['cuda']:.1f}× | | | "
                      f"cuda vs new {gap:.1e} |")


if __name__ == "__main__":
    main()
