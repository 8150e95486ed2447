"""Memory and compute utilization of this process, for the guide's health indicators.

Memory (indicator: < 85 %):
- CPU: this process's resident memory / the memory it may use (the cgroup limit of its container
  when there is one, else the host's RAM). Node-wide memory is Ray's own `ray_node_mem_*` metrics.
- CUDA: used / total memory of the device, as `nvidia-smi` counts it (`torch.cuda.mem_get_info`,
  so memory held by other processes on a shared GPU counts too: that is what runs out).

Compute (indicator: > 70 %):
- CPU: process CPU time over the last interval / (interval × the cores it may use).
- CUDA: the device's utilization over the driver's last sample period (`torch.cuda.utilization`,
  which needs `nvidia-ml-py`); None when that is not installed, never a made-up number.

CUDA is only looked at in a process that already initialized CUDA: sampling never creates a CUDA
context (that alone would take hundreds of MB of GPU memory in every actor). Linux only for the
CPU side (/proc, cgroups); elsewhere the values are None. Never imports ray.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX rounded); anything above this is unlimited.
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class ResourceSample:
    """One device's utilization ratios in [0, 1]; None where unknown."""

    device: str  # "cpu" or "cuda:<index>"
    memory_utilization: float | None
    compute_utilization: float | None


def ratio(used: float | None, total: float | None) -> float | None:
    """used / total clamped to [0, 1]; None when either is unknown or total is not positive."""
    if used is None or total is None or total <= 0:
        return None
    return min(1.0, max(0.0, used / total))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 directory and its ancestors up to `root` (a limit may sit on any)."""
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0":  # the cgroup v2 unified hierarchy
            own = root / parts[2].strip("/")
            return [own, *[parent for parent in own.parents if parent.is_relative_to(root)]]
    return [root]


def cgroup_memory_limit_bytes(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest memory limit on this process's cgroups (v2 memory.max, v1 limit_in_bytes); None: none."""
    limits = [int(value) for directory in _cgroup_dirs(root, proc_cgroup)
              if (value := _read(directory / "memory.max")) is not None and value.isdigit()]
    value = _read(root / "memory" / "memory.limit_in_bytes")
    if value is not None and value.isdigit() and int(value) < _V1_UNLIMITED:
        limits.append(int(value))
    return min(limits) if limits else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota on this process's cgroups in CPUs (v2 cpu.max, v1 cfs quota); None: none."""
    limits = []
    for directory in _cgroup_dirs(root, proc_cgroup):
        quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
        if quota.isdigit() and int(quota) > 0:
            limits.append(int(quota) / int(period or "100000"))
    quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota and period and quota.isdigit() and int(quota) > 0 and period.isdigit():
        limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def process_rss_bytes(statm: Path = Path("/proc/self/statm")) -> int | None:
    text = _read(statm)
    if not text:
        return None
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_limit_bytes() -> int | None:
    """What this process may use: the smaller of the cgroup limit and the host's RAM."""
    limits = [limit for limit in (cgroup_memory_limit_bytes(), host_memory_bytes()) if limit]
    return min(limits) if limits else None


def usable_cores() -> float:
    """CPUs this process may run on: its affinity mask, capped by the container's CPU quota."""
    try:
        cores: float = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def cpu_memory_utilization() -> float | None:
    return ratio(process_rss_bytes(), memory_limit_bytes())


def _torch_cuda_ready() -> bool:
    """True only if this process already imported torch and initialized CUDA."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def cuda_memory_utilization(device: int) -> float | None:
    if not _torch_cuda_ready():
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return ratio(total - free, total)


def cuda_compute_utilization(device: int) -> float | None:
    """Device utilization in [0, 1]; None without nvidia-ml-py (pynvml) or without CUDA in this process."""
    if not _torch_cuda_ready():
        return None
    import torch

    try:
        return ratio(torch.cuda.utilization(device), 100.0)
    except (ImportError, ModuleNotFoundError, RuntimeError):
        return None


class CpuUtilizationMeter:
    """Process CPU time / (wall time × cores) between consecutive `read()` calls."""

    def __init__(self, cores: float | None = None, clock: Callable[[], float] = time.monotonic,
                 cpu_time: Callable[[], float] | None = None):
        if cores is not None and cores <= 0:
            raise ValueError(f"cores={cores} must be > 0 (the CPUs the process may use)")
        self.cores = cores
        self.clock = clock
        self.cpu_time = cpu_time or (lambda: sum(os.times()[:2]))  # user + system of this process
        self._last = (self.clock(), self.cpu_time())

    def read(self) -> float | None:
        """Utilization since the previous read (or construction); None for a zero-length interval."""
        now, cpu = self.clock(), self.cpu_time()
        (then, cpu_then), self._last = self._last, (now, cpu)
        wall = now - then
        if wall <= 0:
            return None
        return ratio(cpu - cpu_then, wall * (self.cores or usable_cores()))


class ResourceSampler:
    """Samples this process: always the CPU, plus the current CUDA device once CUDA is in use."""

    def __init__(self, cores: float | None = None):
        self.cpu = CpuUtilizationMeter(cores)

    def sample(self) -> list[ResourceSample]:
        samples = [ResourceSample("cpu", cpu_memory_utilization(), self.cpu.read())]
        if _torch_cuda_ready():
            import torch

            index = torch.cuda.current_device()
            samples.append(ResourceSample(f"cuda:{index}", cuda_memory_utilization(index),
                                          cuda_compute_utilization(index)))
        return samples

