"""A one-line description of this machine, printed next to every measured figure."""

from __future__ import annotations

import platform
from importlib import metadata

from tutor.engine.memory import cpu_count


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info = handle.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.machine(),
    )
    return f"{model}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(device: str = "cpu") -> str:
    where = f"{_cpu_model()}, {cpu_count()} cores"
    if device.startswith("cuda"):
        import torch

        where = f"{torch.cuda.get_device_name(torch.device(device))} (host: {where})"
    return f"{where}; torch {_version('torch')}, bitsandbytes {_version('bitsandbytes')}"
