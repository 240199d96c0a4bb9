"""`fgembed distill`: one cheap view trained on a teacher ensemble's soft targets."""
from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.markup import escape

from fgembed.errors import FgembedError

from ._common import app, err, out, print_json
from ._options import (
    BATCH_SIZE,
    BOOTSTRAP,
    CLASSES,
    DEVICE,
    DRAW,
    EPOCHS,
    FUSION_KIND,
    HEAD,
    HOLDOUT,
    HOLDOUT_LEVEL,
    HOLDOUT_SEED,
    L2,
    LEVEL,
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
    names,
    open_store,
    run_options,
    typed,
)

DISTILLATION = "Distillation"
# HeadConfig's defaults, spelled here because importing it loads torch (tests/test_distill.py checks them)
DISTILL_DEFAULTS = {"temperature": 4.0, "kd_alpha": 0.9, "kd_top_k": 64}


@app.command()
def distill(
    ctx: typer.Context,
    store: str = STORE, storage_option: list[str] = STORAGE_OPTION,
    teacher: str = typer.Option(..., metavar="A,B,…", help="The teacher: late fusion of these members' runs "
                                "(trained like ensemble's singles, or reused)."),
    student: str = typer.Option(..., metavar="A[+B…]", help="The student's view: one backbone, or several "
                                "joined by + (fused)."),
    fusion: str = FUSION_KIND,
    temperature: float = typer.Option(DISTILL_DEFAULTS["temperature"], metavar="T", rich_help_panel=DISTILLATION,
                                      help="Softmax temperature of teacher and student."),
    kd_alpha: float = typer.Option(DISTILL_DEFAULTS["kd_alpha"], metavar="A", rich_help_panel=DISTILLATION,
                                   help="Weight of the T²·KL term; 1 − A weighs the labels."),
    kd_top_k: int = typer.Option(DISTILL_DEFAULTS["kd_top_k"], metavar="K", rich_help_panel=DISTILLATION,
                                 callback=at_least(1), help="Teacher classes kept per row; the rest share "
                                 "what is left."),
    head: str = HEAD, seeds: str = SEEDS,
    project: str = PROJECT, project_dim: int | None = PROJECT_DIM, l2: bool = L2,
    epochs: int = EPOCHS, lr: str = LR, weight_decay: str = WEIGHT_DECAY, batch_size: int = BATCH_SIZE,
    classes: Path | None = CLASSES, holdout: float = HOLDOUT, holdout_level: str | None = HOLDOUT_LEVEL,
    holdout_seed: int = HOLDOUT_SEED, shots: int | None = SHOTS, draw: int = DRAW,
    level: str | None = LEVEL, shot_bins: str = SHOT_BINS,
    device: str = DEVICE, runs: Path = RUNS,
    force: bool = typer.Option(False, "--force", help="Retrain the teacher's runs, the plain head and the student."),
    bootstrap: int = BOOTSTRAP,
    as_json: bool = typer.Option(False, "--json", help="Print student, teacher and plain head to stdout."),
    quiet: bool = QUIET,
) -> None:
    """Distil a teacher ensemble into a cheaper student view.

    Trains a head on the student's view against the teacher's soft targets (Hinton et al.:
    α·T²·KL + (1 − α)·CE, selected on validation like fit), and prints the student against
    the teacher and the student's own plain head (95 % bootstrap intervals, and the student's
    paired difference to its plain head), with the backbones each needs at prediction time.
    The student is a run like any other (ensemble --run, predict, late fusion).
    """
    from fgembed.classify.distill import distill as run_distill
    from fgembed.classify.intervals import BootstrapConfig
    from fgembed.classify.options import run_config

    given = typed(ctx, "store", "storage_option", "teacher", "student", "device", "runs", "force", "bootstrap",
                  "as_json", "quiet")
    if given.get("kd_alpha") == 0:
        raise FgembedError("--kd-alpha 0 leaves only the labels' cross-entropy: that is the plain head distill "
                           "reports beside the student")
    members = names(teacher)
    if not members:
        raise FgembedError("--teacher needs at least one member, e.g. --teacher a,b,c")
    opened = open_store(store, storage_option)
    config = run_config(tuple(student.split("+")), teacher=members, **run_options(given, opened.class_names))
    intervals = BootstrapConfig(bootstrap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = run_distill(opened, config, runs, device=device, force=force, progress=not quiet,
                             bootstrap=intervals)
        rows = _rows(opened, result, intervals)
    for warning in caught:
        err.print(f"[yellow]warning: {escape(str(warning.message))}[/yellow]", highlight=False)
    if as_json:
        print_json(rows)
        return
    _print(config, result, rows)


def _rows(store, result, intervals) -> dict[str, dict]:
    """Student, teacher (the `late` row of an ensemble of its members) and plain head: their test
    metrics (with intervals; the student's with its paired difference to the plain head), run
    directories and the backbones each runs at prediction time (GMACs per image where
    `fgembed bench` recorded them)."""
    from fgembed.analysis.ensemble import late_entries
    from fgembed.analysis.plan import Combination
    from fgembed.analysis.report import combine_costs
    from fgembed.analysis.table_intervals import table_intervals
    from fgembed.extraction.bench import read_cost

    teacher, level = result.student.config.head.teacher, result.student.config.head.level
    late = late_entries(store, dict(zip(teacher, result.teachers)), [Combination("late", teacher)], level,
                        "logits", "equal")[0]
    if intervals.enabled:
        table_intervals([late], {}, store, level, intervals)
    paired = _paired(store, result, intervals) if intervals.enabled else {}
    rows = {"student": (result.student.metrics | paired, [str(result.student.path)],
                        result.student.config.view.features),
            "teacher": (late.metrics, [str(p) for p in late.runs], teacher),
            "plain": (result.plain.metrics, [str(result.plain.path)], result.plain.config.view.features)}
    return {name: {"runs": paths, "backbones": list(backbones),
                   "gmacs": combine_costs([read_cost(store, b) for b in backbones])["gmacs"], **metrics}
            for name, (metrics, paths, backbones) in rows.items()}


def _paired(store, result, intervals) -> dict:
    """The student against its plain head on the test rows both score, one paired bootstrap on
    shared resamples (`delta_<metric>`, `_ci`, `_p`, as an ensemble table's fused rows have)."""
    import numpy as np

    from fgembed.analysis.table_intervals import run_predictions
    from fgembed.classify.bootstrap import METRICS, distribution
    from fgembed.classify.intervals import delta_keys
    from fgembed.classify.views import level_key

    fine = store.labels()
    labels = store.labels(level=level_key(result.student.config.head.level)).astype(np.int64)
    student, plain = run_predictions(result.student, fine), run_predictions(result.plain, fine)
    common = np.intersect1d(student.rows, plain.rows)
    resamples = intervals.resamples(len(common))
    scored = lambda p: distribution(labels[common], p.preds[:, np.searchsorted(p.rows, common)],  # noqa: E731
                                    resamples, METRICS)
    return delta_keys(scored(student), {"plain": scored(plain)}, intervals.confidence)


def _print(config, result, rows: dict[str, dict]) -> None:
    """Three lines (teacher, student, plain head) and what the student keeps of the teacher's gain."""
    from fgembed.analysis.interval_cells import delta_cell, interval_text

    h, student = config.head, result.student
    state = "reused finished run" if student.reused else f"trained in {student.metrics['train_seconds']:.1f} s"
    out.print(f"{config.label}: {state} → {student.path}", highlight=False, markup=False)
    out.print(f"teacher: late fusion of {' + '.join(h.teacher)}; T {h.temperature:g}, α {h.kd_alpha:g}, "
              f"top-{h.kd_top_k} targets; seeds {','.join(map(str, h.seeds))}", highlight=False, markup=False)
    width = max(len(" + ".join(r["backbones"])) for r in rows.values())
    accuracy = {name: f"{100 * r['accuracy']:.2f}{interval_text(r.get('accuracy_ci'))}" for name, r in rows.items()}
    wide = max(map(len, accuracy.values()))
    out.print(f"{'test':8} {'rows':>5} {'accuracy':>{wide}} {'F1 (w)':>7}  backbones at prediction", highlight=False)
    for name, r in rows.items():
        cost = "" if r["gmacs"] is None else f"  ({r['gmacs']:.1f} GMACs)"
        line = (f"{name:8} {r['n_test']:5d} {accuracy[name]:>{wide}} {100 * r['f1']:7.2f}  {len(r['backbones'])}: "
                f"{' + '.join(r['backbones']):<{width}}{cost}")
        out.print(line.rstrip(), highlight=False, markup=False)
    if rows["student"].get("delta_accuracy") is not None:
        out.print(f"student − plain head, paired bootstrap: accuracy {delta_cell(rows['student'], 'delta_accuracy')}"
                  f"\n  F1 (w) {delta_cell(rows['student'], 'delta_f1')}", highlight=False)
    gain = rows["teacher"]["accuracy"] - rows["plain"]["accuracy"]
    kept = rows["student"]["accuracy"] - rows["plain"]["accuracy"]
    if gain > 0:
        out.print(f"the student keeps {100 * kept / gain:.0f}% of the teacher's {100 * gain:.2f}-point accuracy "
                  "gain over the plain head", highlight=False)
    else:
        out.print(f"the teacher is no better than the plain head ({100 * gain:+.2f} points): nothing to keep",
                  highlight=False)
