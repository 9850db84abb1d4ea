"""What this process can run on: usable cores (CPU affinity and the cgroup CPU quota), load, versions.

Light on purpose (no torch or onnxruntime import at module level): thread-count defaults and `sejd bench`
both read it. `root` is the cgroup file system's mount point, a parameter so tests can use a fake tree.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # missing file, no permission, not a cgroup file system
        return None


def _cores(quota: str, period: str) -> float | None:
    """A quota and a period (microseconds, as text) as cores; None for no limit ("max", -1) or nonsense."""
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max" (cgroup v2: no limit) or unreadable text
        return None
    return q / p if q > 0 and p > 0 else None  # cgroup v1 writes -1 for no limit


def cgroup_quota_cores(root: Path | str = CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in cores (e.g. 1.5), or None where there is none or it cannot be read.

    cgroup v2: `cpu.max` holds "QUOTA PERIOD" or "max PERIOD". cgroup v1: `cpu/cpu.cfs_quota_us` (-1: none)
    over `cpu/cpu.cfs_period_us`."""
    root = Path(root)
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        return _cores(parts[0], parts[1]) if len(parts) == 2 else None
    quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    return None if quota is None or period is None else _cores(quota, period)


def affinity_count() -> int:
    """CPUs this process may be scheduled on (os.cpu_count() where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def usable_cores(root: Path | str = CGROUP_ROOT) -> int:
    """min(CPUs in the affinity mask, the cgroup quota rounded up), at least 1."""
    cores = affinity_count()
    quota = cgroup_quota_cores(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return tuple(os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_info(extra: dict | None = None, root: Path | str = CGROUP_ROOT) -> dict:
    """Where a measurement ran: platform, cores (all, usable, affinity, cgroup quota), load, versions, and
    PyTorch's thread count; `extra` is merged in last. torch and onnxruntime are imported here, not above."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cores": usable_cores(root), "affinity_cores": affinity_count(),
            "cgroup_quota_cores": cgroup_quota_cores(root), "load_average": load_average(),
            "python": platform.python_version()}
    import torch

    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    try:
        import onnxruntime
    except ImportError:  # an optional extra
        pass
    else:
        info["onnxruntime"] = onnxruntime.__version__
    info.update(extra or {})
    return info


__all__ = ["usable_cores", "cgroup_quota_cores", "affinity_count", "load_average", "machine_info"]
