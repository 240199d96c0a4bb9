"""Start-up and the CPU: the forward's thread split follows measured demand and speed, workers
start before the models build, each model is built once, a job imports only the source
libraries it uses, and the progress bar's rate is the wall-time rate the summary reports."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest
from rich.progress import Progress

import fgembed.extraction.extract as engine
from fgembed.backbones import LoadOptions
from fgembed.datasets import load_dataset
from fgembed.extraction.extract import ExtractOptions, extract
from fgembed.extraction.threads import WINDOW, ForwardThreads
from fgembed.progress import RateColumn, RemainingColumn


def _feed(threads: ForwardThreads, seconds_per_image: dict[int, float], worker_cpu_per_image: float,
          windows: int) -> list[int]:
    """Drive `threads` through `windows` measured windows of a model whose loop takes
    `seconds_per_image[threads]`; return the thread count in force after each window."""
    seen = []
    for _ in range(windows):
        per_image = seconds_per_image[threads.threads]
        threads._window(per_image, worker_cpu_per_image / per_image)
        seen.append(threads.threads)
    return seen


def test_a_mostly_idle_worker_costs_the_forward_nothing():
    """ResNet-50 on 2 cores: the worker needs 4.5 ms of 120 ms per image. The forward is offered the
    second core, runs faster with it, keeps it."""
    threads = ForwardThreads(workers=1, cores=2, ceiling=2)
    assert threads.threads == 1
    assert _feed(threads, {1: 0.120, 2: 0.066}, 0.0045, 3) == [2, 2, 2]


def test_a_busy_worker_keeps_its_core():
    """Tiny models: the worker needs 5.5 ms of an 8.5 ms loop: no thread is offered."""
    threads = ForwardThreads(workers=1, cores=2, ceiling=2)
    assert _feed(threads, {1: 0.0085, 2: 0.0060}, 0.0055, 3) == [1, 1, 1]


def test_an_offer_that_runs_slower_is_taken_back():
    """On a machine other work shares, two threads can be slower than one: measured, reverted."""
    threads = ForwardThreads(workers=1, cores=2, ceiling=2)
    assert _feed(threads, {1: 0.030, 2: 0.042}, 0.002, 4) == [2, 1, 1, 1]
    assert [t for t, _ in threads.history] == [1, 2, 1]  # not offered again at once


def test_batches_feed_windows(monkeypatch):
    """The first batch is a reading of its own, over its busy time (its wall time is start-up);
    then a window closes every WINDOW batches, over wall time."""
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("fgembed.extraction.threads.time.perf_counter", lambda: next(clock))
    threads = ForwardThreads(workers=0, cores=4, ceiling=4)
    calls = []
    monkeypatch.setattr(threads, "_window", lambda per_image, demand: calls.append((per_image, demand)))
    threads.batch_done(10, 0.2, 0.5)  # forward 0.5 s once the batch was there
    for _ in range(2 * WINDOW):
        threads.batch_done(10, 0.5, 0.2)  # 1 s apart: waiting for the workers counts
    assert calls == [(0.05, 0.4), (0.1, 0.5), (0.1, 0.5)]


def test_workers_start_before_the_models_build_once(manifest_csv, tmp_path, monkeypatch):
    table = load_dataset("manifest", manifest_csv)
    builds = []
    real = engine.load_backbone

    def watched(name, *args, **kwargs):
        builds.append((name, len(multiprocessing.active_children())))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(engine, "load_backbone", watched)
    names = ["timm:test_vit", "timm:test_vit~mean", "timm:test_vit~linear4~flip", "timm:test_resnet"]
    summary = extract(table, tmp_path / "s.zarr", names, ExtractOptions(
        batch_size=8, workers=1, shard_rows=16, progress=False, device="cpu", load=LoadOptions(pretrained=False)))
    assert [name for name, _ in builds] == ["timm:test_vit", "timm:test_resnet"]  # one build per model
    assert all(workers >= 1 for _, workers in builds)  # the decode worker was already running
    assert list(summary.backbones) == names


def test_a_job_imports_only_the_source_libraries_it_uses(manifest_csv, tmp_path):
    code = (
        "import sys\n"
        "from fgembed.cli.main import main\n"
        f"code = main(['extract', '--dataset', 'manifest', '--root', {str(manifest_csv)!r}, '--store', "
        f"{str(tmp_path / 's.zarr')!r}, '--backbone', 'timm:test_resnet', '--no-pretrained', '--workers', '0', "
        "'--device', 'cpu', '--quiet'])\n"
        "print(code, 'timm' in sys.modules, 'transformers' in sys.modules, 'open_clip' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split()[-4:] == ["0", "True", "False", "False"], proc.stderr[-2000:]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("burst", [0.001, 0.0])
def test_the_bar_rate_is_the_wall_time_rate(burst):
    """Two batches of 64: the first at 10 s (start-up), the last read out right after it (copies
    are read a batch late, the last drained at once). rich's own speed called that 64,000 img/s
    (or nothing); the bar says 128 / 10.001 s, the summary's figure."""
    clock = _Clock()
    with Progress(get_time=clock, disable=True) as progress:
        task_id = progress.add_task("extract", total=128)
        clock.now = 10.0
        progress.update(task_id, advance=64)
        task = progress.tasks[0]
        assert RemainingColumn().render(task).plain == "0:00:10"
        clock.now = 10.0 + burst
        progress.update(task_id, advance=64)
        task = progress.tasks[0]
        assert RateColumn("img").render(task).plain == f"{128 / (10 + burst):,.1f} img/s"
        assert RemainingColumn().render(task).plain == "0:00:00"


def test_a_lost_trial_is_offered_again_later():
    """Other work on the machine comes and goes: a count that lost is tried again after RETRY
    windows, after twice that when it loses again, and kept once it runs faster."""
    from fgembed.extraction.threads import RETRY

    threads = ForwardThreads(workers=1, cores=2, ceiling=2)
    slow = {1: 0.030, 2: 0.042}
    assert _feed(threads, slow, 0.002, RETRY + 2) == [2] + [1] * RETRY + [2]
    assert _feed(threads, slow, 0.002, 2 * RETRY + 1) == [1] * 2 * RETRY + [2]
    assert _feed(threads, {1: 0.030, 2: 0.016}, 0.002, 2) == [2, 2]  # the trial under way now wins: kept
