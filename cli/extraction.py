"""`fgembed extract`, `fgembed download`, `fgembed info`, `fgembed backbones`."""
from __future__ import annotations

import os
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fgembed.errors import FgembedError

from ._common import app, err, fits, out, plural, print_json
from ._options import STORAGE_OPTION, open_store

# The dataset formats of `--help`, spelled here rather than imported: `fgembed.datasets` loads numpy and
# scikit-learn, which `fgembed --help` and every other command would then pay for at start-up.
# tests/test_cli.py checks this against the registry (`fgembed.datasets.KINDS`), which stays the dispatch.
DATASET_KINDS = ("cub", "inat21", "folder", "manifest", "webdataset", "hf")


SPEED, PRECISION, VARIANTS, WEIGHTS, STORE = "Speed", "Precision", "Variants (groups of their own)", "Weights", \
    "Store and output"


def _items(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _process_age() -> float | None:
    """Seconds since this process started (Linux), to time the imports before the command ran."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


@app.command()
def extract(
    dataset: str = typer.Option(..., metavar="KIND", help=f"Dataset format: {', '.join(DATASET_KINDS)}."),
    root: str = typer.Option(..., metavar="PATH", help="Dataset root (manifest: the CSV or its folder; "
                             "webdataset: also a URL)."),
    store: str = typer.Option(..., metavar="PATH|URL", help="Feature store to create or resume, e.g. "
                              "cache/cub.zarr or s3://bucket/cub.zarr."),
    backbone: list[str] = typer.Option(..., metavar="NAME", help="Repeatable: a name from `fgembed backbones`, "
                                       "timm:MODEL, open_clip:ARCH/TAG or hf:ORG/REPO, with any ~variant."),
    batch_size: int = typer.Option(64, min=1, metavar="N", rich_help_panel=SPEED, help="Images per forward."),
    workers: Optional[int] = typer.Option(None, min=0, metavar="N", rich_help_panel=SPEED,
                                          help="Decode processes (default: cores − 1, per rank)."),
    device: str = typer.Option("auto", metavar="DEV", rich_help_panel=SPEED, help="auto, cpu, cuda or cuda:N."),
    decode: str = typer.Option("cpu", metavar="WHERE", rich_help_panel=SPEED,
                               help="device: JPEGs decoded and resized on the GPU (nvJPEG); recorded."),
    device_resize: bool = typer.Option(False, "--device-resize", rich_help_panel=SPEED,
                                       help="Resize/crop on the device; workers only decode. Recorded."),
    compile_model: bool = typer.Option(False, "--compile", rich_help_panel=SPEED,
                                       help="torch.compile each model (slow start; recorded)."),
    profile: bool = typer.Option(False, "--profile", rich_help_panel=SPEED,
                                 help="Print start-up stages and seconds per stage."),
    precision: str = typer.Option("auto", metavar="P", rich_help_panel=PRECISION,
                                  help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16, bf16-autocast, "
                                       "fp16-autocast. Recorded."),
    dtype: str = typer.Option("float16", metavar="T", rich_help_panel=PRECISION,
                              help="Stored dtype: float16 or float32."),
    layers: Optional[str] = typer.Option(None, metavar="LIST", rich_help_panel=VARIANTS,
                                         help="Blocks from 0, linear4 (DINOv2 linear-eval input) or final; "
                                              "e.g. final,linear4,20. One forward."),
    pooling: Optional[str] = typer.Option(None, metavar="LIST", rich_help_panel=VARIANTS,
                                          help="pooled (default), cls, mean, cls+mean; several: cls,mean."),
    tta: Optional[str] = typer.Option(None, metavar="LIST", rich_help_panel=VARIANTS,
                                      help="flip: mean with the mirrored image (~flip); none,flip: both."),
    image_size: Optional[int] = typer.Option(None, min=16, metavar="PX", rich_help_panel=VARIANTS,
                                             help="Input size other than the model's (~PX)."),
    text: bool = typer.Option(False, "--text", rich_help_panel=VARIANTS,
                              help="Also class-name text embeddings (open_clip), for --head zeroshot."),
    weights: Optional[Path] = typer.Option(None, metavar="PATH", rich_help_panel=WEIGHTS,
                                           help="Local checkpoint for the single backbone."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", rich_help_panel=WEIGHTS,
                                    help="--no-pretrained: random init, for tests and demos."),
    cache_dir: Optional[Path] = typer.Option(None, metavar="PATH", rich_help_panel=WEIGHTS,
                                             help="The libraries' weight cache."),
    offline: bool = typer.Option(False, "--offline", rich_help_panel=WEIGHTS,
                                 help="Never touch the network; cached or local weights only."),
    storage_option: list[str] = STORAGE_OPTION,
    shard_rows: int = typer.Option(256, min=1, metavar="N", rich_help_panel=STORE,
                                   help="Rows per shard (the unit of resume and of parallel writes)."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=STORE,
                                   help="Replace what differs instead of refusing."),
    strict: bool = typer.Option(False, "--strict", rich_help_panel=STORE,
                                help="Exit 1 if any image failed (rows are still written)."),
    val_fraction: float = typer.Option(0.2, metavar="F", rich_help_panel=STORE,
                                       help="Share of train held out as val, stratified (0: none)."),
    seed: int = typer.Option(0, metavar="N", rich_help_panel=STORE, help="Seed of the validation split."),
    train_file: str = typer.Option("train_mini", metavar="NAME", rich_help_panel=STORE,
                                   help="inat21 only: train_mini or train."),
    as_json: bool = typer.Option(False, "--json", rich_help_panel=STORE, help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", rich_help_panel=STORE, help="No progress bar."),
) -> None:
    """Run frozen backbones over a dataset and write embeddings to a resumable Zarr store.

    Each image is decoded once and each model runs once per batch, however many backbones and
    variants. Rerunning the same command skips finished shards; other settings are refused
    unless --overwrite.
    """
    entered = time.perf_counter()
    age = _process_age()
    if dtype not in ("float16", "float32"):
        raise FgembedError(f"--dtype must be float16 or float32, got {dtype!r}")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from fgembed.backbones import LoadOptions, expand_names
    from fgembed.datasets import load_dataset
    from fgembed.devices import resolve_device
    from fgembed.extraction.extract import DECODES, ExtractOptions
    from fgembed.extraction.extract import extract as run_extract
    from fgembed.storage import parse_storage_options

    if decode not in DECODES:
        raise FgembedError(f"unknown --decode {decode!r}; choose cpu or device")
    if decode == "device" and resolve_device(device).type != "cuda":
        raise FgembedError("--decode device decodes JPEGs with nvJPEG on a CUDA device; this run has none "
                           f"(--device {device})")
    names = expand_names(backbone, _items(layers), _items(pooling), _items(tta))
    imported = time.perf_counter()
    table = load_dataset(dataset, root, val_fraction=val_fraction, seed=seed, train_file=train_file)
    err.print(f"{table.kind}: {len(table)} images, {plural(len(table.class_names), 'class')}, "
              f"splits {table.split_counts()}", highlight=False)
    if not pretrained:
        err.print("[yellow]random-initialised weights (--no-pretrained): a pipeline test, "
                  "not meaningful features[/yellow]")
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, precision=precision,
                             dtype=dtype, shard_rows=shard_rows, overwrite=overwrite, strict=strict,
                             progress=not quiet, compile=compile_model, device_resize=device_resize, decode=decode,
                             profile=profile, text=text, storage_options=parse_storage_options(storage_option),
                             load=LoadOptions(pretrained=pretrained, weights=weights, image_size=image_size,
                                              cache_dir=cache_dir),
                             startup={"imports": (age or 0.0) + imported - entered,
                                      "dataset read": time.perf_counter() - imported})
    summary = run_extract(table, store, names, options)
    if as_json:
        print_json(asdict(summary))
        return
    out.print(f"store {summary.store}: {summary.rows} rows; groups "
              + ", ".join(f"{k} ({v}-d)" for k, v in summary.backbones.items()), highlight=False)
    out.print(f"this run: {summary.processed} images in {summary.seconds:.1f} s "
              f"({summary.images_per_s:.1f} img/s, {summary.steady_images_per_s:.1f} after the first batch); "
              f"{summary.skipped_shards} shards already done", highlight=False)
    out.print(f"precision {summary.precision}, {summary.workers} workers, feed "
              + ", ".join(f"{k}: {v}" for k, v in summary.feeds.items()), highlight=False)
    if profile:
        out.print(f"start-up {summary.startup_seconds:.2f} s: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in summary.startup.items()), highlight=False)
        if summary.stages:
            out.print("seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.stages.items()),
                      highlight=False)
        if summary.forward_threads:
            out.print("CPU forward threads (threads, other work in cores): "
                      + " → ".join(f"{t} ({d:.2f})" for t, d in summary.forward_threads), highlight=False)
    if summary.failures:
        out.print(f"[yellow]{len(summary.failures)} flagged rows[/yellow] (NaN embedding where unreadable):")
        for image_id, path, status in summary.failures[:20]:
            out.print(f"  id {image_id}  {status:<22} {path}", highlight=False)
        if len(summary.failures) > 20:
            out.print(f"  … and {len(summary.failures) - 20} more (fgembed info {summary.store} --json)")
    else:
        out.print("no failed images")


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (where timm, open_clip and transformers fetch the reference weights)
    cannot be reached from here, or None when one short request gets through."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # DNS, refused, timeout, proxy: all mean no hub from this machine
        return f"no network ({constants.ENDPOINT} unreachable: {type(exc).__name__})"
    return None


@app.command()
def download(
    backbone: list[str] = typer.Option(..., help="Backbone name (repeatable), as for `fgembed extract`."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache to fill (default: each library's own cache)."),
) -> None:
    """Fetch backbones' weights on a machine with internet, for extraction on offline compute nodes.

    Copy the cache to the node and run `fgembed extract ... --cache-dir DIR --offline` there.
    """
    from fgembed.backbones import download_weights, resolve

    for name in backbone:
        resolve(name)  # an unknown name fails before anything is fetched
    names = " ".join(f"--backbone {n}" for n in backbone)
    elsewhere = (f"on a machine with internet run `fgembed download {names} --cache-dir DIR`, copy DIR here "
                 "and pass --cache-dir DIR --offline to fgembed extract")
    reason = _hub_unreachable()
    if reason:  # fail in seconds, not after the libraries' minutes of retries
        raise FgembedError(f"cannot download: {reason}; {elsewhere}")
    for name in backbone:
        err.print(f"downloading {name} …", highlight=False)
        try:
            where = download_weights(name, cache_dir)
        except Exception as exc:  # the libraries raise their own types for a refused or dropped connection
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FgembedError(f"could not download {name}: {detail}; {elsewhere}") from None
        out.print(f"{name}: {where}", highlight=False)
    flag = f" --cache-dir {cache_dir}" if cache_dir else ""
    err.print(f"offline use: fgembed extract … --offline{flag}", highlight=False)


@app.command()
def info(store: str = typer.Argument(..., metavar="STORE", help="A feature store: a path or a URL."),
         storage_option: list[str] = STORAGE_OPTION,
         as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show a store's dataset, its identity (resolved root, files, sampled content hash), splits and
    backbones: dims, rows done/failed, fingerprints (strict) and what was recorded beside them."""
    fs = open_store(store, storage_option)
    attrs = fs.samples_attrs
    table = fs.table()
    identity = fs.identity
    outside = sum(Path(p).is_absolute() or os.path.normpath(p).startswith("..") for p in table.paths)
    backbones = [fs.backbone_info(name) for name in fs.backbones()]
    if as_json:
        print_json({"store": str(store), "rows": fs.n_rows, "kind": attrs["kind"], "root": attrs["root"],
                    "identity": identity, "rows_outside_root": outside,
                    "classes": len(attrs["class_names"]), "splits": table.split_counts(),
                    "levels": {k: len(v) for k, v in attrs["levels"].items()}, "split_recipe": attrs["split_recipe"],
                    "backbones": [asdict(b) | {"failures": fs.failures(b.name)} for b in backbones]})
        return
    out.print(f"{store}  {attrs['kind']} at {attrs['root']}", highlight=False, markup=False)
    if identity:
        out.print(f"identity: images under {identity['root']}, size and mtime of every file, content of "
                  f"{len(identity['sample_rows'])} sampled files sha256 {identity['sample_sha256'][:12]}…"
                  + (f"; {outside} rows outside the root" if outside else ""), highlight=False, markup=False)
    else:
        out.print("identity: not recorded (a store made before fgembed recorded it)", highlight=False)
    levels = ", ".join(f"{k} ({len(v)})" for k, v in attrs["levels"].items()) or "none"
    out.print(f"{plural(fs.n_rows, 'row')}, {plural(len(attrs['class_names']), 'class')}, splits "
              + ", ".join(f"{k} {v}" for k, v in table.split_counts().items()) + f"; levels {levels}", highlight=False)
    rows = [_backbone_row(b, fs.n_rows) for b in backbones]
    grid = Table(*rows[0]) if rows else None
    for row in rows:
        grid.add_row(*row.values())
    if grid is not None and fits(grid):
        out.print(grid)
        return
    for row in rows:  # too narrow for the table: one block per backbone, every identifier whole
        name, rest = row.pop("backbone"), "  ".join(f"{k}\u00a0{v}" for k, v in row.items())  # no break inside a pair
        out.print(name, highlight=False, markup=False)
        out.print(textwrap.fill(rest, width=max(out.width, 40), initial_indent="  ", subsequent_indent="  ",
                                break_long_words=False, break_on_hyphens=False), highlight=False, markup=False)


def _backbone_row(b, n_rows: int) -> dict[str, str]:
    """One backbone's line of `fgembed info`: what the table shows, by column. Features imported
    from another tool have no weights, pooling or precision of ours: their source file stands there."""
    fp = b.fingerprint
    imported = fp.get("source") == "import"
    return {"backbone": b.name, "dim": str(b.dim), "dtype": b.dtype, "done": f"{b.rows_done}/{n_rows}",
            "failed": str(b.rows_failed), "complete": "yes" if b.complete else "no",
            "img/s": f"{b.throughput:.1f}" if b.throughput else "–",
            "weights": f"imported {fp.get('file')}" if imported else str(fp.get("weights", "–")),
            "pooling": str(fp.get("pooling") or "–"), "precision": str(fp.get("precision") or "–"),
            "device": str(b.recorded.get("device") or "–")}


@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
              feed: bool = typer.Option(False, "--feed", help="Also build each one offline (random init; "
                                        "minutes on a CPU) and show what its decode workers send: uint8 (normalised on the device) "
                                        "or float (the library's transform cannot be split there), and whether "
                                        "--device-resize can replay its resize/crop.")) -> None:
    """List the named reference backbones (any timm / open_clip / Hugging Face model works by prefix)."""
    from fgembed.backbones import spec_table

    specs = spec_table()
    if feed:
        from fgembed.backbones import LoadOptions, load_backbone
        from fgembed.extraction.extract import device_resize_steps
        from fgembed.progress import progress_bar

        with progress_bar(len(specs), "building", unit="model") as tick:
            for s in specs:
                b = load_backbone(s["name"], LoadOptions(pretrained=False))
                s["feed"] = "uint8" if b.geometric is not None and b.mean else "float"
                s["device_resize"] = device_resize_steps(b) is not None
                del b
                tick(1)
    if as_json:
        print_json(specs)
        return
    grid = Table("name", "source", "model / weights", "dim", "input", "interp.", "output",
                 *(("feed", "--device-resize") if feed else ()))
    for s in specs:
        model = s["model"] + (f" / {s['weights']}" if s["weights"] else "")
        grid.add_row(s["name"], s["source"], model, str(s["dim"]), f"{s['input_size']}px: {s['resize']}",
                     s["interpolation"], s["output"],
                     *((s["feed"], "yes" if s["device_resize"] else "no") if feed else ()))
    if fits(grid):
        out.print(grid)
    else:  # too narrow: one block per backbone, the name (what a user copies) whole on its own line
        for s in specs:
            out.print(f"{s['name']}  ({s['source']}, {s['dim']}-d, {s['output']})", highlight=False, markup=False)
            details = [s["model"] + (f" / {s['weights']}" if s["weights"] else ""),
                       f"{s['input_size']}px: {s['resize']}, {s['interpolation']}"]
            if feed:
                details.append(f"feed {s['feed']}, --device-resize {'yes' if s['device_resize'] else 'no'}")
            for line in details:
                out.print(textwrap.fill(line, width=max(out.width, 40), initial_indent="  ", subsequent_indent="    ",
                                        break_long_words=False, break_on_hyphens=False), highlight=False, markup=False)
    out.print("Also: timm:<model>, open_clip:<arch>/<tag>, hf:<org>/<repo> (or a local folder)."
              + ("" if feed else " Add --feed to see how each one's preprocessing is fed."), highlight=False,
              markup=False)
