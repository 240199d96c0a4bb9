"""`fgembed predict`: classify new images with trained runs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ._common import app, err, out
from ._options import CACHE_DIR, LATE_MODE, MEMBER_WEIGHTS, OFFLINE, RUN_DIRS, at_least, member_weights


@app.command()
def predict(
    run: list[Path] = RUN_DIRS,
    images: list[Path] = typer.Option(..., metavar="PATH", help="A folder (searched recursively), a CSV with a "
                                      "`path` column, or an image file (repeatable)."),
    to: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="Output file (default: stdout)."),
    top_k: int = typer.Option(5, metavar="K", callback=at_least(1), help="Classes per image, best first."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="FMT", help="csv or json (default: from --out's "
                                      "suffix, else csv)."),
    late_mode: str = LATE_MODE,
    device: str = typer.Option("auto", metavar="NAME", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(64, metavar="N", callback=at_least(1), help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, metavar="N", callback=at_least(0), help="Image-decoding "
                                          "processes (default: as extract)."),
    weights: list[str] = MEMBER_WEIGHTS,
    cache_dir: Optional[Path] = CACHE_DIR,
    offline: bool = OFFLINE,
    work_dir: Optional[Path] = typer.Option(None, metavar="DIR", help="Keep the new images' embeddings here "
                                            "(resumable); default: a temporary folder."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Classify new images with a trained run, or a late-fusion ensemble of runs.

    Each member backbone is rebuilt exactly as the run recorded it (a mismatch is refused) and
    run over the images; the run's projection and heads give one row per image:
    `path, status, pred_1, prob_1, …` plus the top class's taxonomy levels. A bad image is a
    row with its status, never a crash.
    """
    from fgembed.backbones import LoadOptions
    from fgembed.predict import format_predictions
    from fgembed.predict import predict as run_predict

    fmt = fmt or ("json" if to is not None and to.suffix == ".json" else "csv")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    predictions = run_predict(run, images, top_k=top_k, late_mode=late_mode, device=device, batch_size=batch_size,
                              workers=workers, load=LoadOptions(cache_dir=cache_dir), weights=member_weights(weights),
                              work_dir=work_dir, progress=not quiet)
    text = format_predictions(predictions, fmt)
    if to is None:
        out.file.write(text)
        return
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_text(text)
    flagged = sum(s != "ok" for s in predictions.status)
    err.print(f"wrote {to}: {len(predictions.paths)} images"
              + (f", {flagged} flagged (see the status column)" if flagged else ""), highlight=False)
