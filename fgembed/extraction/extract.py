"""The extraction engine: decode each image once, run every requested backbone, write shards.

One DataLoader decodes each image once (in worker processes) and applies every backbone's own
preprocessing to the decoded image: its resize/crop as uint8 where the library's transform splits
that way (normalisation then happens on the device, see `devices.py`), its whole float transform
where it does not. Batches never cross a shard boundary and each shard is batched the same way on
every run, so a resumed or multi-process extraction gives the same numbers as an uninterrupted
one. A writer thread puts finished shards into the store while the model runs on. Under
torchrun, ranks take disjoint contiguous slices of the pending shards; each stage ends with the
ranks exchanging verdicts (`_ranks.py`), so a failure on one (a bug, Ctrl-C) is one line on the
others instead of a collective that waits for a rank that is gone. The writer locks, and the
process group where this made it, are released on every exit.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

from ..backbones import Backbone, LoadOptions, load_backbone
from ..datasets import SampleTable
from ..devices import (
    DeviceModel,
    HostCopies,
    Precision,
    StageClock,
    backend_flags,
    default_workers,
    prefetch_to_device,
    resolve_device,
    resolve_precision,
)
from ..errors import FgembedError
from ..images import TRANSFORM_FAILED, read_rgb
from ..progress import progress_bar
from ..store import DEFAULT_SHARD_ROWS, FeatureStore
from ._ranks import failures_shared, process_group

MAX_PENDING_WRITES = 4
FEEDS = ("uint8", "float", "device-resize")  # what a worker sends for a backbone; recorded as `feed`


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
    compile: bool = False  # torch.compile each backbone's embedding function
    device_resize: bool = False  # workers send decoded images; resize/crop replayed on the device
    uint8_feed: bool = True  # False: always the float transform (the reference path for tests/benchmarks)
    profile: bool = False  # per-stage seconds in the summary (CUDA events on a GPU)
    text: bool = False  # also store class-name text embeddings of open_clip backbones (zero-shot heads)


@dataclass
class ExtractSummary:
    store: str
    rows: int
    backbones: dict[str, int]  # name → dim
    processed: int  # images decoded by this run (this rank under torchrun)
    skipped_shards: int
    failures: list[tuple[int, str, str]]
    seconds: float  # the extraction loop, first batch included
    images_per_s: float
    announcements: list[str] = field(default_factory=list)
    # Start-up: from the call until the second batch reaches the loop (models built, store set up, workers
    # spawned, first batch computed: exact on CPU; on CUDA the first forward may still run, so the
    # steady rate, images after the first batch over the time after that, errs low).
    startup_seconds: float = 0.0
    steady_images_per_s: float = 0.0
    precision: str = ""
    feeds: dict[str, str] = field(default_factory=dict)  # name → uint8 | float | device-resize
    workers: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # with options.profile: seconds per stage


@dataclass(frozen=True)
class Feed:
    """What a worker makes of a decoded image for one group of backbones."""

    kind: str  # one of FEEDS
    make: Callable[[Image.Image], torch.Tensor]
    shape: tuple[int, ...] | None  # None: varies with the image (device-resize)
    dtype: torch.dtype


def _decoded_tensor(image: Image.Image) -> torch.Tensor:
    return T.functional.pil_to_tensor(image)


def _feed(b: Backbone, kind: str) -> Feed:
    if kind == "uint8":
        return Feed(kind, b.geometric, b.input_shape, torch.uint8)
    if kind == "float":
        return Feed(kind, b.transform, b.input_shape, torch.float32)
    return Feed(kind, _decoded_tensor, None, torch.uint8)


# Steps of a torchvision Compose that mean nothing to an RGB uint8 tensor (the image is RGB
# already; /255 and Normalize happen on the device from the backbone's mean/std).
_DEVICE_SKIPS = (T.ToTensor, T.PILToTensor, T.Normalize)


def device_resize_steps(b: Backbone) -> T.Compose | None:
    """The library's own Resize/CenterCrop modules, to replay on a device tensor; None when its
    transform holds any other step (then --device-resize cannot be honest for it)."""
    if not isinstance(b.transform, T.Compose) or not b.mean:
        return None
    steps = []
    for step in b.transform.transforms:
        if isinstance(step, (T.Resize, T.CenterCrop)):
            steps.append(step)
        elif not (isinstance(step, _DEVICE_SKIPS) or type(step).__name__ == "MaybeConvertMode"  # open_clip's
                  or getattr(step, "__name__", "") == "_convert_to_rgb"):
            return None
    return T.Compose(steps)


class DecodedImages(torch.utils.data.Dataset):
    """Row → ((row, status, decode s, transform s), [one tensor per distinct feed]).

    Backbones whose preprocessing is identical (same library, same settings) share one feed of
    the decoded image: the resize is often dearer than the decode. A row whose image failed to
    decode, or whose transform raised, gets zeros and a status that makes its embedding NaN.
    """

    def __init__(self, table: SampleTable, backbones: list[Backbone], kinds: list[str]) -> None:
        self.source, self.rows = table.source, len(table)
        keys = ["device-resize" if k == "device-resize" else f"{k}:{b.preprocessing_key()}"
                for b, k in zip(backbones, kinds)]
        unique = list(dict.fromkeys(keys))
        self.slot = [unique.index(k) for k in keys]  # backbone i reads tensor slot[i]
        self.feeds = [_feed(backbones[keys.index(k)], kinds[keys.index(k)]) for k in unique]

    def __len__(self) -> int:
        return self.rows

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(f.shape or (3, 8, 8), dtype=f.dtype) for f in self.feeds]

    def __getitem__(self, row: int):
        start = time.perf_counter()
        image, status = read_rgb(self.source, row)
        decoded = time.perf_counter()
        if image is None:
            return (row, status, decoded - start, 0.0), self._zeros()
        try:
            tensors = [f.make(image) for f in self.feeds]
        except Exception:  # a library's transform raising on one odd image flags that row, nothing more
            status, tensors = TRANSFORM_FAILED, self._zeros()
        return (row, status, decoded - start, time.perf_counter() - decoded), tensors

    def collate(self, items: list) -> tuple:
        """Stack each feed; device-resize images differ in size and travel as a list."""
        meta = default_collate([item[0] for item in items])
        inputs = [[item[1][i] for item in items] if f.shape is None else torch.stack([item[1][i] for item in items])
                  for i, f in enumerate(self.feeds)]
        return meta, inputs


def _feed_kinds(backbones: list[Backbone], options: ExtractOptions) -> tuple[list[str], dict]:
    """Each backbone's feed, and the device-side resize steps under --device-resize."""
    if options.device_resize:
        steps = {b.name: device_resize_steps(b) for b in backbones}
        refused = [name for name, s in steps.items() if s is None]
        if refused:
            raise FgembedError(f"--device-resize cannot replay the preprocessing of {', '.join(refused)} on the "
                               "device (only torchvision Resize/CenterCrop transforms); drop the flag or the backbone")
        return ["device-resize"] * len(backbones), steps
    return ["uint8" if options.uint8_feed and b.geometric is not None and b.mean else "float"
            for b in backbones], {}


