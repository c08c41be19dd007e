"""Where a result came from: the git commit of the code that made it (read once per process)."""

from __future__ import annotations

import functools
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
