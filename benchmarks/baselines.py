"""Which logistic-regression path is faster at CUB scale: scikit-learn's lbfgs or fgembed's torch
L-BFGS over row blocks (the `logreg` head)? Both minimise the same objective (C·Σ CE + ½‖W‖²)
from zero on the same float32 features; each is timed after a warm-up, repeated, min and median
reported, with the objective each reached and how often their predictions agree. Also times the
`knn` head's fit (k chosen on val) and prediction.

CUB-shaped features: 4,796 train / 1,198 val / 5,794 test rows, 1024-d, 200 classes (class
centres plus noise). Usage: python benchmarks/baselines.py [--quick] [--device cuda] [--repeats 3]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fgembed.classify.baselines import KNNHead, minimise_logreg


def features(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 0.12, (classes, d))  # neither trivial nor chance
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


def timed(fn, repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows, 50 classes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args()
    scale, classes = (10, 50) if args.quick else (1, 200)
    X, y = features(4796 // scale, 1024, classes, 1)
    Xv, yv = features(1198 // scale, 1024, classes, 2)
    Xt, yt = features(5794 // scale, 1024, classes, 3)
    device = torch.device(args.device)
    print(f"rows train/val/test {len(X)}/{len(Xv)}/{len(Xt)}, 1024-d, {classes} classes, C={args.C}, "
          f"max_iter={args.max_iter}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def sklearn_fit():
        return LogisticRegression(C=args.C, max_iter=args.max_iter, tol=1e-6).fit(X, y)

    Xd, yd = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)

    def torch_fit():
        linear = torch.nn.Linear(1024, classes).to(device)
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        value, _ = minimise_logreg(linear, Xd, yd, args.C, args.max_iter, 1e-6)
        return linear, value

    sk_times, model = timed(sklearn_fit, args.repeats)
    th_times, (linear, value) = timed(torch_fit, args.repeats)
    proba = model.predict_proba(X)
    sk_value = (args.C * -np.log(proba[np.arange(len(y)), y]).sum() + 0.5 * (model.coef_ ** 2).sum()) / (args.C * len(X))
    with torch.no_grad():
        ours = linear(torch.as_tensor(Xt, device=device)).argmax(1).cpu().numpy()
    theirs = model.predict(Xt)
    print("| logreg fit | min s | median s | objective / (C·n) | test accuracy |")
    print("|---|---:|---:|---:|---:|")
    print(f"| scikit-learn lbfgs | {min(sk_times):.2f} | {statistics.median(sk_times):.2f} | {sk_value:.5f} | "
          f"{(theirs == yt).mean():.4f} |")
    print(f"| fgembed torch L-BFGS | {min(th_times):.2f} | {statistics.median(th_times):.2f} | {value:.5f} | "
          f"{(ours == yt).mean():.4f} |")
    print(f"fgembed / scikit-learn (median): {statistics.median(th_times) / statistics.median(sk_times):.2f}; "
          f"predictions agree on {(ours == theirs).mean():.1%} of test rows")

    knn_times, head = timed(lambda: KNNHead(device=str(device)).fit(X, y, Xv, yv), args.repeats)
    start = time.perf_counter()
    accuracy = (head.predict(Xt) == yt).mean()
    print(f"knn: fit + k on val {statistics.median(knn_times):.2f} s (k={head.chosen_['k']}), predict "
          f"{len(Xt)} rows {time.perf_counter() - start:.2f} s, test accuracy {accuracy:.4f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
