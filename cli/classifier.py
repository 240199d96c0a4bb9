"""`fgembed fit`, `fgembed ensemble`: the classifier stage over a feature store."""
from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.markup import escape

from fgembed.errors import FgembedError

from ._common import app, err, out, plural, print_json
from ._options import (
    BALANCE,
    BATCH_SIZE,
    BOOTSTRAP,
    FUSION,
    FUSION_KIND,
    LONG_TAIL,
    ROWS,
    CLASSES,
    DEVICE,
    DRAW,
    EPOCHS,
    HEAD,
    HIERARCHY,
    HOLDOUT,
    HOLDOUT_LEVEL,
    HOLDOUT_SEED,
    L2,
    LEVEL,
    LEVEL_WEIGHTS,
    LEVELS,
    LR,
    PROJECT,
    PROJECT_DIM,
    QUIET,
    RUNS,
    SEEDS,
    SHOT_BINS,
    SHOTS,
    STORAGE_OPTION,
    STORE,
    WEIGHT_DECAY,
    at_least,
    open_store,
    run_options,
    typed,
)

REPORT = "Report"


@app.command()
def fit(
    ctx: typer.Context,
    store: str = STORE, storage_option: list[str] = STORAGE_OPTION,
    features: str = typer.Option(..., metavar="A[+B…]", help="One backbone, or several joined by + (fused)."),
    head: str = HEAD, seeds: str = SEEDS,
    fusion: str = FUSION_KIND,
    project: str = PROJECT, project_dim: int | None = PROJECT_DIM, l2: bool = L2,
    epochs: int = EPOCHS, lr: str = LR, weight_decay: str = WEIGHT_DECAY, batch_size: int = BATCH_SIZE,
    classes: Path | None = CLASSES, holdout: float = HOLDOUT, holdout_level: str | None = HOLDOUT_LEVEL,
    holdout_seed: int = HOLDOUT_SEED, shots: int | None = SHOTS, draw: int = DRAW,
    draws: int = typer.Option(1, metavar="N", rich_help_panel=ROWS, callback=at_least(1),
                              help="With --shots: N seeded draws, reported as mean ± std over them."),
    level: str | None = LEVEL, levels: str = LEVELS, hierarchy: str = HIERARCHY, level_weights: str | None = LEVEL_WEIGHTS,
    balance: str = BALANCE, shot_bins: str = SHOT_BINS,
    device: str = DEVICE, runs: Path = RUNS,
    force: bool = typer.Option(False, "--force", help="Retrain even if a finished run of this configuration exists."),
    bootstrap: int = BOOTSTRAP,
    as_json: bool = typer.Option(False, "--json", help="Print metrics.json to stdout."),
    quiet: bool = QUIET,
) -> None:
    """Train a head on cached embeddings and score it on the test split.

    Writes one run directory (config, safetensors weights, history, metrics.json, val/test
    logits in Zarr). The same configuration on the same store is reused unless --force.
    """
    from fgembed.analysis.interval_cells import interval_text
    from fgembed.classify.fitting import fit_draws
    from fgembed.classify.intervals import BootstrapConfig
    from fgembed.classify.options import run_config

    opened = open_store(store, storage_option)
    given = run_options(typed(ctx, "store", "storage_option", "features", "draws", "device", "runs", "force",
                              "bootstrap", "as_json", "quiet"), opened.class_names)
    config = run_config(tuple(features.split("+")), **given)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        run, *others = fit_draws(opened, config, runs, draws, device=device, force=force, progress=not quiet,
                                 bootstrap=BootstrapConfig(bootstrap))
    for warning in caught:
        err.print(f"[yellow]warning: {escape(str(warning.message))}[/yellow]", highlight=False)
    if as_json:
        print_json(run.metrics | {"run": str(run.path), "reused": run.reused}
                   | ({"draws": [{"run": str(r.path), **r.metrics} for r in others]} if others else {}))
        return
    if others:
        _print_draws([run, *others], config.view.shots)
    m = run.metrics
    std = lambda k: f" ± {100 * m[k + '_std']:.2f}" if len(m["seeds"]) > 1 else ""  # noqa: E731
    ci = lambda k: interval_text(m.get(f"{k}_ci"))  # noqa: E731
    state = "reused finished run" if run.reused else f"trained in {m['train_seconds']:.1f} s"
    out.print(f"{config.label}: {state} → {run.path}", highlight=False, markup=False)
    out.print(f"test ({m['n_test']} rows, seeds {','.join(map(str, m['seeds']))}): "
              f"accuracy {100 * m['accuracy']:.2f}{std('accuracy')}{ci('accuracy')}  F1 (weighted) "
              f"{100 * m['f1']:.2f}{std('f1')}{ci('f1')}  F1 (macro) {100 * m['f1_macro']:.2f}{ci('f1_macro')}  "
              f"balanced accuracy {100 * m['mean_class_accuracy']:.2f}{ci('mean_class_accuracy')}  "
              f"top-5 {100 * m['top5']:.2f}", highlight=False, markup=False)
    if "bootstrap" in m:
        b = m["bootstrap"]
        out.print(f"[lo, hi]: {100 * b['confidence']:g} % percentile bootstrap interval over the {b['rows']} test "
                  f"images ({b['n_resamples']} resamples, seed {b['seed']})", highlight=False, markup=False)
    if len(config.head.lr) * len(config.head.weight_decay) > 1:
        chosen = ", ".join(f"seed {s}: lr {c['lr']:g} wd {c['weight_decay']:g}"
                           for s, c in zip(m["seeds"], m["chosen"]) if c)
        out.print(f"chosen on validation {selection_of(run)}: {chosen}", highlight=False, markup=False)
    if "by_frequency" in m:
        out.print("by training frequency: " + "  ".join(
            f"{b} ({plural(int(m['by_frequency'][b]['n_classes']), 'class')}) "
            + ("–" if m["by_frequency"][b]["accuracy"] is None else f"{100 * m['by_frequency'][b]['accuracy']:.2f}")
            for b in ("many", "medium", "few")), highlight=False)
    alias = {"label": "species"} if "species" in given.get("levels", ()) else {}  # the level as the user named it
    for name, lm in m.get("levels", {}).items():
        out.print(f"  {alias.get(name, name)}: accuracy {100 * lm['accuracy']:.2f}{std_of(lm, 'accuracy', m)}  "
                  f"F1 (weighted) {100 * lm['f1']:.2f}{std_of(lm, 'f1', m)}", highlight=False)
    if "levels" in m:
        severity = "–" if m["mistake_severity"] is None else f"{m['mistake_severity']:.2f}"
        out.print(f"avg accuracy {100 * m['avg_accuracy']:.2f}{std_of(m, 'avg_accuracy', m)}  consistency "
                  f"{100 * m['consistency']:.2f}  mistake severity (LCA depth) {severity}", highlight=False)
    if m.get("holdout_classes"):
        out.print(f"held out {plural(len(m['holdout_classes']), 'class')}: {plural(m['n_novel'], 'novel test row')} "
                  "(not scored here)",
                  highlight=False)
    dropped = {k: v for k, v in m.get("dropped", {}).items() if v}
    if dropped:
        err.print("[yellow]rows left out (an image failed in a member): "
                  + ", ".join(f"{k} {v}" for k, v in dropped.items()) + "[/yellow]")


