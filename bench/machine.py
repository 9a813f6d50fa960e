"""What the numbers were measured on.

Throughput figures are meaningless without the machine they came from, and on a shared or
small VM the load from other processes matters as much as the CPU model, so the load average
and any cgroup CPU quota are recorded next to the hardware.
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from typing import Any

import torch


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """The first `model name` in /proc/cpuinfo (falls back to platform.processor())."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ram_bytes() -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def cgroup_cpu_quota() -> str | None:
    """cgroup v2 `cpu.max` ("max 100000" means no quota); a quota below the core count throttles threads."""
    text = _read("/sys/fs/cgroup/cpu.max")
    return text.strip() if text else None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def describe(device: str) -> dict[str, Any]:
    """A JSON-able description of the machine and the software the run used."""
    import kafka

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cgroup_cpu_max": cgroup_cpu_quota(),
        "ram_bytes": ram_bytes(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kafka_python": getattr(kafka, "__version__", "unknown"),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
