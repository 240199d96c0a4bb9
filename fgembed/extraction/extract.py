"""The extraction engine: decode each image once, run each model once per batch, write shards.

A job asks for feature groups (`--backbone` names, with variant suffixes: `~448`, `~linear4`,
`~mean`, `~flip`, see `backbones.variants`); groups of one model share its forward. Start-up is
ordered so that nothing waits on what it does not need: each model's preprocessing is resolved
first without its weights (a structure-only build on the meta device, or the image processor),
the store is set up, and the decode workers start; the models are built while the workers fill
the first batches, and only then are the groups' fingerprints checked. `ExtractSummary.startup`
times each of those stages.

Batches never cross a shard boundary and each shard is batched the same way on every run, so a
resumed or multi-process extraction gives the same numbers as an uninterrupted one (`_pass.py`
runs the loop). Under torchrun, ranks take disjoint contiguous slices of the pending shards;
each stage ends with the ranks exchanging verdicts (`_ranks.py`), so a failure on one (a bug,
Ctrl-C) is one line on the others instead of a collective that waits for a rank that is gone.
The writer locks, the workers, and the process group where this made it, are released on every
exit.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, LoadOptions, Preprocessing, Variant, load_backbone, load_preprocessing
from ..backbones.registry import SOURCES, resolve
from ..backbones.variants import split_name
from ..datasets import SampleTable
from ..devices import DeviceModel, Precision, StageClock, default_workers, resolve_device, resolve_precision
from ..errors import FgembedError
from ..store import DEFAULT_SHARD_ROWS, FeatureStore
from ._pass import Fed, run_pass
from ._ranks import failures_shared, process_group
from .device_decode import replay_steps
from .feeds import DEVICE_FEEDS, DecodedImages, EncodedImages, feed_key

DECODES = ("cpu", "device")


@dataclass
class ExtractOptions:
    batch_size: int = 64
    workers: int | None = None  # None: cores available − 1 (devices.default_workers)
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    load: LoadOptions = field(default_factory=LoadOptions)
    shard_rows: int = DEFAULT_SHARD_ROWS
    overwrite: bool = False
    strict: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile each model's readout
    device_resize: bool = False  # workers send decoded images; resize/crop replayed on the device
    decode: str = "cpu"  # "device": workers send JPEG bytes, decoded in batches on the device (nvJPEG on CUDA)
    uint8_feed: bool = True  # False: always the float transform (the reference path for tests/benchmarks)
    profile: bool = False  # per-stage seconds in the summary (CUDA events on a GPU)
    text: bool = False  # also store class-name text embeddings of open_clip backbones (zero-shot heads)
    storage_options: dict = field(default_factory=dict)  # fsspec options of a store at a URL
    # start-up stages the caller ran before `extract` (the CLI: "imports", "dataset read"), in seconds
    startup: dict[str, float] = field(default_factory=dict)


@dataclass
class ExtractSummary:
    store: str
    rows: int
    backbones: dict[str, int]  # group name → dim
    processed: int  # images decoded by this run (this rank under torchrun)
    skipped_shards: int
    failures: list[tuple[int, str, str]]
    seconds: float  # the extraction loop, first batch included
    images_per_s: float
    announcements: list[str] = field(default_factory=list)
    # Start-up: until the second batch reaches the loop (models built, store set up, workers spawned,
    # first batch computed: exact on CPU; on CUDA the first forward may still run, so the steady rate,
    # images after the first batch over the time after that, errs low). `startup` splits it in stages.
    startup_seconds: float = 0.0
    steady_images_per_s: float = 0.0
    precision: str = ""
    feeds: dict[str, str] = field(default_factory=dict)  # group → uint8 | float | device-resize | device-decode
    workers: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # with options.profile: seconds per stage
    startup: dict[str, float] = field(default_factory=dict)  # stage → seconds, in the order they ran
    forward_threads: list[tuple[int, float]] = field(default_factory=list)  # CPU: (threads, demand) as it changed


class Startup:
    """Contiguous start-up stages: each `mark` closes the stage that ran since the previous one."""

    def __init__(self, before: dict[str, float], began: float) -> None:
        self.seconds = dict(before)
        self.last = began

    def mark(self, stage: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


@dataclass
class _Model:
    """One model of the job and the groups it feeds."""

    name: str  # the model's name as asked (base and size)
    variants: list[Variant]
    pre: Preprocessing | None = None
    kind: str = ""  # its feed
    members: list[Backbone] = field(default_factory=list)  # one per variant, built

    @property
    def names(self) -> list[str]:
        return [self.pre.name + v.suffix for v in self.variants]


def _models(names: list[str], options: ExtractOptions) -> list[_Model]:
    """Group the asked names by model (base and size): one forward serves all of a model's variants."""
    if not names:
        raise FgembedError("name at least one --backbone")
    if len(set(names)) != len(names):
        raise FgembedError("a --backbone is named twice")
    models: dict[str, _Model] = {}
    for name in names:
        base, size, variant = split_name(name)
        resolve(base)  # an unknown name fails before anything is built
        if options.load.pooling and not variant.plain:
            raise FgembedError(f"{name!r} names a variant: give its pooling in the name (e.g. {base}~mean~flip), "
                               "not as LoadOptions.pooling")
        key = base + (f"~{size}" if size else "")
        models.setdefault(key, _Model(key, [])).variants.append(variant)
    if options.load.weights is not None and len(models) != 1:
        raise FgembedError("--weights loads one checkpoint: give exactly one --backbone with it")
    if options.decode not in DECODES:
        raise FgembedError(f"unknown --decode {options.decode!r}; choose cpu or device")
    if options.decode == "device" and options.device_resize:
        raise FgembedError("--decode device resizes on the device already; drop --device-resize")
    return list(models.values())


