"""One rank's pass over its shards: batches from the workers, each model's forward, writes.

The loader (workers already started, see `extract.py`) yields batches that never cross a shard
boundary. Per batch: the device feeds are decoded and resized on the device, each model runs
once for all of its variants (only if one of them still needs the shard), all outputs reach the
host in one copy (a batch later, `HostCopies`), and a shard complete in every group goes to the
writer thread while the model runs on. On CPU the forward's thread count follows the measured
demand of the workers and the writer (`threads.py`).
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import DeviceModel, HostCopies, Precision, StageClock, backend_flags, prefetch_to_device
from ..progress import progress_bar
from ..store import FeatureStore
from .device_decode import DeviceDecoder, Replay
from .threads import ForwardThreads

MAX_PENDING_WRITES = 4


@dataclass
class Fed:
    """A model as the loop sees it: its device model, where its input comes from, its groups."""

    model: DeviceModel
    slot: int  # which of the batch's tensors it reads
    replay: Replay | None  # device feeds: the library's resize/crop on the device
    replay_key: str  # models whose preprocessing is the same share one replay per batch
    names: list[str]  # its groups, in the order its readout returns them
    dims: list[int]
    pending: list[set[int]]  # per group: shards still to write


@dataclass
class PassResult:
    """What one rank's pass did (timings for the summary)."""

    processed: int = 0
    first_rows: int = 0
    loop_start: float = 0.0
    steady_start: float | None = None
    end: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    threads: list[tuple[int, float]] = field(default_factory=list)  # CPU: (forward threads, demand) changes


def run_pass(store: FeatureStore, loader_batches, batches: list[list[int]], fed: list[Fed], device: torch.device,
             precision: Precision, workers: int, decode_on_device: bool, progress: bool, clock: StageClock
             ) -> PassResult:
    """Embed and write every batch of `batches` (as the loader yields them)."""
    result = PassResult()
    batches_left: dict[int, int] = defaultdict(int)
    for batch in batches:
        batches_left[batch[0] // store.shard_rows] += 1
    parts: dict[int, list] = defaultdict(list)  # shard → [(rows, status, {name: emb})]
    writes: deque[Future] = deque()
    decoder = DeviceDecoder(device) if decode_on_device else None
    threads = ForwardThreads(workers) if device.type != "cuda" else None
    written = [0.0]  # the writer's seconds since the last batch (it competes with the CPU forward)

    def timed_write(shard: int, shard_parts: list) -> None:
        began = time.perf_counter()
        write_shard(store, shard, shard_parts)
        seconds = time.perf_counter() - began
        clock.add_seconds("write", seconds)
        written[0] += seconds

    def collect(item) -> None:  # one batch's embeddings, now on the host
        host, (meta, names) = item
        rows, status = meta[0].numpy(), meta[1].numpy()
        shard = int(rows[0]) // store.shard_rows
        offsets = np.cumsum([0] + [dim for _, dim in names])
        parts[shard].append((rows, status, {n: host[:, a:z] for (n, _), a, z in zip(names, offsets, offsets[1:])}))
        batches_left[shard] -= 1
        if batches_left[shard] == 0:
            writes.append(writer.submit(timed_write, shard, parts.pop(shard)))
            if len(writes) > MAX_PENDING_WRITES:  # back-pressure; also surfaces write errors early
                writes.popleft().result()
        result.processed += len(rows)
        tick(len(rows))

    inputs_on_device = (lambda b: b) if decode_on_device else (lambda b: prefetch_to_device(b, device, clock))
    with backend_flags(device, precision, workers), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgembed-writer") as writer, \
            progress_bar(sum(map(len, batches)), "extract", progress) as tick, \
            torch.inference_mode():
        if threads is not None:
            threads.apply()
        copies = HostCopies(device, clock)
        result.loop_start = time.perf_counter()
        for meta, inputs in inputs_on_device(clock.waiting(loader_batches)):
            arrived = time.perf_counter()
            if result.first_rows and result.steady_start is None:  # the steady state: from the second batch on
                result.steady_start = arrived
            result.first_rows = result.first_rows or len(meta[0])
            clock.add_seconds("decode (workers, summed)", float(meta[2].sum()))
            clock.add_seconds("transform (workers, summed)", float(meta[3].sum()))
            shard = int(meta[0][0]) // store.shard_rows
            began = clock.now()
            if decoder is not None:
                status = meta[1].numpy().copy()
                inputs = [decoder(status, inputs)]
                meta = [meta[0], torch.from_numpy(status), *meta[2:]]
                clock.add("device decode", began, clock.now())
            outputs, names = _forward(fed, inputs, shard, clock)
            if (item := copies.submit(outputs, (meta, names))) is not None:
                collect(item)
            if threads is not None:
                busy = float(meta[2].sum() + meta[3].sum()) if workers else 0.0
                threads.batch_done(len(meta[0]), busy + written[0], time.perf_counter() - arrived)
                written[0] = 0.0
        if (item := copies.drain()) is not None:
            collect(item)
        for w in writes:
            w.result()
    result.end = time.perf_counter()
    result.stages = clock.totals()
    result.threads = threads.history if threads is not None else []
    return result


def _forward(fed: list[Fed], inputs: list, shard: int, clock: StageClock) -> tuple[list[torch.Tensor], list]:
    """Each model that still owes this shard to one of its groups, once; their pending outputs."""
    outputs, names = [], []
    replayed: dict[str, torch.Tensor] = {}
    for f in fed:
        wanted = [i for i, pending in enumerate(f.pending) if shard in pending]
        if not wanted:
            continue
        began = clock.now()
        x = inputs[f.slot]
        if f.replay is not None:  # the same library steps for several models: replayed once
            if f.replay_key not in replayed:
                replayed[f.replay_key] = f.replay(x)
            x = replayed[f.replay_key]
        prepared = f.model.prepare(x)
        ready = clock.now()
        out = f.model.forward(prepared)
        clock.add("device preprocess", began, ready)
        clock.add("forward", ready, clock.now())
        outputs += [out[i] for i in wanted]
        names += [(f.names[i], f.dims[i]) for i in wanted]
    return outputs, names


def write_shard(store: FeatureStore, shard: int, parts: list) -> None:
    rows = np.concatenate([p[0] for p in parts])
    status = np.concatenate([p[1] for p in parts]).astype(np.uint8)
    order = np.argsort(rows)
    for name in parts[0][2]:
        emb = np.concatenate([p[2][name] for p in parts])[order]
        store.write_shard(name, shard, emb, status[order])
