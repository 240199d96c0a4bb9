"""`fgembed similarity`, `fgembed bench`: domain similarity between stores and backbone cost."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from fgembed.errors import FgembedError

from ._common import app, err, out, plural, print_json
from ._options import STORAGE_OPTION, open_store

FORMATS = ("table", "json")


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FgembedError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


@app.command()
def similarity(
    source: list[str] = typer.Option(..., metavar="PATH|URL", help="Source store (repeatable: matrix rows)."),
    target: list[str] = typer.Option(..., metavar="PATH|URL", help="Target store (repeatable: matrix columns)."),
    features: str = typer.Option(..., metavar="A,B,…", help="Backbone(s) both stores hold."),
    source_split: str = typer.Option("train", metavar="SPLIT", help="Split of the sources: train, val or test."),
    target_split: str = typer.Option("train", metavar="SPLIT", help="Split of the targets: train, val or test."),
    gamma: float = typer.Option(0.01, metavar="X", help="sim = exp(−gamma · EMD); the paper's 0.01."),
    select: Optional[int] = typer.Option(None, metavar="K", help="Write the K source classes most similar to "
                                         "the target (Cui et al.'s greedy rule) to --out."),
    out_file: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="With --select: the class "
                                            "list, one name per line (what `fit --classes` reads)."),
    plot: Optional[Path] = typer.Option(None, metavar="PNG", help="Heat map of the matrix (default "
                                        "similarity.png when there is more than one result)."),
    fmt: str = typer.Option("table", "--format", metavar="FMT", help="table or json."),
    storage_option: list[str] = STORAGE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Domain similarity between stores: EMD between class-mean embeddings, sim = exp(−γ·d).

    As in Cui et al., "Large Scale Fine-Grained Categorization and Domain-Specific Transfer"
    (§4), each class is its mean embedding weighted by its share of the split's images; rows
    whose image failed are left out. Several stores or backbones give a matrix and a heat map.
    With --select K, ranks source classes by their similarity to the target alone and writes
    the top K to --out.
    """
    from fgembed.analysis.similarity import (
        domain_similarity,
        heatmap,
        select_classes,
        similarity_matrices,
        write_class_list,
    )

    fmt = _format(fmt)
    names = [n.strip() for n in features.split(",") if n.strip()]
    if not names:
        raise FgembedError("--features needs at least one backbone name")
    # storage options go to the stores at URLs (a local target beside an s3:// source is common)
    sources = [open_store(p, storage_option if "://" in p else []) for p in source]
    targets = [open_store(p, storage_option if "://" in p else []) for p in target]
    if select is not None:
        if out_file is None:
            raise FgembedError("--select writes a class list: give it --out FILE")
        if len(names) != 1 or len(sources) != 1 or len(targets) != 1:
            raise FgembedError("--select ranks one source against one target with one backbone: give one of each")
        scores = select_classes(sources[0], targets[0], names[0], select, source_split, target_split, gamma,
                                progress=not quiet)
        write_class_list(scores, out_file, f"{select} classes of {source[0]} [{source_split}] most similar to "
                         f"{target[0]} [{target_split}] by {names[0]} (exp(-{gamma:g}·EMD))")
        err.print(f"wrote {out_file}", highlight=False)
        if fmt == "json":
            print_json([asdict(s) for s in scores])
            return
        grid = Table("#", "class", "label", "rows", "EMD", "similarity")
        for i, s in enumerate(scores, 1):
            grid.add_row(str(i), escape(s.name), str(s.label), str(s.rows), f"{s.emd:.3f}", f"{s.similarity:.4f}")
        out.print(grid)
        return
    if out_file is not None:
        raise FgembedError("--out is for --select K")
    results = domain_similarity(sources, targets, names, source_split, target_split, gamma, progress=not quiet)
    if len(results) > 1 or plot is not None:
        written = heatmap(results, plot or Path("similarity.png"), gamma)
        err.print(f"wrote {written}", highlight=False)
    if fmt == "json":
        print_json([asdict(r) for r in results])
        return
    if len(results) == 1:
        r = results[0]
        out.print(f"{r.features}: {r.source} [{r.source_split}, {plural(r.source_classes, 'class')}] → {r.target} "
                  f"[{r.target_split}, {plural(r.target_classes, 'class')}]: EMD {r.emd:.4f}, "
                  f"similarity {r.similarity:.4f}",
                  markup=False, highlight=False)
        return
    for m in similarity_matrices(results):
        grid = Table(f"source \\ {m.column_kind}", *map(escape, m.columns), title=escape(m.title),
                     caption=f"each cell: similarity exp(−{gamma:g}·EMD), the EMD in brackets")
        for i, row in enumerate(m.rows):
            grid.add_row(escape(row), *(f"{s:.4f} ({d:.2f})" for s, d in zip(m.similarity[i], m.emd[i])))
        out.print(grid)


