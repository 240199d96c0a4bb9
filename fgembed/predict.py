"""Classify new images with trained runs — one run, or a late-fusion ensemble of several.

For each run, the members it was trained on are extracted from the new images with exactly the
preprocessing recorded in the run (the backbone is rebuilt from its fingerprint and the rebuilt
fingerprint must match: a different pooling, size or weights file is refused, never silently
used). Extraction goes through the ordinary engine into a work store, so a bad image is a
flagged row, members that load alike share one decode of each image, and a killed prediction
over many images resumes (with `work_dir`).
Then the run's saved projection and heads turn the embeddings into class scores; seeds of a run
and several runs are averaged like `fgembed ensemble`'s late fusion. A gated run extracts every
backbone its member runs need, scores them with the members' heads and weighs them per image
with its gates.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import LoadOptions
from .classify.late import combine, prepare
from .classify.config import class_names, same_rows
from .classify.gated import gated_scores, is_gated, member_runs
from .classify.rundir import Run
from .classify.views import level_key
from .datasets import SampleTable
from .datasets.folder import IMAGE_SUFFIXES
from .datasets.table import TEST
from .errors import FgembedError
from .extraction.extract import ExtractOptions, extract
from .images import FAILED, STATUS_NAMES
from .store import FeatureStore, fingerprint_changes

FORMATS = ("csv", "json")


@dataclass
class Predictions:
    """Top-k classes per image; rows whose image failed carry their status and no classes."""

    paths: list[str]
    status: list[str]
    top_ids: np.ndarray              # [n, k] store class ids (-1 for failed rows)
    top_probs: np.ndarray            # [n, k] fused probabilities
    class_names: list[str]
    levels: dict[str, list[str]] = field(default_factory=dict)  # level → top-1's ancestor name per row

    def records(self) -> list[dict]:
        rows = []
        for i, path in enumerate(self.paths):
            row: dict = {"path": path, "status": self.status[i]}
            for j in range(self.top_ids.shape[1]):
                ok = self.top_ids[i, j] >= 0
                row[f"pred_{j + 1}"] = self.class_names[self.top_ids[i, j]] if ok else ""
                row[f"prob_{j + 1}"] = round(float(self.top_probs[i, j]), 6) if ok else None
            for level, names in self.levels.items():
                row[level] = names[i]
            rows.append(row)
        return rows


def image_table(inputs: list[str | Path]) -> SampleTable:
    """New images as a SampleTable: a folder (searched recursively), a CSV with a `path` column
    (relative to the CSV), or image files. Unknown labels are all 0 of one class `unknown`."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FgembedError(f"no images under {item} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif item.suffix.lower() == ".csv":
            files += _csv_paths(item)
        elif item.exists() or item.suffix.lower() in IMAGE_SUFFIXES:
            files.append(item)  # a missing image file is a flagged row, as in extraction
        else:
            raise FgembedError(f"--images {item}: not a folder, a .csv or an image file")
    if not files:
        raise FgembedError("--images named no images")
    files = [p.resolve() for p in files]
    if len(set(files)) != len(files):
        raise FgembedError("--images names the same image twice")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    paths = [p.relative_to(root).as_posix() for p in files]
    n = len(paths)
    return SampleTable("predict", str(root), np.arange(n), paths, np.zeros(n, np.int32), ["unknown"],
                       np.full(n, TEST, np.uint8))


def _csv_paths(path: Path) -> list[Path]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise FgembedError(f"{path} needs a header with a `path` column")
        rows = [r.get("path") or "" for r in reader]
    if not all(rows):
        raise FgembedError(f"{path} has a row with an empty path")
    return [p if p.is_absolute() else path.parent / p for p in map(Path, rows)]


def predict(run_dirs: list[str | Path], inputs: list[str | Path], *, top_k: int = 5, late_mode: str = "logits",
            device: str = "auto", batch_size: int = 64, workers: int | None = None,
            load: LoadOptions | None = None, weights: dict[str, Path] | None = None,
            work_dir: str | Path | None = None, progress: bool = True) -> Predictions:
    """Classify `inputs` with the fused runs; see the module docstring."""
    if not run_dirs:
        raise FgembedError("name at least one --run")
    if top_k < 1:
        raise FgembedError(f"--top-k must be ≥ 1, got {top_k}")
    runs = [Run.load(p) for p in run_dirs]
    check_compatible(runs)
    table = image_table(inputs)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="fgembed-predict-") as tmp:
            return _predict(runs, table, Path(tmp), top_k, late_mode, device, batch_size, workers, load,
                            weights or {}, progress)
    return _predict(runs, table, Path(work_dir), top_k, late_mode, device, batch_size, workers, load,
                    weights or {}, progress)


