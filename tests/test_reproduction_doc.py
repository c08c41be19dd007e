"""The committed reproduction document regenerates byte for byte from the committed tracking store.

`docs/reproduction.md` is written by `betadiff report --document docs/reproduction.yaml` from
`docs/reproduction/mlflow.db`; a change to the report code that alters a number, a claim or a run id shows here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC, SPEC, STORE = ROOT / "docs/reproduction.md", ROOT / "docs/reproduction.yaml", ROOT / "docs/reproduction/mlflow.db"


@pytest.mark.skipif(not STORE.exists(), reason="no committed reproduction store")
def test_committed_reproduction_document_regenerates(tmp_path):
    store = tmp_path / "docs/reproduction/mlflow.db"  # a copy: reading must not touch the committed file
    store.parent.mkdir(parents=True)
    shutil.copyfile(STORE, store)
    for png in (ROOT / "docs/reproduction").glob("*_samples_*.png"):
        shutil.copyfile(png, store.parent / png.name)  # sample grids: the artifact store stayed on the sweep machine
    out = tmp_path / "docs/reproduction.md"
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.cli", "report", "--document", str(SPEC), "-o", str(out), "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == DOC.read_text()
    figures = {p.name for p in (ROOT / "docs/reproduction").glob("*.png")}
    assert figures and figures <= {p.name for p in store.parent.glob("*.png")}