def _import_sources(models: list[_Model]) -> None:
    """Import the source libraries this job uses, and only those (transformers alone takes seconds)."""
    for source in dict.fromkeys(resolve(m.name).source for m in models):
        importlib.import_module(f"fgembed.backbones.{SOURCES[source].module}")


def _feed_kind(pre: Preprocessing, options: ExtractOptions) -> str:
    if options.decode == "device":
        return "device-decode"
    if options.device_resize:
        return "device-resize"
    return "uint8" if options.uint8_feed and pre.geometric is not None and pre.mean else "float"


def _check_replays(models: list[_Model]) -> None:
    refused = [m.pre.name for m in models
               if m.kind in DEVICE_FEEDS and replay_steps(m.pre.transform, m.pre.mean) is None]
    if refused:
        flag = "--decode device" if models[0].kind == "device-decode" else "--device-resize"
        raise FgembedError(f"{flag} cannot replay the preprocessing of {', '.join(refused)} on the device (only "
                           "torchvision Resize/CenterCrop transforms and transformers image processors); drop the "
                           "flag or the backbone")


def device_resize_steps(backbone: Backbone):
    """The library's resize/crop replayed on device tensors, or None where it cannot be (what
    `fgembed backbones --feed` shows for `--device-resize` and `--decode device`)."""
    return replay_steps(backbone.transform, backbone.mean)


def extract(table: SampleTable, store_path: str | Path, backbone_names: list[str],
            options: ExtractOptions | None = None) -> ExtractSummary:
    """Extract embeddings of `table`'s images into the store at `store_path`: one feature group per
    name in `backbone_names` (a backbone, or one of its variants: `dinov2_vitl14~linear4`).

    Resumable: shards already done for a group are skipped. Raises FgembedError on bad input,
    and with `options.strict` after writing if any image failed.
    """
    called = time.perf_counter()
    options = options or ExtractOptions()
    models = _models(backbone_names, options)
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # streams, events and pinned memory of this rank's GPU
    precision = resolve_precision(options.precision, device)
    workers = default_workers() if options.workers is None else options.workers
    with process_group(device) as (rank, world):  # left however this ends: a rank told of a failure exits at once
        summary = _extract_ranked(table, store_path, models, options, device, precision, workers, rank, world,
                                  Startup(options.startup, called))
    if options.strict and summary.failures:
        first = summary.failures[0]
        raise FgembedError(f"--strict: {len(summary.failures)} of {summary.rows} images failed (first: {first[1]}, "
                           f"{first[2]}); their rows are flagged in {store_path}", exit_code=1)
    return summary


