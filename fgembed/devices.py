"""Device choice shared by both stages, and the device side of extraction.

`auto` means CUDA when torch sees it (the rank's own GPU under torchrun); asking for CUDA on a
machine without it is a one-line error, not a crash deep inside the first `.to()`.

Extraction keeps the accelerator busy by moving work off the host and syncs out of the loop:
weights are cast once to bf16/fp16 (not re-cast by autocast on every forward); workers send
uint8 images and `(x/255 - mean)/std` runs on the device; the next batch's host-to-device copy
runs on a side stream while the current batch computes; the outputs of all backbones are
gathered on the device and copied to the host once per batch on another side stream, read one
batch later. On CPU the same code runs with the streams left out.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .cpu import available_cores, torch_threads
from .errors import FgembedError

# --precision value → (recorded name, weights dtype, autocast dtype). The recorded name enters the
# strict fingerprint: bf16 weights and bf16 autocast give different numbers.
PRECISIONS: dict[str, tuple[str, torch.dtype, torch.dtype | None]] = {
    "fp32": ("fp32", torch.float32, None),
    "bf16": ("bf16-weights", torch.bfloat16, None),
    "fp16": ("fp16-weights", torch.float16, None),
    "bf16-autocast": ("bf16-autocast", torch.float32, torch.bfloat16),
    "fp16-autocast": ("fp16-autocast", torch.float32, torch.float16),
}


def resolve_device(device: str) -> torch.device:
    """`auto` → this rank's GPU if there is one, else the CPU. A bare `cuda` gets an index too
    (this rank's, under torchrun): `torch.cuda.set_device` and per-device streams need one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FgembedError(f"unknown device {device!r} (try cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FgembedError("--device cuda asked for, but torch sees no CUDA device")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
        raise FgembedError(f"{resolved} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                           "(a launcher that gives each rank one GPU via CUDA_VISIBLE_DEVICES: use --device cuda:0)")
    return resolved


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, looked up once; None off Linux or on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed_host_memory() -> None:
    """Hand the heap pages freed by a model's move or cast back to the OS (glibc's `malloc_trim`;
    a no-op elsewhere). glibc keeps freed blocks below its mmap threshold resident, and decode
    workers forked later count every resident page of the parent in their own RSS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_workers() -> int:
    """Decode processes: the available cores minus one for the main loop, at least 0."""
    return available_cores() - 1


@dataclass(frozen=True)
class Precision:
    name: str  # as recorded in the fingerprint
    weights: torch.dtype
    autocast: torch.dtype | None


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """`auto`: bf16 weights on CUDA (fp16 where the GPU has no bf16), fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise FgembedError(f"unknown precision {precision!r}; choose one of auto, {', '.join(PRECISIONS)}")
    if precision.startswith("fp16") and device.type != "cuda":
        raise FgembedError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return Precision(*PRECISIONS[precision])


@contextlib.contextmanager
def backend_flags(device: torch.device, precision: Precision, workers: int = 0) -> Iterator[None]:
    """cuDNN autotuning on; TF32 only when the weights are already bf16/fp16. On CPU, the forward
    gets the cores the decode workers leave: OpenMP threads that outnumber free cores spin at
    their barriers, and the forward ran 4× slower than alone on 2 cores with 1 worker.

    Under `--precision fp32` TF32 stays off (cuDNN's default is on): fp32 is the reference mode,
    and TF32's 10-bit mantissa moves fp32 convolution outputs by ~1e-3. In the reduced modes the
    few fp32 ops left (position-embedding interpolation, fp32 layer norms) are below bf16 noise.
    """
    if device.type != "cuda":
        with torch_threads(min(torch.get_num_threads(), available_cores() - workers)):
            yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    tf32 = precision.name != "fp32"
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, tf32, tf32
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


class DeviceModel:
    """One model on its device: weights cast once, its input normalised there, channels-last for
    convolutional models, optionally compiled. Call it with the batch its feed produced.

    `embed` is what a forward computes (default: the backbone's own `embed`; extraction passes
    `Backbone.readout(variants)`, every variant of the model from one forward).

    Weights already placed by `load_backbone(name, options, device, precision.weights)` stay as
    they are (the `.to` below is then a no-op): loading each backbone that way before the next
    holds one model's fp32 weights on the host at a time. A backbone still on the host in fp32
    is moved and cast here; its fp32 storage goes as each parameter is replaced."""

    def __init__(self, backbone, device: torch.device, precision: Precision, compile_model: bool,
                 embed: Callable | None = None) -> None:
        self.backbone, self.device, self.precision = backbone, device, precision
        memory_format = torch.channels_last if backbone.convolutional else torch.preserve_format
        backbone.model.to(device=device, dtype=precision.weights, memory_format=memory_format)
        self.mean = torch.tensor(backbone.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(backbone.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        embed = embed or backbone.embed
        self.embed = torch.compile(embed, dynamic=False) if compile_model else embed
        self.memory_format = memory_format

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Device-side preprocessing: uint8 → the float the library's ToTensor+Normalize would give
        (same op order: /255, −mean, /std, in fp32), then the weights' dtype and memory format."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255).sub_(self.mean).div_(self.std)
        dtype = self.precision.weights if self.precision.autocast is None else torch.float32
        return x.to(dtype=dtype, memory_format=self.memory_format)

    def forward(self, x: torch.Tensor):
        """Embeddings of a prepared batch, in the precision's dtype."""
        if self.precision.autocast is None:
            return self.embed(x)
        with torch.autocast(self.device.type, dtype=self.precision.autocast):
            return self.embed(x)

    def __call__(self, x: torch.Tensor):
        return self.forward(self.prepare(x))


class StageClock:
    """Seconds per stage when profiling: wall time on CPU; on CUDA, events on the stream that does
    the work (read once, at the end, so timing adds no sync to the loop). Off: every call is free."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.spans: dict[str, list] = defaultdict(list)

    def now(self, stream: torch.cuda.Stream | None = None):
        if not self.enabled:
            return None
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def add(self, stage: str, start, end) -> None:
        if not self.enabled:
            return
        if self.cuda:
            self.spans[stage].append((start, end))
        else:
            self.seconds[stage] += end - start

    def add_seconds(self, stage: str, seconds: float) -> None:
        if self.enabled:
            self.seconds[stage] += seconds

    def waiting(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, counting the time the loop sat waiting for the next one."""
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            batch = next(iterator, None)
            self.add_seconds("waiting for workers", time.perf_counter() - began)
            if batch is None:
                return
            yield batch

    def totals(self) -> dict[str, float]:
        if self.cuda and self.spans:
            torch.cuda.synchronize()
        totals = dict(self.seconds)
        for stage, spans in self.spans.items():
            totals[stage] = sum(a.elapsed_time(b) for a, b in spans) / 1000
        return {k: round(v, 4) for k, v in totals.items()}


def _tensors(items) -> Iterator[torch.Tensor]:
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        else:
            yield from _tensors(item)


def _to_device(items: list, device: torch.device) -> list:
    return [item.to(device, non_blocking=True) if isinstance(item, torch.Tensor) else _to_device(item, device)
            for item in items]


def prefetch_to_device(batches: Iterable[tuple], device: torch.device, clock: StageClock) -> Iterator[tuple]:
    """Yield `(meta, inputs)` with `inputs` on `device`, the next batch's copy already queued on a
    side stream; `meta` (rows, status, timings) stays on the host.

    The copy of batch i+1 is issued after the caller has queued batch i's forward, so the copy
    engine works while the compute stream runs. Pinned host memory makes the copy asynchronous;
    `record_stream` keeps the allocator from reusing the inputs while the compute stream reads them.
    """
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def stage(batch):
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            began = clock.now(stream)
            inputs = _to_device(batch[1], device)
            clock.add("host to device", began, clock.now(stream))
        return batch[0], inputs

    iterator = iter(batches)
    staged = stage(next(iterator, None))
    while staged is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(stream)
        for tensor in _tensors(staged[1]):
            tensor.record_stream(compute)
        yield staged
        staged = stage(next(iterator, None))


class HostCopies:
    """Gather a batch's outputs on the device, copy them to the host in one go, read them one
    batch later: `submit` returns the previous batch's result, `drain` the last one.

    On CUDA the device-to-host copy runs on a side stream into pinned memory, and the host waits
    on that copy's event only when the next batch's work is already queued.
    """

    def __init__(self, device: torch.device, clock: StageClock) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.clock, self.pending = clock, None

    def submit(self, outputs: list[torch.Tensor], meta) -> tuple | None:
        gathered = torch.cat([o.float() for o in outputs], dim=1) if outputs else None
        event = None
        if self.stream is not None and gathered is not None:
            host = torch.empty(gathered.shape, dtype=torch.float32, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(gathered.device))
            with torch.cuda.stream(self.stream):
                began = self.clock.now(self.stream)
                host.copy_(gathered, non_blocking=True)
                self.clock.add("device to host", began, self.clock.now(self.stream))
                event = torch.cuda.Event()
                event.record(self.stream)
            gathered.record_stream(self.stream)
            gathered = host
        previous, self.pending = self.pending, (event, gathered, meta)
        return self._finish(previous)

    def drain(self) -> tuple | None:
        previous, self.pending = self.pending, None
        return self._finish(previous)

    @staticmethod
    def _finish(item) -> tuple | None:
        if item is None:
            return None
        event, gathered, meta = item
        if event is not None:
            event.synchronize()
        # a copy: the pinned block returns to torch's host cache once `gathered` is dropped
        return (None if gathered is None else gathered.numpy().copy()), meta