def check_compatible(runs: list[Run]) -> None:
    """Late fusion needs runs over the same classes of the same dataset (and the same level); a
    gated run, its member runs (one line before any image is read)."""
    for run in runs:
        if is_gated(run):
            member_runs(run)
    first = runs[0]
    for run in runs[1:]:
        if not same_rows(run.store, first.store):
            raise FgembedError(f"runs {first.path} and {run.path} were trained on different stores")
        if _target_level(run) != _target_level(first):
            raise FgembedError(f"runs {first.path} and {run.path} predict different levels")


def _predict(runs: list[Run], table: SampleTable, work: Path, top_k: int, late_mode: str, device: str,
             batch_size: int, workers: int | None, load: LoadOptions | None, weights: dict[str, Path],
             progress: bool) -> Predictions:
    members = members_of(runs)
    store_path = work / "features.zarr"
    for options, precision, dtype, names in load_groups(members, load, weights):
        extract_options = ExtractOptions(batch_size=batch_size, device=device, progress=progress,
                                         precision=precision, dtype=dtype, load=options)
        if workers is not None:
            extract_options.workers = workers
        extract(table, store_path, names, extract_options)
    store = FeatureStore.open(store_path)
    for name, recorded in members.items():
        check_rebuilt(name, recorded, store.backbone_info(name).fingerprint)
    failed = np.zeros(len(table), bool)
    status = np.zeros(len(table), np.int64)
    for name in members:
        s = store.status(name)
        failed |= np.isin(s, FAILED)
        status = np.where(status == 0, s, status)
    fused = fused_scores([_run_scores(run, store, late_mode) for run in runs], late_mode)
    proba = torch.softmax(fused.double(), 1)
    k = min(top_k, proba.shape[1])
    top = proba.topk(k, dim=1)
    top_ids, top_probs = top.indices.numpy().copy(), top.values.numpy().copy()
    top_ids[failed], top_probs[failed] = -1, np.nan
    class_names, levels = target_names(runs[0])
    level_names = {level: [names[codes[top_ids[i, 0]]] if top_ids[i, 0] >= 0 else "" for i in range(len(table))]
                   for level, (codes, names) in levels.items()}
    return Predictions(table.paths, [STATUS_NAMES.get(int(c), str(c)) for c in status], top_ids, top_probs,
                       class_names, level_names)


def members_of(runs: list[Run]) -> dict[str, dict]:
    """Every backbone the runs need, with how it was extracted (fingerprint and stored dtype)."""
    members: dict[str, dict] = {}
    for run in runs:
        for name in run.config.view.features:
            recorded = run.store["features"][name]
            if members.setdefault(name, recorded) != recorded:
                raise FgembedError(f"runs disagree on how {name} was extracted; fuse runs of one store")
    return members


def load_groups(members: dict[str, dict], load: LoadOptions | None,
                weights: dict[str, Path]) -> list[tuple[LoadOptions, str, str, list[str]]]:
    """(load options, precision, stored dtype, names) of the members that load alike (one
    extraction pass, one build of each model): as each was recorded."""
    groups: dict[str, tuple[LoadOptions, str, str, list[str]]] = {}
    for name, recorded in members.items():
        options = _load_options(name, recorded["fingerprint"], load, weights)
        setting = (recorded["fingerprint"].get("precision", "auto"), recorded.get("dtype", "float16"))
        groups.setdefault(repr((options, setting)), (options, *setting, []))[3].append(name)
    return list(groups.values())


def check_rebuilt(name: str, recorded: dict, fingerprint: dict) -> None:
    """Refuse a member whose rebuilt fingerprint differs from the run's record in a strict key
    (compared as stored: JSON, where a tuple is a list)."""
    changes = fingerprint_changes(recorded["fingerprint"], json.loads(json.dumps(fingerprint)))
    if changes:
        raise FgembedError(f"{name} cannot be rebuilt as the run recorded it — {'; '.join(changes)} "
                           f"(pass the original --weights {name}=PATH, or --cache-dir with its weights)")


