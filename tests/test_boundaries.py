"""Structural guards: platform/ is never a package; the core imports no ray/optuna/mlflow."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_not_a_python_package():
    assert not (ROOT / "platform" / "__init__.py").exists(), "platform/__init__.py shadows the stdlib module"
    assert not list((ROOT / "platform").rglob("__init__.py"))


def test_stdlib_platform_resolves_from_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip()


def test_core_imports_no_platform_libraries():
    code = ("import sys, betadiff, betadiff.train, betadiff.cli, betadiff.losses, betadiff.sampling, "
            "betadiff.metrics, betadiff.data, betadiff.plots\n"
            "bad = sorted(m for m in ('ray', 'optuna', 'mlflow') if m in sys.modules)\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"