def _extract_ranked(table: SampleTable, store_path: str | Path, models: list[_Model], options: ExtractOptions,
                    device: torch.device, precision: Precision, workers: int, rank: int, world: int,
                    startup: Startup) -> ExtractSummary:
    """This rank's part of `extract`, each stage ending in the ranks' verdicts (see `_ranks.py`)."""
    startup.mark("device set-up")  # CUDA initialised, this rank's process group joined
    announcements = []
    if not options.load.pretrained:
        announcements.append("random-initialised weights (--no-pretrained): embeddings are not meaningful "
                             "features, only a test of the pipeline")
    with failures_shared("loading the backbones", rank, world):
        _import_sources(models)
        startup.mark("imports")
        for m in models:
            m.pre = load_preprocessing(m.name, options.load)
            m.kind = _feed_kind(m.pre, options)
        _check_replays(models)
        names = [n for m in models for n in m.names]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise FgembedError(f"two --backbone names give one group ({', '.join(twice)})")
    startup.mark("transforms")
    store = _open_store(store_path, table, names, options, rank, world)
    with store:  # rank 0's writer locks are released however this ends (an error, Ctrl-C)
        planned = _planned_shards(store, names, options.overwrite)
        mine = [int(s) for s in np.array_split(np.array(planned, dtype=int), world)[rank]] if planned else []
        batches = _shard_batches(store, mine, options.batch_size)
        startup.mark("store set-up and dataset identity")
        with _loader(table, models, batches, options, workers, device) as (loader, dataset_slot):
            startup.mark("worker start")
            with failures_shared("loading the backbones", rank, world):
                _build(models, options, device, precision)
            startup.mark("model build and weight load")
            with failures_shared("preparing the store", rank, world):
                if rank == 0:
                    _prepare_groups(store, table, models, options, precision, device)
            pending = {n: set(store.pending_shards(n)) for n in names}
            todo = sorted(set().union(*pending.values()))
            if not set(todo) <= set(planned):
                raise RuntimeError(f"shards {sorted(set(todo) - set(planned))[:5]} became pending after the plan")
            startup.mark("group set-up")
            if options.text and rank == 0:
                _write_text(store, table, models)
            with failures_shared("extracting", rank, world):  # also the barrier before groups are marked complete
                fed = _fed(models, dataset_slot, pending, device, precision, options.compile)
                run = run_pass(store, loader, batches, fed, device, precision, workers,
                               options.decode == "device", options.progress and rank == 0,
                               StageClock(device, options.profile))
        if run.steady_start is not None:
            startup.mark("first batch", run.steady_start)
        seconds = run.end - run.loop_start
        rate = run.processed / seconds if run.processed else 0.0
        steady = (run.processed - run.first_rows) / (run.end - run.steady_start) if run.steady_start else 0.0
        failures: list[tuple[int, str, str]] = []
        if rank == 0:
            for name in names:
                store.mark_complete(name, round(rate * world, 2) if run.processed else None)
            failures = store.failures(*names)
    members = [b for m in models for b in m.members]
    return ExtractSummary(str(store_path), store.n_rows, {b.name: b.dim for b in members}, run.processed,
                          store.n_shards - len(todo), failures, seconds, rate, announcements,
                          sum(startup.seconds.values()), steady, precision.name,
                          {b.name: m.kind for m in models for b in m.members}, workers, run.stages,
                          {k: round(v, 4) for k, v in startup.seconds.items()}, run.threads)


def _open_store(store_path, table: SampleTable, names: list[str], options: ExtractOptions, rank: int,
                world: int) -> FeatureStore:
    """Rank 0 takes the job's writer locks and creates or checks the store (samples, dataset
    identity); others wait for its verdict, any failure included, then open it and write their
    shards lock-free. Rank 0's store holds the locks until `release()`; on a failure here they
    are released before this returns."""
    store = None
    try:
        with failures_shared("preparing the store", rank, world):
            if rank == 0:
                store = FeatureStore.create(store_path, table, options.shard_rows, options.overwrite, names=names,
                                                storage_options=options.storage_options)
        if world > 1:  # the others open it once it is ready; a rank that cannot is everyone's failure
            with failures_shared("opening the store", rank, world):
                if rank != 0:
                    store = FeatureStore.open(store_path, "r+", options.storage_options)
    except BaseException:
        if store is not None and rank == 0:
            store.release()
        raise
    return store


def _planned_shards(store: FeatureStore, names: list[str], overwrite: bool) -> list[int]:
    """The shards to decode, read before the groups are checked (the workers start on them while
    the models build): a group not in the store yet, or one `--overwrite` may rebuild, needs
    every shard; an existing group its pending ones. Nothing writes in between, so the shards
    still pending once the groups are checked are among these (a group kept as it was under
    --overwrite just has its finished shards decoded for nothing)."""
    have = set(store.backbones())
    if overwrite or any(n not in have for n in names):
        return list(range(store.n_shards))
    return sorted(set().union(*(store.pending_shards(n) for n in names)))