TIMING, WEIGHTS, OUTPUT = "Timing", "Weights", "Output"


@app.command()
def bench(
    backbone: list[str] = typer.Option(..., metavar="NAME", help="Repeatable: as `fgembed extract --backbone` "
                                       "(NAME~SIZE: another size)."),
    device: str = typer.Option("auto", metavar="DEV", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", metavar="P", help="As `fgembed extract --precision`."),
    batch_size: int = typer.Option(32, min=1, metavar="N", help="Batch of both throughput figures."),
    image_size: Optional[int] = typer.Option(None, min=16, metavar="PX", help="Input size other than the model's."),
    images: int = typer.Option(128, min=0, metavar="N", help="JPEGs for the e2e figure (0: skip it)."),
    warmup: int = typer.Option(3, min=0, metavar="N", rich_help_panel=TIMING,
                               help="Untimed forwards before each timing."),
    repeats: int = typer.Option(10, min=1, metavar="N", rich_help_panel=TIMING, help="Timed batches for img/s."),
    latency_repeats: int = typer.Option(30, min=2, metavar="N", rich_help_panel=TIMING,
                                        help="Timed single images for p50 / p95."),
    workers: Optional[int] = typer.Option(None, min=0, metavar="N", rich_help_panel=TIMING,
                                          help="Decode processes of the e2e run."),
    compile_model: bool = typer.Option(False, "--compile", rich_help_panel=TIMING,
                                       help="torch.compile, as `extract --compile`."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", rich_help_panel=WEIGHTS,
                                    help="--no-pretrained: random init (same cost, no download)."),
    cache_dir: Optional[Path] = typer.Option(None, metavar="PATH", rich_help_panel=WEIGHTS,
                                             help="The libraries' weight cache."),
    store: Optional[str] = typer.Option(None, metavar="PATH|URL", rich_help_panel=OUTPUT,
                                        help="Record the results in this store (outside the fingerprint)."),
    storage_option: list[str] = STORAGE_OPTION,
    fmt: str = typer.Option("table", "--format", metavar="FMT", rich_help_panel=OUTPUT, help="table or json."),
    quiet: bool = typer.Option(False, "--quiet", rich_help_panel=OUTPUT, help="No progress bar."),
) -> None:
    """Inference cost of backbones: parameters, GMACs, speed, latency, memory.

    GMACs are multiply-adds per image (timm's convention; GFLOPs = 2 × GMACs) from torch's
    FlopCounterMode. **img/s**: the forward alone, on batches already prepared on the device, at
    the backbone's own input shape and the chosen precision. **e2e img/s**: `fgembed extract` on
    generated photo-sized JPEGs, files to store, after its first batch (decode and resize in
    workers, overlapped with the forward). On CPU both use the forward threads the extraction
    chose (the workers take cores), so e2e ≤ img/s; the gap is what the feed costs.
    """
    from fgembed.backbones import LoadOptions
    from fgembed.extraction.bench import BenchOptions
    from fgembed.extraction.bench import bench as run_bench

    fmt = _format(fmt)
    options = BenchOptions(device=device, precision=precision, batch_size=batch_size, warmup=warmup, repeats=repeats,
                           latency_repeats=latency_repeats, images=images, workers=workers, compile=compile_model,
                           progress=not quiet,
                           load=LoadOptions(pretrained=pretrained, image_size=image_size, cache_dir=cache_dir))
    target = open_store(store, storage_option) if store is not None else None
    if not pretrained:
        err.print("[yellow]random-initialised weights (--no-pretrained): the cost is the model's, "
                  "the weights do not matter[/yellow]")
    results = run_bench(backbone, options, target)
    if store is not None:
        err.print(f"recorded in {store}", highlight=False)
    if fmt == "json":
        print_json([asdict(r) for r in results])
        return
    threads = f", {results[0].threads} forward threads" if results[0].threads else ""
    grid = Table("backbone", "params (M)", "GMACs", "GFLOPs", f"img/s (batch {batch_size})", "p50 ms", "p95 ms",
                 "peak MB", "e2e img/s", title=f"{results[0].device_name}, {results[0].precision}{threads}")
    for r in results:
        grid.add_row(escape(r.backbone), f"{r.params / 1e6:.2f}", f"{r.gmacs:.3f}", f"{r.gflops:.3f}",
                     f"{r.throughput:.1f}", f"{r.latency_p50_ms:.2f}", f"{r.latency_p95_ms:.2f}",
                     f"{r.peak_memory_mb:.0f}",
                     f"{r.e2e_images_per_s:.1f}" if r.e2e_images_per_s is not None else "–")
    out.print(grid)
    out.print(f"peak memory: {results[0].peak_memory_kind}", highlight=False)