def _load_options(name: str, fingerprint: dict, base: LoadOptions | None, weights: dict[str, Path]) -> LoadOptions:
    """Rebuild the backbone as recorded: random init, a local file (given again by the user) or
    the library's weights. A variant's name says its layers, pooling and flip (`~linear4~flip`);
    a plain name takes the recorded pooling (a store written before pooling had its own suffix)."""
    from .backbones import split_name

    base = base or LoadOptions()
    recorded = str(fingerprint.get("weights", ""))
    local = weights.get(name)
    if recorded.startswith("file:") and local is None:
        raise FgembedError(f"{name} was extracted from a local weights file ({recorded}); "
                           f"pass it again with --weights {name}=PATH")
    plain = split_name(name)[2].plain
    return LoadOptions(pretrained=not recorded.startswith("random-init"), weights=local,
                       pooling=fingerprint.get("pooling") if plain else None, cache_dir=base.cache_dir)


def design_rows(run: Run, store: FeatureStore) -> np.ndarray:
    """What the run's heads see of every work-store row: its members' embeddings through the
    view's fusion with the state fitted at training time (`Run.load_fusion`), float16 as the
    training view's rows; NaN rows of failed images are zeros. Public so that a fusion's author
    can check that prediction rebuilds exactly the rows training saw."""
    embeddings = [np.nan_to_num(store.features(name)) for name in run.config.view.features]
    return run.load_fusion([e.shape[1] for e in embeddings]).transform(embeddings)


def _seed_scores(run: Run, store: FeatureStore) -> list[np.ndarray]:
    """Each seed's scores of every work-store row; a gated run's are its gates' weighting of its
    member runs' seeds (`classify.gated`)."""
    if is_gated(run):
        members = member_runs(run)
        embeddings = [np.nan_to_num(store.features(name)) for name in run.meta["gated"]["backbones"]]
        return gated_scores(run, members, embeddings, [_seed_scores(m, store) for m in members])
    X = design_rows(run, store)
    if run.config.head.levels:  # a multi-level run: its finest level (coarser names follow from the taxonomy)
        from .classify.hierarchy import predict_levels
        return [predict_levels(module, X)[-1] for module in run.load_heads()]
    return [head.predict_logits(X).astype(np.float32) for head in run.load_heads()]


def _run_scores(run: Run, store: FeatureStore, late_mode: str) -> torch.Tensor:
    """The run's scores for every work-store row: seeds fused like ensemble members. Rows with a
    failed member image get zeros (they are reported by status, never predicted)."""
    return masked(fused_scores(_seed_scores(run, store), late_mode), run.excluded_classes(), late_mode)


def fused_scores(scores: list, late_mode: str) -> torch.Tensor:
    """A run's seeds, or runs, fused like ensemble members (`late.combine` of `late.prepare`,
    equal weights), float32; one alone as it is. On tensors or arrays: `fgembed export-model`
    traces the same rule into its file."""
    if len(scores) == 1:
        return prepare(scores[0], "logits")  # float32 scores, as they are
    return combine([prepare(z, late_mode) for z in scores], None, late_mode)


def masked(scores: torch.Tensor, excluded, late_mode: str) -> torch.Tensor:
    """Scores with the classes the run's heads cannot know (unselected, held out) never predicted."""
    fill = -float("inf") if late_mode == "logits" else float(np.log(1e-30))
    return scores.index_fill(1, torch.as_tensor(excluded, dtype=torch.long, device=scores.device), fill)


def _target_level(run: Run) -> str | None:
    """The level a run's scores are over: `--level`, or a multi-level run's finest (None: the label)."""
    h = run.config.head
    return level_key(h.levels[-1]) if h.levels else h.level


def target_names(run: Run) -> tuple[list[str], dict[str, tuple[np.ndarray, list[str]]]]:
    """Class names of the run's target, and for a fine-label run each taxonomy level's
    fine→ancestor code map: recorded in the run (a copied run predicts without its store), read
    from the training store for runs written before they were recorded."""
    meta = run.meta
    if "class_names" not in meta:
        meta = class_names(run.open_store())
    level = _target_level(run)
    if level not in (None, "label", "species"):
        return list(meta["taxonomy"][level]["names"]), {}
    levels = {name: (np.maximum(np.asarray(t["of_class"], np.int64), 0), list(t["names"]))
              for name, t in meta["taxonomy"].items()}
    return list(meta["class_names"]), levels


def format_predictions(predictions: Predictions, fmt: str) -> str:
    if fmt not in FORMATS:
        raise FgembedError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    records = predictions.records()
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()
