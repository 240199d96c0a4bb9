"""How many cores this process really has, and torch's thread count sized to them.

On shared machines (a cluster node, a CI runner, a laptop running other work) a core counted
by `os.cpu_count()` is often not ours: the affinity mask (taskset, Slurm, a cpuset cgroup) and
a CPU quota (Docker's `--cpus`, a Kubernetes limit: cgroup `cpu.max`) give less. OpenMP
threads beyond the cores a process really gets spin at every barrier while their core runs
someone else, and small kernels then run several times slower than on one thread.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _quota_v2() -> float | None:
    """cgroup v2: `cpu.max` of this process's cgroup ("max 100000" or "QUOTA PERIOD")."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    own = next((entry.split(":", 2)[2] for entry in lines if entry.startswith("0::")), None)
    if own is None:
        return None
    try:
        quota, period = (CGROUP / own.lstrip("/") / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1() -> float | None:
    """cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` (a quota of -1 is none)."""
    for folder in (CGROUP / "cpu", CGROUP / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def cpu_quota() -> float | None:
    """The CPU quota in cores (e.g. 1.5), or None when there is none."""
    quota = _quota_v2()
    return quota if quota is not None else _quota_v1()


def available_cores() -> int:
    """The cores this process may use: its affinity mask, capped by its CPU quota (rounded up:
    a 1.5-core quota still runs two threads part of the time), its share under torchrun."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to `n` (at least 1), then restore it."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)
