"""Options shared by `fgembed fit` and `fgembed ensemble`, declared once with their defaults
taken from `HeadConfig` / `ViewConfig`, so the two commands cannot drift apart."""
from __future__ import annotations

from pathlib import Path

import typer

from fgembed.errors import FgembedError

# the config classes are read for their defaults only; importing them loads torch, so the
# defaults are spelled here and checked against the classes in tests/test_views.py
HEAD_DEFAULTS = {"head": "mlp", "epochs": 150, "lr": "1e-3", "weight_decay": "0.01", "batch_size": 128, "seeds": "0"}
VIEW_DEFAULTS = {"project": "pca", "l2": False}

STORE = typer.Option(..., help="Feature store written by `fgembed extract` (or `fgembed import`).")
RUNS = typer.Option(Path("runs"), help="Folder of run directories (one per head configuration).")
HEAD = typer.Option(HEAD_DEFAULTS["head"], help="Head: mlp (d→512→256→C, the reference recipe), linear, knn "
                    "(cosine, k chosen on val), logreg (C chosen on val), zeroshot (class-name text embeddings from "
                    "`fgembed extract --text`), or any registered head.")
PROJECT = typer.Option(VIEW_DEFAULTS["project"], help="sum only: pca (fitted on train rows) or linear (learned).")
L2 = typer.Option(VIEW_DEFAULTS["l2"], help="concat/sum: L2-normalise each member first.")
LEVEL = typer.Option(None, help="Train on a taxonomy level (order, family…), not species.")
EPOCHS = typer.Option(HEAD_DEFAULTS["epochs"], min=1)
LR = typer.Option(HEAD_DEFAULTS["lr"], help="Learning rate, or a comma-separated list: the grid keeps, per seed, "
                  "the best validation F1.")
WEIGHT_DECAY = typer.Option(HEAD_DEFAULTS["weight_decay"], help="Weight decay, or a comma-separated list (a grid "
                            "with --lr).")
BATCH_SIZE = typer.Option(HEAD_DEFAULTS["batch_size"], min=2)
SEEDS = typer.Option(HEAD_DEFAULTS["seeds"], help="Comma-separated seeds, trained in one pass, reported as mean ± std.")
DEVICE = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N.")
QUIET = typer.Option(False, help="No progress bar.")
PROJECT_DIM = typer.Option(None, min=1, help="sum only: common dim (default: smallest member).")
CLASSES = typer.Option(None, help="Train on a subset of classes: a file with one class name per line (# comments).")
HOLDOUT = typer.Option(0.0, help="Fraction of classes held out of train and val (novel at test).")
HOLDOUT_LEVEL = typer.Option(None, help="Hold out whole groups of this taxonomy level (e.g. family).")
HOLDOUT_SEED = typer.Option(0, help="Seed of the held-out draw.")
SHOTS = typer.Option(None, min=1, help="K training rows per class, drawn from train only.")
DRAW = typer.Option(0, min=0, help="Which seeded draw of the --shots rows.")
BALANCE = typer.Option("none", help="Re-balance a trained head for a long tail: none, loss (class-balanced loss), "
                       "sampler (class-balanced batches), logit-adjust, second-stage; selects on macro F1.")
SHOT_BINS = typer.Option("20,100", help="LOW,HIGH training rows: few < LOW ≤ medium ≤ HIGH < many (by_frequency).")
LEVELS = typer.Option("", help="Multi-level head: taxonomy levels coarse to fine, e.g. order,family,species.")
HIERARCHY = typer.Option("shared", help="With --levels: independent (a model per level), shared "
                         "(one trunk, a head per level), disentangled (split-and-reinforce, stop-gradient).")
LEVEL_WEIGHTS = typer.Option(None, help="With --levels: comma-separated loss weight per level (default all 1).")


def ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise FgembedError(f"{option} takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values:
        raise FgembedError(f"{option} takes a number or comma-separated numbers, e.g. 1e-3,3e-4; got {text!r}")
    return values


def class_ids(path: Path | None, class_names: list[str]) -> tuple[int, ...] | None:
    """Store class ids named in a --classes file: one name per line, blank lines and # comments skipped."""
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FgembedError(f"--classes {path}: {exc.strerror or exc}") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise FgembedError(f"--classes {path}: {len(unknown)} names are not classes of the store, e.g. {unknown[0]!r}")
    if not names:
        raise FgembedError(f"--classes {path} names no class")
    return tuple(sorted({index[n] for n in names}))
