"""The flamingo-or-bird paper's per-level table and Zusin's novelty table from cached CUB features.

    python examples/hierarchy_cub.py --store paper-output/cub.zarr --runs paper-output/runs-cub \\
        --backbone dinov2_vitl14 [--seeds 0,1,2 --epochs 150 --lr 1e-3,3e-4 --plots paper-output]

`make hierarchy-cub CUB_ROOT=…` extracts the backbone, then runs this. It fits the three
multi-level heads on order → family → species (`--hierarchy independent|shared|disentangled`,
the flamingo-or-bird paper's "vanilla multi", "vanilla single" and "ours"), prints their per-level accuracy, mean ± std
over the seeds, beside the flamingo-or-bird paper's Table 2 (an end-to-end fine-tuned CNN, not frozen features: a
reference, not a target), the consistent path-product decoding and the "deepest confident level"
points (the flamingo-or-bird paper's "flamingo or bird"); then fits the shared head (Zusin's two heads) with a fraction of
the families held out and prints Zusin's novelty table at each level. Finished runs are reused, so
a second call only prints. Figures go to `--plots`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fgembed.analysis.novelty import format_table, plot_roc
from fgembed.analysis.novelty_runs import score_runs
from fgembed.classify.hierarchy_metrics import (
    SELECTIVE_TAUS,
    curve_of_points,
    plot_selective_curve,
    tau_key,
)
from fgembed.classify.config import HeadConfig, RunConfig
from fgembed.classify.fitting import fit_run
from fgembed.classify.rundir import Run
from fgembed.classify.views import ViewConfig
from fgembed.errors import FgembedError
from fgembed.store import FeatureStore

LEVELS = ("order", "family", "species")
HEADS = {"independent": "vanilla multi", "shared": "vanilla single", "disentangled": "ours (split + reinforce)"}
# the flamingo-or-bird paper, Table 2, CUB-200-2011: order, family, species and avg acc, percent as printed (mean of 3 runs)
PAPER_004 = {"independent": (95.13, 89.70, 78.31, 87.71), "shared": (95.38, 87.70, 74.24, 85.77),
             "disentangled": (96.37, 90.39, 77.95, 88.24)}
POINTS = (0.5, 0.7, 0.9, 0.99)  # of SELECTIVE_TAUS, for the printed table (the plot has them all)


def pct(block: dict, key: str) -> str:
    """'mean ± std' in percent (– where the run has no value)."""
    if block.get(key) is None:
        return "–"
    return f"{100 * block[key]:.2f} ± {100 * (block.get(key + '_std') or 0):.2f}"


def level_table(runs: dict[str, Run]) -> str:
    """the flamingo-or-bird paper's per-level table (argmax per level), with the consistency, the path-product decoder's
    avg accuracy and the mistake severity of each head; the flamingo-or-bird paper's own rows below ours."""
    header = ["Head", "004 name", "order acc", "family acc", "species acc", "avg acc", "consistency",
              "avg acc (path product)", "mistake severity (LCA depth)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name, run in runs.items():
        m = run.metrics
        levels = [m["levels"][lv] for lv in ("order", "family", "label")]
        severity = "–" if m["mistake_severity"] is None else f"{m['mistake_severity']:.2f}"
        lines.append("| " + " | ".join([name, HEADS[name], *(pct(b, "accuracy") for b in levels),
                                        pct(m, "avg_accuracy"), pct(m, "consistency"),
                                        pct(m["decoder"]["path_product"], "avg_accuracy"), severity]) + " |")
    for name, row in PAPER_004.items():
        lines.append("| " + " | ".join([f"004 paper: {HEADS[name]}", "", *(f"{v:.2f}" for v in row),
                                        "", "", ""]) + " |")
    return "\n".join(lines) + "\n"


def selective_table(runs: dict[str, Run]) -> str:
    """Accuracy at the answered level / specificity (1 = every row answered at species) per τ."""
    header = ["Head", *(f"τ={t:g}: accuracy / specificity" for t in POINTS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(POINTS)]
    for name, run in runs.items():
        points = run.metrics["selective"]
        cells = [points[tau_key(t)] for t in POINTS]
        lines.append("| " + " | ".join([name, *(f"{pct(c, 'accuracy')} / {c['specificity']:.2f}"
                                                for c in cells)]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    floats = lambda s: tuple(float(v) for v in s.split(","))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="the CUB feature store (fgembed extract)")
    parser.add_argument("--runs", type=Path, required=True, help="folder of run directories")
    parser.add_argument("--backbone", required=True, help="an extracted backbone of the store")
    parser.add_argument("--seeds", type=lambda s: tuple(int(v) for v in s.split(",")), default=(0, 1, 2))
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--lr", type=floats, default=(1e-3,), help="one or a grid, e.g. 1e-3,3e-4")
    parser.add_argument("--weight-decay", type=floats, default=(0.01,), help="one or a grid")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of families held out (novelty)")
    parser.add_argument("--holdout-level", default="family")
    parser.add_argument("--scores", default="msp,maxlogit,energy,knn,mahalanobis,gmm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plots", type=Path, default=None, help="folder for the selective and ROC figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    try:
        run(args)
    except FgembedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> None:
    store = FeatureStore.open(args.store)
    head = {"levels": LEVELS, "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr,
            "weight_decay": args.weight_decay, "batch_size": args.batch_size}

    def fit(view: ViewConfig, **h) -> Run:
        config = RunConfig(view, HeadConfig(**head, **h))
        done = fit_run(store, config, args.runs, device=args.device, progress=not args.quiet)
        if "selective" in done.metrics:
            return done
        # finished before metrics.json had the decoders and the selective points: refit it
        return fit_run(store, config, args.runs, device=args.device, progress=not args.quiet, force=True)

    view = ViewConfig(features=(args.backbone,))
    runs = {name: fit(view, hierarchy=name) for name in HEADS}
    seeds = ",".join(map(str, args.seeds))
    print(f"## 004: CUB order → family → species, {args.backbone}, accuracy % (mean ± std over seeds {seeds})\n")
    print(level_table(runs))
    if len(args.lr) * len(args.weight_decay) > 1:
        for name, r in runs.items():
            chosen = ", ".join(f"lr {c['lr']:g} wd {c['weight_decay']:g}" for c in r.metrics["chosen"])
            print(f"{name}: chosen per seed on the mean over levels of validation F1: {chosen}")
        print()
    taus = ", ".join(f"{t:g}" for t in SELECTIVE_TAUS)
    print(f"## the flamingo-or-bird paper's \"flamingo or bird\": answer at the deepest level whose max probability ≥ τ "
          f"(metrics.json `selective` has τ {taus})\n")
    print(selective_table(runs))
    if args.plots is not None:
        path = plot_selective_curve({n: curve_of_points(r.metrics["selective"]) for n, r in runs.items()},
                                    args.plots / "hierarchy-cub-selective.png")
        print(f"selective curves → {path}\n", file=sys.stderr)

    held = fit(ViewConfig(features=(args.backbone,), holdout=args.holdout, holdout_level=args.holdout_level),
               hierarchy="shared")
    result = score_runs([held.path], [s.strip() for s in args.scores.split(",") if s.strip()])
    print(f"## 001: novelty, {args.holdout:.0%} of the {args.holdout_level} groups held out "
          f"({len(held.meta['holdout_classes'])} species; {int(result.novel.sum())} novel of {len(result.novel)} "
          f"test rows; shared head, {held.path.name})\n")
    print(format_table(result.records, "md"))
    if args.plots is not None:
        path = plot_roc({n: (s, result.novel) for n, s in result.scores.items()}, args.plots / "hierarchy-cub-roc.png")
        print(f"ROC → {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
