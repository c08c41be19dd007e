"""Where a result came from: the git commit of the code and the machine that made it (read once per process)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str:
    """HEAD of the repository this package lives in, or "unknown" (not a checkout, no git). Cached: the code a
    process runs does not change under it, and a subprocess per trial or checkpoint is measurable overhead."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


# the vector units that change which float kernels torch runs, hence a run's digits from one CPU to another
_VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")


@functools.cache
def machine() -> str:
    """One line naming what ran the code: CPU model and its vector units, core count, GPU if torch sees one, torch
    build. Same seed, same machine gives the same digits; across machines the float kernels differ."""
    import torch

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:  # not Linux: the processor string is all there is
        pass
    model = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    units = " ".join(f for f in _VECTOR_FLAGS if f in flags)
    gpu = f"; {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model} ({units or platform.machine()}), {os.cpu_count()} cores{gpu}; torch {torch.__version__}"
