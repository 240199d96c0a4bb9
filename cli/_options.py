"""Options shared by `fgembed fit` and `fgembed ensemble` (and by `predict` and `export-model`:
the runs they serve), declared once, grouped into help panels.

The defaults shown in `--help` are `HeadConfig` / `ViewConfig`'s (spelled here because importing
the config classes loads torch, which `--help` must not pay for; tests/test_views.py checks them
against the classes). What reaches the library is only what the user typed (`typed`): the
library applies the classes' defaults and refuses a typed setting that has no effect
(`fgembed.classify.options`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer

from fgembed.errors import FgembedError

HEAD_DEFAULTS = {"head": "mlp", "epochs": 150, "lr": "1e-3", "weight_decay": "0.01", "batch_size": 128, "seeds": "0"}
VIEW_DEFAULTS = {"project": "pca", "l2": False}
BOOTSTRAP_DEFAULTS = {"n_resamples": 1000}  # fgembed.classify.intervals.BootstrapConfig's

TRAINING, FUSION, ROWS, TAXONOMY, LONG_TAIL = "Training", "Fusion", "Rows and classes", "Taxonomy", "Long tail"


def at_least(low: int) -> Callable[[int | None], int | None]:
    """A parse-time bound (`--epochs 0` is refused before any store is opened), without typer's
    `[x>=1]` in the help page's type column."""
    def check(value: int | None) -> int | None:
        if value is not None and value < low:
            raise typer.BadParameter(f"must be ≥ {low}, got {value}")
        return value
    return check


STORE = typer.Option(..., metavar="PATH|URL", help="Feature store from `fgembed extract` (or `import`): "
                     "a path or an fsspec URL, e.g. s3://bucket/cub.zarr.")
STORAGE_OPTION = typer.Option([], "--storage-option", metavar="KEY=VALUE", show_default=False,
                              help="Filesystem option of a URL store, e.g. endpoint_url=http://host:9000 "
                              "(repeatable; credentials come as s3fs / gcsfs read them).")
RUNS = typer.Option(Path("runs"), metavar="DIR", help="Folder of run directories.")
HEAD = typer.Option(HEAD_DEFAULTS["head"], metavar="NAME",
                    help="mlp (the reference d→512→256→C), linear, knn, logreg, zeroshot (text embeddings "
                    "from `extract --text`), or any registered head.")
DEVICE = typer.Option("auto", metavar="NAME", help="auto (CUDA if present), cpu, cuda, cuda:N.")
QUIET = typer.Option(False, "--quiet", help="No progress bars.")
SEEDS = typer.Option(HEAD_DEFAULTS["seeds"], metavar="LIST", help="Seeds, trained in one pass: mean ± std.")
BOOTSTRAP = typer.Option(BOOTSTRAP_DEFAULTS["n_resamples"], "--bootstrap", metavar="N", callback=at_least(0),
                         help="Resamples of the 95 % bootstrap intervals over test images (seeded; 0: none).")

EPOCHS = typer.Option(HEAD_DEFAULTS["epochs"], metavar="N", rich_help_panel=TRAINING, callback=at_least(1), help="Epochs; the best "
                      "validation F1's epoch is kept.")
LR = typer.Option(HEAD_DEFAULTS["lr"], metavar="LIST", rich_help_panel=TRAINING,
                  help="Learning rate(s): a list is a grid, the best validation F1 kept per seed.")
WEIGHT_DECAY = typer.Option(HEAD_DEFAULTS["weight_decay"], metavar="LIST", rich_help_panel=TRAINING,
                            help="Weight decay(s), a grid with --lr.")
BATCH_SIZE = typer.Option(HEAD_DEFAULTS["batch_size"], metavar="N", rich_help_panel=TRAINING, callback=at_least(2))

FUSION_KIND = typer.Option("concat", metavar="KIND", rich_help_panel=FUSION,
                           help="Several features: concat, sum (projected and added), or a registered fusion.")
PROJECT = typer.Option(VIEW_DEFAULTS["project"], metavar="KIND", rich_help_panel=FUSION,
                       help="sum: pca (fitted on train rows) or linear (learned with the head).")
PROJECT_DIM = typer.Option(None, metavar="N", rich_help_panel=FUSION, callback=at_least(1),
                           help="sum: the common dim (default: the smallest member's).")
L2 = typer.Option(VIEW_DEFAULTS["l2"], "--l2", rich_help_panel=FUSION, help="L2-normalise each member first.")

CLASSES = typer.Option(None, metavar="FILE", rich_help_panel=ROWS,
                       help="Train on these classes only: one name per line (# comments).")
HOLDOUT = typer.Option(0.0, metavar="X", rich_help_panel=ROWS,
                       help="Fraction of classes held out of train and val (novel at test).")
