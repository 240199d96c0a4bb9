"""`fgembed extract`, `fgembed info`, `fgembed backbones`."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fgembed.datasets import KINDS
from fgembed.errors import FgembedError

from ._common import app, err, out, print_json


@app.command()
def extract(
    dataset: str = typer.Option(..., help=f"Dataset format: {', '.join(KINDS)}."),
    root: Path = typer.Option(..., help="Dataset root (for manifest: the CSV file or its folder)."),
    store: Path = typer.Option(..., help="Output feature store, e.g. cache/cub.zarr (created or resumed)."),
    backbone: list[str] = typer.Option(..., help="Backbone name (repeatable): a reference name from "
                                       "`fgembed backbones`, or timm:MODEL, open_clip:ARCH/TAG, hf:ORG/REPO."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    workers: int = typer.Option(min(8, os.cpu_count() or 1), min=0, help="Image-decoding processes."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
    image_size: Optional[int] = typer.Option(None, min=16, help="Override the model's input size (px)."),
    pooling: Optional[str] = typer.Option(None, help="pooled (default), cls, mean or cls+mean (token models)."),
    weights: Optional[Path] = typer.Option(None, help="Local checkpoint for the single --backbone."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained",
                                    help="--no-pretrained: random init, for tests and demos."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where the source library caches downloaded weights."),
    offline: bool = typer.Option(False, help="Never touch the network; use cached or local weights only."),
    dtype: str = typer.Option("float16", help="Stored embedding dtype: float16 or float32."),
    val_fraction: float = typer.Option(0.2, help="Stratified share of train held out as val (0 for none)."),
    seed: int = typer.Option(0, help="Seed of the validation split."),
    train_file: str = typer.Option("train_mini", help="inat21 only: train_mini or train."),
    shard_rows: int = typer.Option(256, min=1, help="Rows per shard (the unit of resume and of parallel writes)."),
    overwrite: bool = typer.Option(False, help="Replace features (or a store of another dataset) instead of refusing."),
    strict: bool = typer.Option(False, help="Exit non-zero if any image fails to decode (rows are still written)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Run frozen backbones over a dataset and write embeddings to a resumable Zarr store.

    Each image is decoded once, whatever the number of backbones. Rerunning the same command
    skips finished shards; a rerun with other settings is refused unless --overwrite.
    """
    if dtype not in ("float16", "float32"):
        raise FgembedError(f"--dtype must be float16 or float32, got {dtype!r}")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from fgembed.backbones import LoadOptions
    from fgembed.datasets import load_dataset
    from fgembed.extract import ExtractOptions, extract as run_extract

    table = load_dataset(dataset, root, val_fraction=val_fraction, seed=seed, train_file=train_file)
    err.print(f"{table.kind}: {len(table)} images, {len(table.class_names)} classes, "
              f"splits {table.split_counts()}", highlight=False)
    if not pretrained:
        err.print("[yellow]random-initialised weights (--no-pretrained): a pipeline test, "
                  "not meaningful features[/yellow]")
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, precision=precision,
                             dtype=dtype, shard_rows=shard_rows, overwrite=overwrite, strict=strict,
                             progress=not quiet,
                             load=LoadOptions(pretrained=pretrained, weights=weights, image_size=image_size,
                                              pooling=pooling, cache_dir=cache_dir))
    summary = run_extract(table, store, backbone, options)
    if as_json:
        print_json(asdict(summary))
        return
    out.print(f"store {summary.store}: {summary.rows} rows; backbones "
              + ", ".join(f"{k} ({v}-d)" for k, v in summary.backbones.items()), highlight=False)
    out.print(f"this run: {summary.processed} images in {summary.seconds:.1f} s "
              f"({summary.images_per_s:.1f} img/s); {summary.skipped_shards} shards already done", highlight=False)
    if summary.failures:
        out.print(f"[yellow]{len(summary.failures)} flagged rows[/yellow] (NaN embedding where unreadable):")
        for image_id, path, status in summary.failures[:20]:
            out.print(f"  id {image_id}  {status:<22} {path}", highlight=False)
        if len(summary.failures) > 20:
            out.print(f"  … and {len(summary.failures) - 20} more (fgembed info {summary.store} --json)")
    else:
        out.print("no failed images")


@app.command()
def info(store: Path = typer.Argument(..., help="A feature store (.zarr)."),
         as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show a store's dataset, splits and backbones: dims, rows done/failed, fingerprints."""
    from fgembed.store import FeatureStore

    fs = FeatureStore.open(store)
    attrs = fs.samples_attrs
    table = fs.table()
    backbones = [fs.backbone_info(name) for name in fs.backbones()]
    if as_json:
        print_json({"store": str(store), "rows": fs.n_rows, "kind": attrs["kind"], "root": attrs["root"],
                    "classes": len(attrs["class_names"]), "splits": table.split_counts(),
                    "levels": {k: len(v) for k, v in attrs["levels"].items()}, "split_recipe": attrs["split_recipe"],
                    "backbones": [asdict(b) | {"failures": fs.failures(b.name)} for b in backbones]})
        return
    out.print(f"[bold]{store}[/bold]  {attrs['kind']} at {attrs['root']}", highlight=False)
    out.print(f"{fs.n_rows} rows, {len(attrs['class_names'])} classes, splits {table.split_counts()}, "
              f"levels {', '.join(f'{k} ({len(v)})' for k, v in attrs['levels'].items()) or 'none'}", highlight=False)
    grid = Table("backbone", "dim", "dtype", "done", "failed", "complete", "img/s", "weights", "pooling",
                 "precision")
    for b in backbones:
        fp = b.fingerprint
        grid.add_row(b.name, str(b.dim), b.dtype, f"{b.rows_done}/{fs.n_rows}", str(b.rows_failed),
                     "yes" if b.complete else "no", f"{b.throughput:.1f}" if b.throughput else "–",
                     str(fp.get("weights")), str(fp.get("pooling")), str(fp.get("precision")))
    out.print(grid)


@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the named reference backbones (any timm / open_clip / Hugging Face model works by prefix)."""
    from fgembed.backbones import spec_table

    specs = spec_table()
    if as_json:
        print_json(specs)
        return
    grid = Table("name", "source", "model / weights", "dim", "input", "interp.", "output")
    for s in specs:
        model = s["model"] + (f" / {s['weights']}" if s["weights"] else "")
        grid.add_row(s["name"], s["source"], model, str(s["dim"]), f"{s['input_size']}px: {s['resize']}",
                     s["interpolation"], s["output"])
    out.print(grid)
    out.print("Also: timm:<model>, open_clip:<arch>/<tag>, hf:<org>/<repo> (or a local folder).")