def _shard_batches(store: FeatureStore, shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches that never cross a shard boundary: the same split of a shard on every run."""
    batches = []
    for shard in shards:
        rows = range(store.shard_slice(shard).start, store.shard_slice(shard).stop)
        batches += [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


def _prepare_store(path: Path, table: SampleTable, backbones: list[Backbone], options: ExtractOptions,
                   precision: str, rank: int, world: int) -> FeatureStore:
    """Rank 0 takes the job's writer locks and creates or checks the store; others wait for its
    verdict, any failure included, and write their shards lock-free. Rank 0's store holds the
    locks until `release()`; on a failure here they are released before this returns."""
    store = None
    try:
        with failures_shared("preparing the store", rank, world):
            if rank == 0:
                store = FeatureStore.create(path, table, options.shard_rows, options.overwrite,
                                            names=[b.name for b in backbones])
                _prepare_groups(store, table, backbones, options, precision)
        if world > 1:  # the others open it once it is ready; a rank that cannot is everyone's failure
            with failures_shared("opening the store", rank, world):
                if rank != 0:
                    store = FeatureStore.open(path, "r+")
    except BaseException:
        if store is not None and rank == 0:
            store.release()
        raise
    return store


def _prepare_groups(store: FeatureStore, table: SampleTable, backbones: list[Backbone], options: ExtractOptions,
                    precision: str) -> None:
    """Lock, create or check each backbone's group; warn where only the recorded part differs."""
    from ..progress import stderr

    device = resolve_device(options.device)
    recorded = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                "cuda": torch.version.cuda, "host": os.uname().nodename, "root": str(Path(table.root).resolve())}
    for b in backbones:
        store.lock_features(b.name)
    for b in backbones:
        hub = getattr(getattr(b.model, "config", None), "_commit_hash", None)
        for warning in store.prepare(b.name, {**b.fingerprint, "precision": precision}, b.dim,
                                     options.dtype, options.overwrite, {**recorded, "hub_revision": hub}):
            stderr.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def extract(table: SampleTable, store_path: str | Path, backbone_names: list[str],
            options: ExtractOptions | None = None) -> ExtractSummary:
    """Extract embeddings of `table`'s images with each backbone into the store at `store_path`.

    Resumable: shards already done for a backbone are skipped. Raises FgembedError on bad input,
    and with `options.strict` after writing if any image failed.
    """
    called = time.perf_counter()
    options = options or ExtractOptions()
    if not backbone_names:
        raise FgembedError("name at least one --backbone")
    if len(set(backbone_names)) != len(backbone_names):
        raise FgembedError("a --backbone is named twice")
    if options.load.weights is not None and len(backbone_names) != 1:
        raise FgembedError("--weights loads one checkpoint: give exactly one --backbone with it")
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # streams, events and pinned memory of this rank's GPU
    precision = resolve_precision(options.precision, device)
    workers = default_workers() if options.workers is None else options.workers
    with process_group(device) as (rank, world):  # left however this ends: a rank told of a failure exits at once
        summary = _extract_ranked(table, store_path, backbone_names, options, device, precision, workers,
                                  rank, world, called)
    if options.strict and summary.failures:
        first = summary.failures[0]
        raise FgembedError(f"--strict: {len(summary.failures)} of {summary.rows} images failed (first: {first[1]}, "
                           f"{first[2]}); their rows are flagged in {store_path}", exit_code=1)
    return summary


