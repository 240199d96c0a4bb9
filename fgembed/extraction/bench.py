"""What a backbone costs at inference (the accuracy-vs-cost study's question): parameters, multiply-adds, speed, memory.

Counts come from torch's `FlopCounterMode` on one preprocessed image. It counts FLOPs with a
multiply-add as two, so `gmacs = flops / 2` is what timm's benchmark reports as GMACs and
`gflops = 2 × gmacs`. Matmuls, convolutions and attention are counted; norms, activations and
pooling are not (well under 1% of a ResNet-50 or ViT-B: timm's table lists 4.11 and 17.58 GMACs,
this counts 4.09 and 17.56). Timings run on random tensors of the backbone's own input shape (its
library's preprocessing decides it) through extraction's device path and precision; the
end-to-end figure runs `fgembed.extraction.extract` on generated JPEGs, decode included, after
its first batch. It runs first: on CPU the model-only figure then uses the forward threads the
extraction settled on, so the two time the same forward (see `bench_backbone`).

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over the throughput run (weights and
activations; the allocator's cache excluded); on CPU, the process's peak resident set during the
run (Linux's VmHWM, reset through /proc/self/clear_refs) minus its resident set before the model
was built (freed memory handed back to the OS first) — weights and activations again. Where
/proc is missing, the growth of `ru_maxrss`.

Results can be written into a store's `features/<name>` attributes under `cost`, outside the
fingerprint: `{params, gmacs, gflops, input_shape, measurements: {"<device> <precision>": …}}`.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..backbones import Backbone, LoadOptions, load_backbone
from ..cpu import available_cores
from ..datasets.table import TRAIN, SampleTable
from ..devices import (
    DeviceModel,
    Precision,
    backend_flags,
    resolve_device,
    resolve_precision,
)
from ..errors import FgembedError
from ..progress import progress_bar
from ..store import FeatureStore
from .extract import ExtractOptions, extract

E2E_IMAGE_SIZE = (500, 375)  # a typical CUB photo: decode and resize cost like real data


@dataclass
class BenchOptions:
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    load: LoadOptions = field(default_factory=LoadOptions)
    warmup: int = 3
    repeats: int = 10  # timed batches for throughput
    latency_repeats: int = 30  # timed single images for p50 / p95
    images: int = 128  # JPEGs for the end-to-end figure; 0 skips it
    workers: int | None = None  # decode processes for the end-to-end run; None: extraction's default
    compile: bool = False  # torch.compile the embedding function, as `fgembed extract --compile`
    progress: bool = True


@dataclass
class CostResult:
    backbone: str
    params: int
    gmacs: float  # multiply-adds per image, in billions
    gflops: float  # 2 × gmacs
    throughput: float  # images/s at batch_size, the forward alone on prepared batches
    latency_p50_ms: float  # batch 1
    latency_p95_ms: float
    peak_memory_mb: float
    e2e_images_per_s: float | None  # files → store after the first batch, decode included; None when skipped
    device: str
    precision: str
    batch_size: int
    input_shape: list[int]
    device_name: str
    peak_memory_kind: str
    threads: int | None = None  # CPU: the forward's threads, in both figures (the extraction's choice)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU flash kernel: the same formula for it.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}


def count_macs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Multiply-adds of `fn(x)` over the whole batch: FlopCounterMode's FLOPs / 2.

    nn.MultiheadAttention's fused inference path is one opaque op to the counter; it is turned
    off while counting so its matmuls are seen (the numbers do not change).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter, torch.inference_mode():
            fn(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _proc_kb(field_name: str) -> int | None:
    """A `Vm…` line of /proc/self/status in kB (Linux), else None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_kb("VmHWM") is not None


