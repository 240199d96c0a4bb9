"""`fgembed novelty`: open-set novelty scores of finished runs with held-out classes."""
from __future__ import annotations

from pathlib import Path

import typer

from ._common import app, err
from ._options import STORAGE_OPTION, at_least

RUN_DIRS = typer.Argument(..., metavar="RUN_DIR", help="Run directories (several: a late-fusion ensemble).")
SCORES = ("msp", "maxlogit", "energy", "knn", "mahalanobis", "gmm")


@app.command()
def novelty(
    run_dirs: list[Path] = RUN_DIRS,
    scores: str = typer.Option(",".join(SCORES), metavar="LIST", show_default=False,
                               help=f"Novelty scores (default: all of {', '.join(SCORES)})."),
    tau: float | None = typer.Option(None, metavar="X", help="MSP threshold of the fixed-τ row (default 0.5 at "
                                     "the fine level, 0.7 above)."),
    k: int = typer.Option(10, metavar="K", callback=at_least(1), help="Neighbours of the knn score."),
    target_tpr: float = typer.Option(0.95, metavar="X", help="Share of seen validation rows kept by the "
                                     "calibrated thresholds."),
    fmt: str = typer.Option("md", "--format", metavar="FMT", help="md, csv, latex or json."),
    plot: Path | None = typer.Option(None, metavar="PNG", help="Write ROC curves to this image."),
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Score how novel each test row is: held-out classes are the positives.

    Prints AUROC, AUPR, FPR@95 and the overall / seen / unseen accuracy of Zusin et al.,
    "Bird, Dog, or Reptile? Transfer Learning for Hierarchical Image Classification"; per-row
    scores go to the first run's novelty.zarr.
    """
    from fgembed.analysis.novelty import format_table, plot_roc
    from fgembed.analysis.novelty_runs import score_runs
    from fgembed.storage import parse_storage_options

    format_table([], fmt)  # refuses an unknown format before any work
    result = score_runs(run_dirs, [s.strip() for s in scores.split(",") if s.strip()], tau=tau, k=k,
                        target_tpr=target_tpr, storage_options=parse_storage_options(storage_option))
    typer.echo(format_table(result.records, fmt), nl=False)  # exact text: json/csv must parse
    err.print(f"per-row scores → {result.path}", highlight=False, markup=False)
    if not result.novel.any():  # e.g. every test image of the held-out classes failed: nothing to detect
        err.print("warning: no novel rows among the test rows: AUROC, AUPR and FPR@95 are undefined (null)"
                  + ("; no ROC plot" if plot is not None else ""), highlight=False, markup=False)
        return
    if plot is not None:
        plot_roc({name: (s, result.novel) for name, s in result.scores.items()}, plot)
        err.print(f"ROC → {plot}", highlight=False, markup=False)