def _extract_ranked(table: SampleTable, store_path: str | Path, backbone_names: list[str], options: ExtractOptions,
                    device: torch.device, precision: Precision, workers: int, rank: int, world: int,
                    called: float) -> ExtractSummary:
    """This rank's part of `extract`, each stage ending in the ranks' verdicts (see `_ranks.py`)."""
    announcements = []
    if not options.load.pretrained:
        announcements.append("random-initialised weights (--no-pretrained): embeddings are not meaningful "
                             "features, only a test of the pipeline")
    with failures_shared("loading the backbones", rank, world):
        # each model placed and cast before the next is built: the host holds one fp32 model at a time
        # (--text: towers stay fp32 for _write_text; DeviceModel casts them on the device afterwards)
        weights = None if options.text else precision.weights
        backbones = [load_backbone(name, options.load, device, weights) for name in backbone_names]
        kinds, steps = _feed_kinds(backbones, options)
    for b, kind in zip(backbones, kinds):  # how the numbers were made: strict fingerprint keys
        b.fingerprint = {**b.fingerprint, "precision": precision.name, "compile": options.compile, "feed": kind}
    store = _prepare_store(store_path, table, backbones, options, precision.name, rank, world)
    with store:  # rank 0's writer locks are released however this ends (an error, Ctrl-C)
        with failures_shared("extracting", rank, world):  # also the barrier before groups are marked complete
            run = _extract_pending(store, table, backbones, kinds, steps, options, device, precision, workers,
                                   rank, world)
        seconds = run.end - run.start
        rate = run.processed / seconds if run.processed else 0.0
        steady = (run.processed - run.first_rows) / (run.end - run.steady_start) if run.steady_start else 0.0
        failures: list[tuple[int, str, str]] = []
        if rank == 0:
            for b in backbones:
                store.mark_complete(b.name, round(rate * world, 2) if run.processed else None)
            failures = store.failures(*[b.name for b in backbones])
    return ExtractSummary(str(store_path), store.n_rows, {b.name: b.dim for b in backbones}, run.processed,
                          store.n_shards - run.todo, failures, seconds, rate, announcements,
                          (run.steady_start or run.end) - called, steady, precision.name,
                          {b.name: k for b, k in zip(backbones, kinds)}, workers, run.stages)


@dataclass
class _Pass:
    """What one rank's pass over its pending shards did (timings for the summary)."""

    processed: int
    todo: int  # shards pending for any backbone, all ranks together
    first_rows: int
    steady_start: float | None
    start: float
    end: float
    stages: dict[str, float]


