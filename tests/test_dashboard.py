"""The dashboard over a real MLflow store: FastAPI's TestClient, then end to end in headless Chromium."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from betadiff.report import ablation

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def load_test_module(name: str):
    """A sibling test file as a module (tests/ is not a package under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(name[:-3], Path(__file__).with_name(name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return load_test_module("test_report_store.py").shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def client(store):
    from fastapi.testclient import TestClient

    from dashboards.app import create_app

    with TestClient(create_app(store["uri"], mlflow_ui="http://127.0.0.1:5999")) as c:
        yield c


def _cells(page: str) -> dict[str, str]:
    """data-run-ids -> visible text of each non-empty ablation cell."""
    out = {}
    for ids, inner in re.findall(
        r'<td class="[^"]*" data-metric="[^"]*" data-n="\d+" data-run-ids="([^"]+)">(.*?)</td>', page
    ):
        out.setdefault(ids, []).append(
            html.unescape(re.sub(r"<span class=\"runs\">.*?</span>|<[^>]+>", "", inner))
        )
    return out


def test_index_lists_sweeps_with_status_counts(client):
    r = client.get("/")
    assert r.status_code == 200
    row = re.search(r'<a href="/sweeps/toyabl">toyabl</a>.*?</tr>', r.text, re.S).group(0)
    nums = re.findall(r'<td class="num[^"]*">(\d+)</td>', row)
    assert nums == ["11", "9", "1", "1", "0", "1"]  # trials, finished, failed, killed, running, pruned
    assert 'href="http://127.0.0.1:5999/#/experiments/' in row


def test_sweep_page_shows_the_report_table_and_serves_its_images(client, store):
    r = client.get("/sweeps/toyabl")
    assert r.status_code == 200
    ab = ablation("toyabl", tracking_uri=store["uri"])
    expected = ab.render("md")
    cells = _cells(r.text)
    present = ab.summary[~ab.summary["missing"]]
    assert len(cells) == present["run_ids"].map(tuple).nunique() == 3
    for _, c in present.iterrows():
        texts = cells[" ".join(c["run_ids"])]
        assert all(t in expected for t in texts)  # same numbers as `betadiff report`
    assert r.text.count('class="best') == 2
    srcs = [html.unescape(s) for s in re.findall(r'<img[^>]* src="([^"]+)"', r.text)]
    assert len(srcs) == 2 * 2 + 3  # curves + parallel per metric, one sample per non-empty cell
    for src in srcs:
        img = client.get(src)
        assert img.status_code == 200 and img.headers["content-type"] == "image/png", src
        assert img.content[:8] == b"\x89PNG\r\n\x1a\n"
    rid = srcs[-1].split("/")[2]
    local = Path(store["uri"][len("sqlite:///") :]).parent / "artifacts"
    on_disk = local / rid / "artifacts" / "samples.png"
    assert client.get(srcs[-1]).content == on_disk.read_bytes()
    assert f'href="http://127.0.0.1:5999/#/experiments/{store["experiment_id"]}/runs/{rid}"' in r.text


def test_downloads_and_errors(client, store):
    ab = ablation("toyabl", tracking_uri=store["uri"], value="best")
    assert client.get("/sweeps/toyabl/table.tex?value=best").text == ab.render("tex")
    r = client.get("/sweeps/nosuch")
    assert r.status_code == 404 and "sweeps: toyabl" in r.text
    assert client.get("/sweeps/toyabl/curves/fid.png").status_code == 404
    assert client.get("/artifacts/abc/..%2Fx").status_code in (400, 404)
    assert client.get(f"/artifacts/{store['trials'][0]['run_id']}/nothing.png").status_code == 404


def test_ui_serves_the_same_store(store):
    """`betadiff ui` starts the MLflow UI on loopback over the same store."""
    import httpx

    port = _free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "betadiff.report.cli",
            "ui",
            "--tracking-uri",
            store["uri"],
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for _ in range(600):
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10", timeout=10
                )
                break
            except httpx.TransportError:
                assert ui.poll() is None, ui.stdout.read()
                time.sleep(0.5)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    assert r.status_code == 200 and "ablate" in {e["name"] for e in r.json()["experiments"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=10000",
        f"--user-data-dir={tmp / 'profile'}",
        "--window-size=1400,1000",
    ]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)


def render_in_chromium(uri: str, path: str, tmp: Path) -> tuple[str, Path]:
    """Serve the dashboard on ``uri`` with `betadiff dashboard` (loopback, free port), load ``path`` in
    headless Chromium; returns the DOM after scripts ran and the screenshot's path."""
    import httpx

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "betadiff.report.cli",
            "dashboard",
            "--tracking-uri",
            uri,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}{path}"
    try:
        for _ in range(600):  # wait until it serves (imports take a while on a loaded machine)
            try:
                if httpx.get(url, timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        dom = _chromium(url, tmp, "--dump-dom").stdout
        shot = tmp / "dash.png"
        _chromium(url, tmp, f"--screenshot={shot}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"dashboard screenshot: {shot}")
    return dom, shot


def images_loaded(dom: str) -> int:
    """Images the page's script saw loaded; asserts none is broken."""
    m = re.search(r'<body data-images-ok="(\d+)" data-images-total="(\d+)"', dom)
    assert m and m.group(1) == m.group(2), dom[:300]
    return int(m.group(1))


def assert_rendered(shot: Path) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (1000, 1400) and img[..., :3].std() > 0.05  # a rendered page, not a blank one


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="/usr/bin/chromium absent (apt-get install chromium)")
def test_dashboard_in_headless_chromium(store, tmp_path):
    dom, shot = render_in_chromium(store["uri"], "/sweeps/toyabl", tmp_path)
    assert '<table class="ablation"' in dom and "<strong>" in dom
    assert images_loaded(dom) == 7
    assert dom.count('class="sample" ') == 3 and 'data-loaded="0"' not in dom
    assert_rendered(shot)
