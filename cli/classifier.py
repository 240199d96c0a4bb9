"""`fgembed fit`, `fgembed ensemble`: the classifier stage over a feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fgembed.errors import FgembedError

from ._common import app, err, out, print_json

STORE = typer.Option(..., help="Feature store written by `fgembed extract` (or `fgembed import`).")
RUNS = typer.Option(Path("runs"), help="Folder of run directories (one per head configuration).")


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise FgembedError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None


@app.command()
def fit(
    store: Path = STORE,
    features: str = typer.Option(..., help="One backbone, or several joined by + (then --fusion applies)."),
    fusion: str = typer.Option("concat", help="For several features: concat or sum."),
    head: str = typer.Option("mlp", help="mlp (d→512→256→C, the reference recipe) or linear."),
    project: str = typer.Option("pca", help="sum only: pca (fitted on train rows) or linear (learned)."),
    project_dim: Optional[int] = typer.Option(None, min=1, help="sum only: common dim (default: smallest member)."),
    l2: bool = typer.Option(False, help="concat/sum: L2-normalise each member first."),
    level: Optional[str] = typer.Option(None, help="Train on a taxonomy level (order, family…), not species."),
    epochs: int = typer.Option(150, min=1), lr: float = typer.Option(1e-3), weight_decay: float = typer.Option(0.01),
    batch_size: int = typer.Option(128, min=2),
    seeds: str = typer.Option("0", help="Comma-separated seeds, trained in one pass, reported as mean ± std."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    runs: Path = RUNS,
    force: bool = typer.Option(False, help="Retrain even if a finished run with this configuration exists."),
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a head on cached embeddings and score it on the test split.

    Writes one run directory (config, safetensors weights, history, metrics.json, val/test
    logits in Zarr). The same configuration on the same store is reused unless --force.
    """
    from fgembed.runs import RunConfig, fit_run
    from fgembed.store import FeatureStore

    names = tuple(features.split("+"))
    config = RunConfig(features=names, fusion=fusion, head=head, project=project,
                       project_dim=project_dim, l2=l2, level=level, epochs=epochs, lr=lr, weight_decay=weight_decay,
                       batch_size=batch_size, seeds=_seeds(seeds))
    run = fit_run(FeatureStore.open(store), config, runs, device=device, force=force, progress=not quiet)
    if as_json:
        print_json(run.metrics | {"run": str(run.path), "reused": run.reused})
        return
    m = run.metrics
    std = lambda k: f" ± {100 * m[k + '_std']:.2f}" if len(m["seeds"]) > 1 else ""  # noqa: E731
    state = "reused finished run" if run.reused else f"trained in {m['train_seconds']:.1f} s"
    out.print(f"{config.label}: {state} → {run.path}", highlight=False)
    out.print(f"test ({m['n_test']} rows, seeds {','.join(map(str, m['seeds']))}): "
              f"accuracy {100 * m['accuracy']:.2f}{std('accuracy')}  F1 (weighted) {100 * m['f1']:.2f}{std('f1')}  "
              f"F1 (macro) {100 * m['f1_macro']:.2f}  top-5 {100 * m['top5']:.2f}", highlight=False)
    if m.get("test_rows_dropped"):
        err.print(f"[yellow]{m['test_rows_dropped']} test rows left out: their image failed in a member[/yellow]")