def _shard_batches(store: FeatureStore, shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches that never cross a shard boundary: the same split of a shard on every run."""
    batches = []
    for shard in shards:
        rows = range(store.shard_slice(shard).start, store.shard_slice(shard).stop)
        batches += [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


@contextlib.contextmanager
def _loader(table: SampleTable, models: list[_Model], batches: list[list[int]], options: ExtractOptions,
            workers: int, device: torch.device) -> Iterator[tuple[Iterator, list[int]]]:
    """Start the decode workers on `batches` (they fill their queues while the models build);
    yield the batch iterator and each model's tensor slot. The workers are shut down on every
    exit, a failure before the first batch included."""
    if options.decode == "device":
        dataset = EncodedImages(table.source, len(table))
        slots = [0] * len(models)
    else:
        dataset = DecodedImages(table.source, len(table), [m.pre for m in models], [m.kind for m in models])
        slots = dataset.slot
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=dataset.collate,
        pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    try:
        yield iterator, slots
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # DataLoader has no public close
        if shutdown is not None:
            shutdown()


def _build(models: list[_Model], options: ExtractOptions, device: torch.device, precision: Precision) -> None:
    """Build each model once (placed and cast before the next: the host holds one fp32 model at a
    time; --text keeps the towers fp32 for `_write_text`) as all of its variants."""
    weights = None if options.text else precision.weights
    for m in models:
        backbone = load_backbone(m.name, options.load, device, weights, preprocessing=m.pre)
        members = backbone.variants(m.variants)
        for b in members:  # how the numbers were made: strict fingerprint keys
            b.fingerprint = {**b.fingerprint, "precision": precision.name, "compile": options.compile, "feed": m.kind}
        m.members = members


def _prepare_groups(store: FeatureStore, table: SampleTable, models: list[_Model], options: ExtractOptions,
                    precision: Precision, device: torch.device) -> None:
    """Lock, create or check each group; warn where only the recorded part differs."""
    from ..progress import stderr

    recorded = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                "cuda": torch.version.cuda, "host": os.uname().nodename, "root": str(Path(table.root).resolve())}
    members = [b for m in models for b in m.members]
    for b in members:
        store.lock_features(b.name)
    for b in members:
        hub = getattr(getattr(b.model, "config", None), "_commit_hash", None)
        for warning in store.prepare(b.name, {**b.fingerprint, "precision": precision.name}, b.dim,
                                     options.dtype, options.overwrite, {**recorded, "hub_revision": hub}):
            stderr.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _fed(models: list[_Model], slots: list[int], pending: dict[str, set[int]], device: torch.device,
         precision: Precision, compile_model: bool) -> list[Fed]:
    fed = []
    for m, slot in zip(models, slots):
        first = m.members[0]
        model = DeviceModel(first, device, precision, compile_model, embed=first.readout(m.variants))
        replay = replay_steps(m.pre.transform, m.pre.mean) if m.kind in DEVICE_FEEDS else None
        fed.append(Fed(model, slot, replay, feed_key(m.pre, "uint8"), [b.name for b in m.members],
                       [b.dim for b in m.members], [pending[b.name] for b in m.members]))
    return fed


def _write_text(store: FeatureStore, table: SampleTable, models: list[_Model]) -> None:
    """Class-name embeddings from each model's text tower, in its full precision, into each of its groups."""
    from ..backbones import PROMPT_TEMPLATES, text_embeddings

    towers = [m for m in models if m.members[0].has_text]
    if not towers:
        raise FgembedError("--text needs a backbone with a text tower (open_clip models); "
                           f"{', '.join(m.pre.name for m in models)} have none")
    for m in towers:
        b = m.members[0]
        scale = getattr(b.model, "logit_scale", None)
        embeddings = text_embeddings(b, table.class_names)
        for member in m.members:
            store.write_text(member.name, embeddings, float(scale.exp()) if scale is not None else 100.0,
                             PROMPT_TEMPLATES)


__all__ = ["DECODES", "ExtractOptions", "ExtractSummary", "device_resize_steps", "extract"]