def selection_of(run) -> str:
    """What picked the run's epoch and setting, as its config.json records it (`selection`:
    `f1_weighted`, `f1_macro` with --balance, `… (mean over levels)` with --levels). Format-1 runs
    recorded none: they all chose by weighted F1."""
    from fgembed.classify.train import selection

    return run.meta.get("selection") or selection(run.config.head.balance)


def std_of(block: dict, key: str, m: dict) -> str:
    """' ± std' (percent) of `block[key]` when the run has several seeds."""
    return f" ± {100 * block[key + '_std']:.2f}" if len(m["seeds"]) > 1 else ""


def _print_draws(runs: list, shots: int) -> None:
    """Few-shot results over several draws of the training rows: mean ± std over draws."""
    from fgembed.classify.fitting import draws_summary

    summary = draws_summary(runs)
    out.print(f"{len(runs)} draws of {shots} shots per class: accuracy {100 * summary['accuracy']:.2f} ± "
              f"{100 * summary['accuracy_std']:.2f}  F1 (weighted) {100 * summary['f1']:.2f} ± "
              f"{100 * summary['f1_std']:.2f}  F1 (macro) {100 * summary['f1_macro']:.2f} ± "
              f"{100 * summary['f1_macro_std']:.2f}  (first draw below)", highlight=False)