@app.command()
def ensemble(
    store: Path = STORE,
    members: str = typer.Option(..., help="Comma-separated backbones to combine."),
    strategies: str = typer.Option("late,concat,sum", help="Any of late, concat, sum (comma-separated)."),
    combinations: str = typer.Option("all", help="Comma-separated: all (every subset of ≥2), pairs, full, singles, or "
                                     "a+b+c; prefix one with a strategy to limit it (late:full)."),
    head: str = typer.Option("mlp", help="Head of every run: mlp or linear."),
    project: str = typer.Option("pca", help="sum fusion: pca or linear."),
    l2: bool = typer.Option(False, help="concat/sum: L2-normalise each member first."),
    level: Optional[str] = typer.Option(None, help="Score a taxonomy level instead of species."),
    late_mode: str = typer.Option("logits", help="late fusion averages logits or proba."),
    late_weights: str = typer.Option("equal", help="late fusion weights: equal, or val (fitted on validation)."),
    epochs: int = typer.Option(150, min=1), lr: float = typer.Option(1e-3), weight_decay: float = typer.Option(0.01),
    batch_size: int = typer.Option(128, min=2), seeds: str = typer.Option("0", help="Comma-separated seeds."),
    device: str = typer.Option("auto"), runs: Path = RUNS,
    force: bool = typer.Option(False, help="Retrain every run."),
    fmt: str = typer.Option("md", "--format", help="Table printed to stdout: md, csv, latex or json."),
    name: str = typer.Option("ensemble", help="Output name: writes RUNS/NAME.{md,csv,tex,json,png}."),
    title: str = typer.Option("weighted F1 on the test split", help="Bar chart title."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Score single backbones and their fusions, ranked by weighted F1.

    Trains whatever runs are missing (finished runs are reused), then writes the table in
    every format and a bar chart of the ranking next to the runs.
    """
    from fgembed.ensemble import plan, score
    from fgembed.report import format_table, write_report
    from fgembed.runs import RunConfig
    from fgembed.store import FeatureStore

    names = [m.strip() for m in members.split(",") if m.strip()]
    if not names:
        raise FgembedError("--members needs at least one backbone name")
    combos = plan(names, [s.strip() for s in strategies.split(",") if s.strip()],
                  [c.strip() for c in combinations.split(",") if c.strip()])
    base = RunConfig(features=(names[0],), head=head, project=project, l2=l2, level=level, epochs=epochs, lr=lr,
                     weight_decay=weight_decay, batch_size=batch_size, seeds=_seeds(seeds))
    err.print(f"ensemble: {len(combos)} rows from {len(names)} members", highlight=False)
    entries = score(FeatureStore.open(store), runs, combos, base, device=device, force=force,
                    late_mode=late_mode, late_weights=late_weights, progress=not quiet)
    table = format_table(entries, fmt)
    written = write_report(entries, runs, name, title)
    if fmt == "md" and out.is_terminal:
        print_ranking(entries)
    else:
        out.file.write(table)
    err.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


def print_ranking(entries) -> None:
    """The ranked table on a terminal (the demo prints it too)."""
    from fgembed.report import METRICS, STRATEGY_NAMES, cell, entry_record

    grid = Table("#", "method", "members", *(title for _, title in METRICS))
    for i, e in enumerate(entries, 1):
        r = entry_record(e)
        grid.add_row(str(i), STRATEGY_NAMES[r["strategy"]], " + ".join(r["members"]), *(cell(r, k) for k, _ in METRICS))
    out.print(grid)


@app.command()
def demo(directory: Path = typer.Option(Path("demo-output"), "--out", help="Where images, store, runs and report go."),
         quiet: bool = typer.Option(False, help="No progress bars.")) -> None:
    """Offline demo of the whole pipeline on generated fine-grained images (under 3 min on 2 cores).

    Extracts three tiny random-init backbones (ViT, ConvNeXt, ResNet), trains single heads,
    scores concat, sum and late fusion of every subset and writes the ranked table and chart.
    """
    from fgembed.demo import DEMO_BACKBONES, run_demo

    err.print(f"demo: generated images, backbones {', '.join(DEMO_BACKBONES)} with random init "
              "(nothing is downloaded; the numbers show the pipeline, not the models)", highlight=False)
    result = run_demo(directory, progress=not quiet)
    s = result.extraction
    print_ranking(result.entries)
    out.print(f"images:  {result.images}\nstore:   {result.store}  ({s.rows} rows; "
              + ", ".join(f"{k} {v}-d" for k, v in s.backbones.items()) + f"; this run extracted {s.processed} "
              f"images in {s.seconds:.1f} s)\nruns:    {result.runs}  ({len(list(result.runs.iterdir()))} run "
              "directories)\nreport:  " + ", ".join(str(p) for p in result.report), highlight=False)
    out.print(f"next: fgembed info {result.store}; fgembed fit --store {result.store} --features "
              f"{DEMO_BACKBONES[0]} --seeds 0,1,2", highlight=False)
