"""Describe the machine a benchmark ran on (CPU and its int8 features, cores, RAM, OS, Python, package versions)."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from xray_edge.benchmarks.peak import cpu_ghz, hardware_int8_bound, int8_features

PACKAGES = ("xray-edge", "numpy", "onnxruntime", "opencv-python-headless", "pydicom", "tensorflow-cpu", "tensorflow",
            "keras", "ai-edge-litert", "scikit-learn", "matplotlib")


def _cpu_model() -> str:
    """CPU model from /proc/cpuinfo ("model name", or "Model"/"Hardware" on ARM boards)."""
    try:
        lines = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    for key in ("model name", "Model", "Hardware"):
        for line in lines:
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(threads: int) -> dict[str, Any]:
    """Machine description for the results files."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gb": _ram_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": _versions(),
        "int8_features": int8_features(),
        "hw_int8_bound": hardware_int8_bound(int8_features(), usable, cpu_ghz()),
        "threads": threads,
        "load_average_start": load_average(),
    }