@app.command()
def ensemble(
    ctx: typer.Context,
    store: str = STORE, storage_option: list[str] = STORAGE_OPTION,
    members: str = typer.Option(..., metavar="A,B,…", help="Backbones to combine (a member may name its "
                                "head: name@knn)."),
    strategies: str = typer.Option("late,concat,sum", metavar="LIST", help="late, gated (per-image member "
                                   "weights, gate trained on val) and any registered fusion (concat, sum, …)."),
    combinations: str = typer.Option("all", metavar="LIST", help="all (every subset of ≥ 2), pairs, full, "
                                     "singles, or a+b+c; strategy: limits one (late:full)."),
    head: str = HEAD, seeds: str = SEEDS,
    late_mode: str = typer.Option("logits", metavar="KIND", rich_help_panel=FUSION,
                                  help="Late fusion averages logits or proba."),
    late_weights: str = typer.Option("equal", metavar="KIND", rich_help_panel=FUSION,
                                     help="Late fusion weights: equal, val (fitted on validation), or "
                                     "equal,val (both rows)."),
    project: str = PROJECT, project_dim: int | None = PROJECT_DIM, l2: bool = L2,
    epochs: int = EPOCHS, lr: str = LR, weight_decay: str = WEIGHT_DECAY, batch_size: int = BATCH_SIZE,
    level: str | None = LEVEL, levels: str = LEVELS, hierarchy: str = HIERARCHY, level_weights: str | None = LEVEL_WEIGHTS,
    balance: str = BALANCE, shot_bins: str = SHOT_BINS,
    by_frequency: bool = typer.Option(False, "--by-frequency", rich_help_panel=LONG_TAIL,
                                      help="Add many / medium / few-shot accuracy columns."),
    cost: bool = typer.Option(False, "--cost", rich_help_panel=REPORT,
                              help="Add GMACs per image (from `fgembed bench`) and a Pareto plot."),
    fmt: str = typer.Option("md", "--format", metavar="FMT", rich_help_panel=REPORT,
                            help="Table on stdout: md, csv, latex or json."),
    name: str = typer.Option("ensemble", metavar="NAME", rich_help_panel=REPORT,
                             help="Writes RUNS/NAME.{md,csv,tex,json,png}."),
    title: str = typer.Option("weighted F1 on the test split", metavar="TEXT", rich_help_panel=REPORT,
                              help="Bar chart title."),
    device: str = DEVICE, runs: Path = RUNS,
    added: list[Path] = typer.Option([], "--run", metavar="DIR", rich_help_panel=REPORT,
                                     help="A finished run to add as a row (repeatable), e.g. a distilled student."),
    force: bool = typer.Option(False, "--force", help="Retrain every run."),
    bootstrap: int = BOOTSTRAP,
    quiet: bool = QUIET,
) -> None:
    """Score single backbones and their fusions, ranked by weighted F1.

    Trains whatever runs are missing (finished runs are reused), then writes the table in
    every format and a bar chart of the ranking next to the runs. With --levels every run is
    multi-level and late fusion is scored level by level.
    """
    from fgembed.analysis.ensemble import late_weightings, score
    from fgembed.analysis.plan import plan, split_member
    from fgembed.analysis.report import extra_columns, format_table, write_report
    from fgembed.classify.fusion import fusion_strategies
    from fgembed.classify.intervals import BootstrapConfig
    from fgembed.classify.options import ensemble_config
    from fgembed.classify.fitting import check_levels
    from fgembed.classify.rundir import Run

    names = [m.strip() for m in members.split(",") if m.strip()]
    if not names:
        raise FgembedError("--members needs at least one backbone name")
    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    late_weightings(late_weights)  # a bad value: one line before any work
    if "gated" in chosen and len(names) < 2:
        raise FgembedError(f"--strategies gated weighs two or more --members; got {names[0]} alone")
    combos = plan(names, chosen, [c.strip() for c in combinations.split(",") if c.strip()])
    used = {c.strategy for c in combos}
    for option, value, uses in (("late_mode", late_mode, {"late", "gated"}), ("late_weights", late_weights, {"late"})):
        if option in typed(ctx) and not used & uses:
            raise FgembedError(f"--{option.replace('_', '-')} {value} sets late fusion; no row of this table is late")
    opened = open_store(store, storage_option)
    for member in names:
        opened.backbone_info(split_member(member)[0])  # an unknown member: one line, before any work
    given = run_options(typed(ctx, "store", "storage_option", "members", "strategies", "combinations", "late_mode", "late_weights",
                              "by_frequency", "cost", "fmt", "name", "title", "device", "runs", "added", "force", "bootstrap",
                              "quiet"),
                        opened.class_names)
    base = ensemble_config(names, [s for s in fusion_strategies() if s in used], **given)
    check_levels(opened, base)
    err.print(f"ensemble: {len(combos)} rows from {len(names)} member{'s' * (len(names) != 1)}", highlight=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        entries = score(opened, runs, combos, base, device=device, force=force,
                        late_mode=late_mode, late_weights=late_weights, progress=not quiet,
                        bootstrap=BootstrapConfig(bootstrap), added=[Run.load(path) for path in added])
    for warning in caught:
        err.print(f"[yellow]warning: {escape(str(warning.message))}[/yellow]", highlight=False)
    if cost:
        _add_costs(opened, entries, store)
    extra = extra_columns(by_frequency, cost)
    alias = {"label": "species"} if "species" in given.get("levels", ()) else {}
    table = format_table(entries, fmt, extra, alias)
    written = write_report(entries, runs, name, title, extra, alias)
    if fmt == "md" and out.is_terminal and not extra and not base.head.levels:  # levels: the full table
        print_ranking(entries)
    else:
        out.file.write(table)
    err.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


def _add_costs(opened, entries, store_path: str) -> None:
    """Each row's cost (`report.combine_costs` of its members' `fgembed bench` records) into its
    metrics; one warning line names the members never benchmarked and the command that fixes it."""
    from fgembed.analysis.plan import split_member
    from fgembed.analysis.report import combine_costs
    from fgembed.extraction.bench import read_cost

    members = {m for e in entries for m in e.combination.members}
    costs = {m: read_cost(opened, split_member(m)[0]) for m in members}
    missing = sorted({split_member(m)[0] for m, c in costs.items() if c is None})
    if missing:
        err.print(f"[yellow]warning: no cost recorded for {', '.join(missing)} (shown as –): run "
                  f"`fgembed bench {' '.join('--backbone ' + m for m in missing)} --store {store_path}`[/yellow]", highlight=False)
    for entry in entries:
        entry.metrics = {**entry.metrics, **combine_costs([costs[m] for m in entry.combination.members])}


def print_ranking(entries) -> None:
    """The ranked table on a terminal (the demo prints it too): members as short keys with a
    legend under the table, so every row is identifiable at 80 columns."""
    from fgembed.analysis.report import ranking_table

    table, legend = ranking_table(entries)
    out.print(table)
    for line in legend:
        out.print(f"  {line}", highlight=False, markup=False)


@app.command()
def demo(directory: Path = typer.Option(Path("demo-output"), "--out", metavar="DIR",
                                        help="Where images, store, runs and report go."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")) -> None:
    """Offline demo of the whole pipeline on generated fine-grained images (under 3 min on 2 cores).

    Extracts three tiny random-init backbones (ViT, ConvNeXt, ResNet), trains single heads,
    scores concat, sum and late fusion of every subset and writes the ranked table and chart.
    """
    from fgembed.demo import DEMO_BACKBONES, run_demo

    err.print(f"demo: random-init {', '.join(DEMO_BACKBONES)}\n      generated images, no downloads: "
              "the numbers show the pipeline, not models", highlight=False)
    result = run_demo(directory, progress=not quiet)
    s = result.extraction
    print_ranking(result.entries)
    report = result.report[0].with_suffix("")
    summary = [("images", f"{result.images}"), ("store", f"{result.store}  ({s.rows} rows)"),
               ("", ", ".join(f"{k} {v}-d" for k, v in s.backbones.items())),
               ("", f"this run extracted {s.processed} images in {s.seconds:.1f} s"),
               ("runs", f"{result.runs}  ({len(list(result.runs.iterdir()))} run directories)"),
               ("report", f"{report}.{{{','.join(p.suffix[1:] for p in result.report)}}}"),
               ("next", f"fgembed info {result.store}"),
               ("", f"fgembed fit --store {result.store} \\"),  # a copyable command that fits 80 columns
               ("", f"  --features {DEMO_BACKBONES[0]} --seeds 0,1,2")]
    out.print("\n".join(f"{label:<8} {text}" for label, text in summary), highlight=False, markup=False)