def _release_freed_memory() -> None:
    """Hand memory freed by earlier models back to the OS (glibc keeps it mapped otherwise), so the
    next model's resident-set growth is its own, not a reuse of pages already counted as resident."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _maxrss_kb() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage // 1024 if platform.system() == "Darwin" else usage  # bytes on macOS, kB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {line.split(':', 1)[1].strip()}"
    return f"cpu {platform.processor() or platform.machine()}"


def _measure(backbone: Backbone, device: torch.device, precision: Precision, options: BenchOptions,
             rss_before_kb: int | None, threads: int | None) -> dict:
    """Model-only timings through extraction's own device path (`DeviceModel`: weights cast once,
    channels-last for convolutional models, optional compile), on a prepared random batch; on
    CPU with `threads` forward threads (the count the end-to-end run's forward settled on)."""
    model = DeviceModel(backbone, device, precision, options.compile)
    generator = torch.Generator().manual_seed(0)
    batch = model.prepare(torch.randn(options.batch_size, *backbone.input_shape, generator=generator).to(device))
    single = batch[:1].clone()  # clone keeps the memory format

    with torch.inference_mode(), backend_flags(device, precision):
        if threads is not None:
            torch.set_num_threads(threads)
        for _ in range(options.warmup):
            model.forward(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        hwm = rss_before_kb is not None and _reset_peak_rss()
        maxrss = _maxrss_kb()
        seconds = _timed(lambda: [model.forward(batch) for _ in range(options.repeats)], device)  # one sync
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
        elif hwm:
            peak, kind = (_proc_kb("VmHWM") - rss_before_kb) / 1024, "peak RSS minus RSS before load"
        else:
            peak, kind = (_maxrss_kb() - maxrss) / 1024, "growth of ru_maxrss"
        for _ in range(options.warmup):
            model.forward(single)
        latencies = np.array([_timed(lambda: model.forward(single), device)
                              for _ in range(options.latency_repeats)]) * 1000
    return {"throughput": options.batch_size * options.repeats / seconds,
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p95_ms": float(np.percentile(latencies, 95)),
            "peak_memory_mb": float(peak), "peak_memory_kind": kind}


def _synthetic_table(root: Path, n: int) -> SampleTable:
    """`n` generated JPEGs of photo size (one class), for the end-to-end figure."""
    from ..synthetic import generate

    records = generate(root, groups=1, classes_per_group=1, per_class=n, size=E2E_IMAGE_SIZE, test_fraction=0)
    return SampleTable("synthetic", str(root), np.arange(n), [r.path for r in records], np.zeros(n),
                       [records[0].class_name], np.full(n, TRAIN))


def bench_backbone(name: str, options: BenchOptions, images: SampleTable | None = None) -> CostResult:
    """Measure one backbone; `images` (generated JPEGs) gives the end-to-end figure.

    The two throughputs measure the same forward: the end-to-end run goes first, and on CPU the
    model-only run then uses the forward threads it settled on (decode workers take cores from the
    forward; timing the model alone on every core would compare two different forwards — on a
    shared or small machine more threads can even be slower, so the model-only figure came out
    below the end-to-end one)."""
    if min(options.batch_size, options.repeats, options.latency_repeats) < 1 or options.warmup < 0:
        raise FgembedError("--batch-size and --repeats must be at least 1, --warmup at least 0")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    e2e, threads = None, None
    if images is not None:
        with tempfile.TemporaryDirectory(prefix="fgembed-bench-") as tmp:
            summary = extract(images, str(Path(tmp) / "bench.zarr"), [name], ExtractOptions(
                batch_size=options.batch_size, workers=options.workers, device=str(device),
                precision=options.precision, load=options.load, shard_rows=max(options.batch_size, 256),
                compile=options.compile, progress=False))
        e2e = summary.steady_images_per_s or summary.images_per_s  # after the first batch (worker start-up)
        threads = summary.forward_threads[-1][0] if summary.forward_threads else None
        gc.collect()
    if device.type == "cpu":
        threads = threads or min(torch.get_num_threads(), available_cores())
        _release_freed_memory()
    rss_before = _proc_kb("VmRSS") if device.type == "cpu" else None
    backbone = load_backbone(name, options.load)
    params = count_params(backbone.model)
    macs = count_macs(backbone.embed, torch.zeros(1, *backbone.input_shape))
    measured = _measure(backbone, device, precision, options, rss_before, threads)
    input_shape = list(backbone.input_shape)
    del backbone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return CostResult(name, params, macs / 1e9, 2 * macs / 1e9, measured["throughput"],
                      measured["latency_p50_ms"], measured["latency_p95_ms"], measured["peak_memory_mb"], e2e,
                      device.type, precision.name, options.batch_size, input_shape, device_name(device),
                      measured["peak_memory_kind"], threads)


def bench(names: list[str], options: BenchOptions | None = None, store: FeatureStore | None = None
          ) -> list[CostResult]:
    """Measure each backbone in turn; with `store`, also record each result there (`write_cost`)."""
    options = options or BenchOptions()
    if not names:
        raise FgembedError("name at least one --backbone")
    if store is not None:
        for name in names:
            store.backbone_info(name)  # refuse a name the store lacks before measuring anything
    results = []
    with contextlib.ExitStack() as stack:
        images = None
        if options.images > 0:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fgembed-bench-images-")))
            images = _synthetic_table(tmp, options.images)
        with progress_bar(len(names), "bench", options.progress, unit="model") as tick:
            for name in names:
                result = bench_backbone(name, options, images)
                if store is not None:
                    write_cost(store, result)
                results.append(result)
                tick(1)
    return results


def _measurement_key(result: CostResult) -> str:
    return f"{result.device_name} {result.precision}"


def write_cost(store: FeatureStore, result: CostResult) -> dict:
    """Record `result` under `cost` in the backbone's group attrs (outside its fingerprint).

    Counts are per model and input shape; timings are kept per device and precision, so a GPU
    run and a CPU run of the same backbone sit side by side. Refuses a result measured at
    another input shape than the stored features were extracted at.
    """
    stored_shape = store.backbone_info(result.backbone).fingerprint.get("input_shape")
    if stored_shape is not None and list(stored_shape) != result.input_shape:
        raise FgembedError(f"{result.backbone!r} was benchmarked at input {result.input_shape} but its features in "
                           f"{store.path} were extracted at {list(stored_shape)}; pass the same --image-size")
    cost = store.backbone_attrs(result.backbone).get("cost") or {}
    counts = {"params": result.params, "gmacs": result.gmacs, "gflops": result.gflops,
              "input_shape": result.input_shape}
    if any(cost.get(k) != v for k, v in counts.items()):
        cost = {}  # another model or input: its old timings no longer apply
    timing = {k: v for k, v in asdict(result).items() if k not in counts and k != "backbone"}
    cost = {**counts, "measurements": {**cost.get("measurements", {}), _measurement_key(result): {
        **timing, "torch": torch.__version__, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}}
    store.record_backbone_attrs(result.backbone, cost=cost)
    return cost


def read_cost(store: FeatureStore, backbone: str) -> dict | None:
    """The `cost` record `write_cost` left for `backbone` in `store`, or None if never benchmarked."""
    return store.backbone_attrs(backbone).get("cost")