def _extract_pending(store: FeatureStore, table: SampleTable, backbones: list[Backbone], kinds: list[str],
                     steps: dict, options: ExtractOptions, device: torch.device, precision: Precision,
                     workers: int, rank: int, world: int) -> _Pass:
    """Decode, embed and write this rank's share of the shards still pending for any backbone."""
    pending = {b.name: set(store.pending_shards(b.name)) for b in backbones}
    todo = sorted(set().union(*pending.values()))
    mine = [int(s) for s in np.array_split(np.array(todo, dtype=int), world)[rank]] if todo else []
    batches = _shard_batches(store, mine, options.batch_size)
    if options.text and rank == 0:
        _write_text(store, table, backbones)  # before DeviceModel casts the weights for the device
    models = [DeviceModel(b, device, precision, options.compile, steps.get(b.name)) for b in backbones]

    cuda = device.type == "cuda"
    dataset = DecodedImages(table, backbones, kinds)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=dataset.collate,
        pin_memory=cuda, persistent_workers=False, prefetch_factor=4 if workers else None)
    batches_left = defaultdict(int)
    for batch in batches:
        batches_left[batch[0] // store.shard_rows] += 1
    parts: dict[int, list] = defaultdict(list)  # shard → [(rows, status, {name: emb})]
    writes: deque[Future] = deque()
    clock = StageClock(device, options.profile)
    processed, first_rows, steady_start = 0, 0, None
    start = time.perf_counter()

    def timed_write(shard: int, shard_parts: list) -> None:
        began = time.perf_counter()
        _write_shard(store, shard, shard_parts)
        clock.add_seconds("write", time.perf_counter() - began)

    def collect(result) -> None:  # one batch's embeddings, now on the host
        nonlocal processed
        host, (meta, names) = result
        rows, status = meta[0].numpy(), meta[1].numpy()
        clock.add_seconds("decode (workers, summed)", float(meta[2].sum()))
        clock.add_seconds("transform (workers, summed)", float(meta[3].sum()))
        shard = int(rows[0]) // store.shard_rows
        offsets = np.cumsum([0] + [dim for _, dim in names])
        parts[shard].append((rows, status, {n: host[:, a:z] for (n, _), a, z in zip(names, offsets, offsets[1:])}))
        batches_left[shard] -= 1
        if batches_left[shard] == 0:
            writes.append(writer.submit(timed_write, shard, parts.pop(shard)))
            if len(writes) > MAX_PENDING_WRITES:  # back-pressure; also surfaces write errors early
                writes.popleft().result()
        processed += len(rows)
        tick(len(rows))

    with backend_flags(device, precision, workers), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgembed-writer") as writer, \
            progress_bar(sum(map(len, batches)), "extract", options.progress and rank == 0) as tick, \
            torch.inference_mode():
        copies = HostCopies(device, clock)
        for meta, inputs in prefetch_to_device(clock.waiting(loader), device, clock):
            if first_rows and steady_start is None:  # the steady state: from the second batch on
                steady_start = time.perf_counter()
            first_rows = first_rows or len(meta[0])
            shard = int(meta[0][0]) // store.shard_rows
            active = [(m, slot) for m, slot in zip(models, dataset.slot) if shard in pending[m.backbone.name]]
            began = clock.now()
            prepared = [m.prepare(inputs[slot]) for m, slot in active]
            ready = clock.now()
            outputs = [m.forward(x) for (m, _), x in zip(active, prepared)]
            clock.add("device preprocess", began, ready)
            clock.add("forward", ready, clock.now())
            names = [(m.backbone.name, m.backbone.dim) for m, _ in active]
            if (result := copies.submit(outputs, (meta, names))) is not None:
                collect(result)
        if (result := copies.drain()) is not None:
            collect(result)
        for w in writes:
            w.result()
    return _Pass(processed, len(todo), first_rows, steady_start, start, time.perf_counter(), clock.totals())


def _write_shard(store: FeatureStore, shard: int, parts: list) -> None:
    rows = np.concatenate([p[0] for p in parts])
    status = np.concatenate([p[1] for p in parts]).astype(np.uint8)
    order = np.argsort(rows)
    for name in parts[0][2]:
        emb = np.concatenate([p[2][name] for p in parts])[order]
        store.write_shard(name, shard, emb, status[order])


def _write_text(store: FeatureStore, table: SampleTable, backbones: list[Backbone]) -> None:
    """Class-name embeddings from each backbone's text tower, in its full precision."""
    from ..backbones import PROMPT_TEMPLATES, text_embeddings

    towers = [b for b in backbones if b.has_text]
    if not towers:
        raise FgembedError("--text needs a backbone with a text tower (open_clip models); "
                           f"{', '.join(b.name for b in backbones)} have none")
    for b in towers:
        scale = getattr(b.model, "logit_scale", None)
        store.write_text(b.name, text_embeddings(b, table.class_names),
                         float(scale.exp()) if scale is not None else 100.0, PROMPT_TEMPLATES)