HOLDOUT_LEVEL = typer.Option(None, metavar="LEVEL", rich_help_panel=ROWS,
                             help="Hold out whole groups of a taxonomy level.")
HOLDOUT_SEED = typer.Option(0, metavar="N", rich_help_panel=ROWS, help="Seed of the held-out draw.")
SHOTS = typer.Option(None, metavar="K", rich_help_panel=ROWS, callback=at_least(1), help="K training rows per class (few-shot).")
DRAW = typer.Option(0, metavar="N", rich_help_panel=ROWS, callback=at_least(0), help="Which seeded draw of the --shots rows.")

LEVEL = typer.Option(None, metavar="LEVEL", rich_help_panel=TAXONOMY,
                     help="Train on a taxonomy level (order, family…), not species.")
LEVELS = typer.Option("", metavar="LIST", rich_help_panel=TAXONOMY,
                      help="Multi-level head: levels coarse to fine, e.g. order,family,species.")
HIERARCHY = typer.Option("shared", metavar="KIND", rich_help_panel=TAXONOMY,
                         help="With --levels: independent, shared (one trunk) or disentangled.")
LEVEL_WEIGHTS = typer.Option(None, metavar="LIST", rich_help_panel=TAXONOMY,
                             help="With --levels: a loss weight per level (default all 1).")

BALANCE = typer.Option("none", metavar="KIND", rich_help_panel=LONG_TAIL,
                       help="Re-balance a trained head: none, loss, sampler, logit-adjust, second-stage "
                       "(selects on macro F1).")
SHOT_BINS = typer.Option("20,100", metavar="LOW,HIGH", rich_help_panel=LONG_TAIL,
                         help="few < LOW ≤ medium ≤ HIGH < many training rows (by_frequency).")

# `fgembed predict` and `fgembed export-model`: the runs they serve, and how members are rebuilt
RUN_DIRS = typer.Option(..., "--run", metavar="DIR", help="A run directory (repeatable: runs are fused late).")
LATE_MODE = typer.Option("logits", metavar="KIND", help="How seeds and runs are fused: logits or proba.")
MEMBER_WEIGHTS = typer.Option([], "--weights", metavar="M=PATH",
                              help="The local checkpoint member M was extracted with (repeatable).")
CACHE_DIR = typer.Option(None, metavar="DIR", help="Where the source libraries cache downloaded weights.")
OFFLINE = typer.Option(False, "--offline", help="Never touch the network; cached or local weights only.")


def open_store(where: str, storage_option: list[str], mode: str = "r"):
    """The store at `--store` (a path or URL) with its `--storage-option`s."""
    from fgembed.storage import parse_storage_options
    from fgembed.store import FeatureStore

    return FeatureStore.open(where, mode, parse_storage_options(storage_option))


def member_weights(items: list[str]) -> dict[str, Path]:
    """`--weights M=PATH` items → {member: path}."""
    pairs = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep or not name:
            raise FgembedError(f"--weights takes MEMBER=PATH, got {item!r}")
        pairs[name] = Path(path)
    return pairs


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


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def class_ids(path: Path | None, class_names: list[str]) -> tuple[int, ...] | None:
    """Store class ids named in a --classes file: one name per line, blank lines and # comments skipped."""
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FgembedError(f"--classes {path}: {exc.strerror or exc}") from None
    wanted = [line.split("#", 1)[0].strip() for line in lines]
    wanted = [n for n in wanted if n]
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [n for n in wanted if n not in index]
    if unknown:
        raise FgembedError(f"--classes {path}: {len(unknown)} names are not classes of the store, e.g. {unknown[0]!r}")
    if not wanted:
        raise FgembedError(f"--classes {path} names no class")
    return tuple(sorted({index[n] for n in wanted}))


def typed(ctx: typer.Context, *exclude: str) -> dict[str, Any]:
    """The options the user typed (or set through the environment), by parameter name: what
    `fgembed.classify.options` builds a config from, so a default never counts as a choice."""
    return {name: value for name, value in ctx.params.items()
            if name not in exclude and ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")}


def run_options(given: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """Typed command-line values → the config fields' types (lists parsed, --classes read)."""
    parse: dict[str, Callable[[Any], Any]] = {
        "lr": lambda v: floats(v, "--lr"), "weight_decay": lambda v: floats(v, "--weight-decay"),
        "seeds": lambda v: ints(v, "--seeds"), "levels": names,
        "level_weights": lambda v: floats(v, "--level-weights"), "classes": lambda v: class_ids(v, class_names),
    }
    return {name: parse[name](value) if name in parse else value for name, value in given.items()}
