"""The extraction engine: decode each image once, run every requested backbone, write shards.

One DataLoader decodes each image once (in worker processes) and applies every backbone's own
transform to the decoded image. Batches never cross a shard boundary and each shard is batched
the same way on every run, so a resumed or multi-process extraction gives the same numbers as an
uninterrupted one. A writer thread puts finished shards into the store while the model runs on.
Under torchrun, ranks take disjoint contiguous slices of the pending shards.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .backbones import Backbone, LoadOptions, load_backbone
from .datasets import SampleTable
from .devices import resolve_device
from .errors import FgembedError
from .images import load_rgb
from .progress import progress_bar
from .store import DEFAULT_SHARD_ROWS, FeatureStore

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_PENDING_WRITES = 4


@dataclass
class ExtractOptions:
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    load: LoadOptions = field(default_factory=LoadOptions)
    shard_rows: int = DEFAULT_SHARD_ROWS
    overwrite: bool = False
    strict: bool = False
    progress: bool = True


@dataclass
class ExtractSummary:
    store: str
    rows: int
    backbones: dict[str, int]  # name → dim
    processed: int  # images decoded by this run (this rank under torchrun)
    skipped_shards: int
    failures: list[tuple[int, str, str]]
    seconds: float
    images_per_s: float
    announcements: list[str] = field(default_factory=list)


class DecodedImages(torch.utils.data.Dataset):
    """Row → (row, status, [one tensor per distinct preprocessing]); failed rows get zeros.

    Backbones whose preprocessing is identical (same library, same settings) share one transform
    of the decoded image: the resize is often dearer than the decode.
    """

    def __init__(self, table: SampleTable, backbones: list[Backbone]) -> None:
        self.root, self.paths = Path(table.root), table.paths
        keys = [b.preprocessing_key() for b in backbones]
        unique = list(dict.fromkeys(keys))
        self.slot = [unique.index(k) for k in keys]  # backbone i reads tensor slot[i]
        first = [keys.index(k) for k in unique]
        self.transforms = [backbones[i].transform for i in first]
        self.shapes = [backbones[i].input_shape for i in first]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        image, status = load_rgb(self.root / self.paths[row])
        if image is None:
            return row, status, [torch.zeros(s) for s in self.shapes]
        return row, status, [t(image) for t in self.transforms]


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise FgembedError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise FgembedError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _shard_batches(store: FeatureStore, shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches that never cross a shard boundary: the same split of a shard on every run."""
    batches = []
    for shard in shards:
        rows = range(store.shard_slice(shard).start, store.shard_slice(shard).stop)
        batches += [list(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return batches


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _prepare_store(path: Path, table: SampleTable, backbones: list[Backbone], options: ExtractOptions,
                   precision: str, rank: int, world: int) -> FeatureStore:
    """Rank 0 creates or checks the store; others wait for its verdict, errors included."""
    error = None
    if rank == 0:
        try:
            store = FeatureStore.create(path, table, options.shard_rows, options.overwrite)
            for b in backbones:
                store.prepare(b.name, {**b.fingerprint, "precision": precision}, b.dim, options.dtype,
                              options.overwrite)
        except FgembedError as exc:
            error = str(exc)
    if world > 1:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise FgembedError(error)
    return FeatureStore.open(path, "r+")


def extract(table: SampleTable, store_path: str | Path, backbone_names: list[str],
            options: ExtractOptions | None = None) -> ExtractSummary:
    """Extract embeddings of `table`'s images with each backbone into the store at `store_path`.

    Resumable: shards already done for a backbone are skipped. Raises FgembedError on bad input,
    and with `options.strict` after writing if any image failed.
    """
    options = options or ExtractOptions()
    if not backbone_names:
        raise FgembedError("name at least one --backbone")
    if len(set(backbone_names)) != len(backbone_names):
        raise FgembedError("a --backbone is named twice")
    if options.load.weights is not None and len(backbone_names) != 1:
        raise FgembedError("--weights loads one checkpoint: give exactly one --backbone with it")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    rank, world = _rank_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    announcements = []
    if not options.load.pretrained:
        announcements.append("random-initialised weights (--no-pretrained): embeddings are not meaningful "
                             "features, only a test of the pipeline")
    backbones = [load_backbone(name, options.load) for name in backbone_names]
    store = _prepare_store(Path(store_path), table, backbones, options, precision, rank, world)

    pending = {b.name: set(store.pending_shards(b.name)) for b in backbones}
    todo = sorted(set().union(*pending.values()))
    mine = [int(s) for s in np.array_split(np.array(todo, dtype=int), world)[rank]] if todo else []
    batches = _shard_batches(store, mine, options.batch_size)
    for b in backbones:
        b.model.to(device)
        if b.convolutional:
            b.model.to(memory_format=torch.channels_last)

    cuda = device.type == "cuda"
    dataset = DecodedImages(table, backbones)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=options.workers,
        pin_memory=cuda, persistent_workers=False, prefetch_factor=4 if options.workers else None)
    batches_left = defaultdict(int)
    for batch in batches:
        batches_left[batch[0] // store.shard_rows] += 1
    parts: dict[int, list] = defaultdict(list)  # shard → [(rows, status, {name: emb})]
    writes: deque[Future] = deque()
    processed, start = 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgembed-writer") as writer, \
            progress_bar(sum(map(len, batches)), "extract", options.progress and rank == 0) as tick, \
            torch.inference_mode():
        for rows, status, inputs in loader:
            shard = int(rows[0]) // store.shard_rows
            out = {}
            for b, slot in zip(backbones, dataset.slot):
                if shard not in pending[b.name]:
                    continue
                x = inputs[slot].to(device, non_blocking=cuda)
                if b.convolutional:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, precision):
                    out[b.name] = b.embed(x).float().cpu().numpy()
            parts[shard].append((rows.numpy(), status.numpy(), out))
            batches_left[shard] -= 1
            if batches_left[shard] == 0:
                writes.append(writer.submit(_write_shard, store, shard, parts.pop(shard)))
                if len(writes) > MAX_PENDING_WRITES:  # back-pressure; also surfaces write errors early
                    writes.popleft().result()
            processed += len(rows)
            tick(len(rows))
        for w in writes:
            w.result()
    seconds = time.perf_counter() - start
    rate = processed / seconds if processed else 0.0
    if world > 1:
        dist.barrier()
    failures: list[tuple[int, str, str]] = []
    if rank == 0:
        for b in backbones:
            store.mark_complete(b.name, round(rate * world, 2) if processed else None)
        failures = store.failures(backbones[0].name)
    summary = ExtractSummary(str(store_path), store.n_rows, {b.name: b.dim for b in backbones}, processed,
                             store.n_shards - len(todo), failures, seconds, rate, announcements)
    if options.strict and failures:
        first = failures[0]
        raise FgembedError(f"--strict: {len(failures)} of {store.n_rows} images failed (first: {first[1]}, "
                           f"{first[2]}); their rows are flagged in {store_path}", exit_code=1)
    return summary


def _write_shard(store: FeatureStore, shard: int, parts: list) -> None:
    rows = np.concatenate([p[0] for p in parts])
    status = np.concatenate([p[1] for p in parts]).astype(np.uint8)
    order = np.argsort(rows)
    for name in parts[0][2]:
        emb = np.concatenate([p[2][name] for p in parts])[order]
        store.write_shard(name, shard, emb, status[order])
