"""`fgembed export`, `fgembed import`: features to and from HDF5 and .npy."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fgembed.errors import FgembedError

from ._common import app, err, out
from ._options import STORAGE_OPTION, open_store


@app.command()
def export(
    store: str = typer.Argument(..., metavar="STORE", help="A feature store: a path or a URL."),
    to: Path = typer.Option(..., "--to", metavar="PATH", help="Output: an .h5 file (HDF5) or a folder (npy)."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="FMT", help="h5 or npy (default: from the --to suffix)."),
    features: Optional[str] = typer.Option(None, metavar="A,B,…", help="Backbones (default: every complete one)."),
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Write a store's features and sample rows (id, label, split, path) to HDF5 or .npy files."""
    from fgembed.extraction.interchange import export_features

    fmt = fmt or ("h5" if to.suffix in (".h5", ".hdf5") else "npy")
    names = [n for n in features.split(",") if n] if features else None
    path = export_features(open_store(store, storage_option), to, fmt, names)
    out.print(f"wrote {path} ({fmt})", highlight=False)


@app.command(name="import")
def import_(
    source: Path = typer.Argument(..., metavar="FILE", help="Features made elsewhere: .npy, or HDF5 (.h5/.hdf5)."),
    store: str = typer.Option(..., metavar="PATH|URL", help="Store to add them to (created from "
                              "--dataset/--root if absent)."),
    name: str = typer.Option(..., metavar="NAME", help="Their name in the store, e.g. thingsvision_clip."),
    key: Optional[str] = typer.Option(None, metavar="KEY", help="HDF5 dataset with the matrix (default: "
                                      "features, or the only one)."),
    order: Optional[Path] = typer.Option(None, metavar="FILE", help="Image paths, one per feature row (e.g. "
                                         "thingsvision's file_names.txt): rows matched by path."),
    dataset: Optional[str] = typer.Option(None, metavar="KIND", rich_help_panel="New store",
                                          help="Dataset format, as for extract."),
    root: Optional[str] = typer.Option(None, metavar="PATH", rich_help_panel="New store", help="Dataset root."),
    val_fraction: float = typer.Option(0.2, metavar="X", rich_help_panel="New store",
                                       help="Stratified share of train held out as val."),
    seed: int = typer.Option(0, metavar="N", rich_help_panel="New store", help="Seed of the validation split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace features of this name (with --dataset, "
                                   "also a store of other labels or splits, or of other images if this is its "
                                   "only group)."),
    storage_option: list[str] = STORAGE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Bring features computed by another tool (HDF5, .npy) into a store.

    Rows are matched by image id when the file has ids, by path with --order, else by row
    order after a count check; store rows the file lacks become flagged NaN rows.
    """
    from fgembed.extraction.interchange import import_features
    from fgembed.storage import parse_storage_options
    from fgembed.store import FeatureStore

    if dataset and root:  # create, finish an interrupted setup, or check that the store holds this dataset
        from fgembed.datasets import load_dataset

        fs = FeatureStore.create(store, load_dataset(dataset, root, val_fraction=val_fraction, seed=seed),
                                 overwrite=overwrite, names=[name], storage_options=parse_storage_options(storage_option))
    else:
        try:
            fs = open_store(store, storage_option, "r+")
        except FgembedError as exc:
            if not str(exc).startswith("no feature store"):
                raise
            raise FgembedError(f"no store at {store}; to create one (or finish an interrupted one) "
                               "give --dataset and --root") from None
    summary = import_features(fs, name, source, key=key, order_file=order, overwrite=overwrite, progress=not quiet)
    out.print(f"imported {summary.name} ({summary.dim}-d) into {store}: {summary.rows} rows matched by "
              f"{summary.matched_by}", highlight=False)
    if summary.missing_rows:
        err.print(f"[yellow]{summary.missing_rows} store rows have no features in {source.name}: "
                  "NaN, flagged unreadable[/yellow]")
