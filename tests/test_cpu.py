"""The cores a process really has: affinity, cgroup v1 and v2 CPU quotas, torchrun's share."""
from __future__ import annotations

import torch

from fgembed import cpu


def _fake_cgroups(monkeypatch, tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc").write_text("0::/job\n" if v2 is not None else "1:cpu:/\n")
    monkeypatch.setattr(cpu, "PROC_CGROUP", tmp_path / "proc")
    monkeypatch.setattr(cpu, "CGROUP", tmp_path / "cg")
    if v2 is not None:
        (tmp_path / "cg" / "job").mkdir(parents=True)
        (tmp_path / "cg" / "job" / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cg" / "cpu").mkdir(parents=True)
        (tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (tmp_path / "cg" / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))


def test_quota_caps_the_affinity_mask(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    _fake_cgroups(monkeypatch, tmp_path, v2="150000 100000\n")  # docker --cpus 1.5
    assert cpu.cpu_quota() == 1.5 and cpu.available_cores() == 2
    _fake_cgroups(monkeypatch, tmp_path / "b", v2="max 100000\n")
    assert cpu.cpu_quota() is None and cpu.available_cores() == 16
    _fake_cgroups(monkeypatch, tmp_path / "c", v1=(400000, 100000))
    assert cpu.available_cores() == 4
    _fake_cgroups(monkeypatch, tmp_path / "d", v1=(-1, 100000))  # v1's "no quota"
    assert cpu.available_cores() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four ranks share what there is
    assert cpu.available_cores() == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    assert cpu.available_cores() == 1  # never zero


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with cpu.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
