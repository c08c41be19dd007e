"""The betadiff dashboard: a local, server-rendered web app over any MLflow tracking URI.

Pages: ``/`` the sweeps with trial counts by status; ``/sweeps/{name}`` the ablation table, grouped curves,
parallel coordinates and sample artifacts side by side, with links into the MLflow UI. Figures are
matplotlib PNGs rendered here and artifacts are streamed from the tracking store, so the browser needs no
network beyond this server (no CDN).

    uvicorn --factory dashboards.app:create_app     # tracking URI from BETADIFF_TRACKING_URI / MLFLOW_...
    betadiff dashboard --tracking-uri sqlite:///mlflow.db --mlflow-ui http://127.0.0.1:5000
"""

from __future__ import annotations

import mimetypes
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from betadiff.report import figures
from betadiff.report.table import FORMATS, Ablation, ablation
from betadiff.report.tracking import (
    ReportError,
    SweepRuns,
    connect,
    list_sweeps,
    load_sweep,
    resolve_tracking_uri,
)

HERE = Path(__file__).parent
CACHE_TTL_S = 15.0  # a page view and the figures it embeds share one read of the store
_MEDIA = {
    "md": "text/markdown",
    "tex": "text/x-tex",
    "csv": "text/csv",
    "json": "application/json",
    "html": "text/html",
}


class _SweepCache:
    """(sweep name, value) -> (SweepRuns, Ablation), kept for CACHE_TTL_S."""

    def __init__(self, uri: str, client) -> None:
        self.uri, self.client = uri, client
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str | None], tuple[float, SweepRuns, Ablation]] = {}

    def get(self, name: str, value: str | None) -> tuple[SweepRuns, Ablation]:
        key = (name, value)
        with self._lock:
            hit = self._items.get(key)
            if hit and time.monotonic() - hit[0] < CACHE_TTL_S:
                return hit[1], hit[2]
        sr = load_sweep(name, self.uri, client=self.client)
        ab = ablation(sr, value=value)
        with self._lock:
            self._items[key] = (time.monotonic(), sr, ab)
        return sr, ab


def create_app(tracking_uri: str | None = None, mlflow_ui: str | None = None) -> FastAPI:
    """The app for one tracking store; ``mlflow_ui`` (base URL of an MLflow UI on the same store) adds
    links to each run and experiment."""
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    cache = _SweepCache(uri, client)
    artifacts = Path(tempfile.mkdtemp(prefix="betadiff-dash-"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        shutil.rmtree(artifacts, ignore_errors=True)

    app = FastAPI(title="betadiff dashboard", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    ui = mlflow_ui.rstrip("/") if mlflow_ui else None

    def run_url(exp_id: str, run_id: str) -> str | None:
        return f"{ui}/#/experiments/{exp_id}/runs/{run_id}" if ui else None

    def page(request: Request, template: str, status: int = 200, **ctx) -> HTMLResponse:
        return templates.TemplateResponse(
            request, template, dict(uri=uri, mlflow_ui=ui, **ctx), status_code=status
        )

    def error(request: Request, e: ReportError) -> HTMLResponse:
        return page(request, "error.html", status=404, message=str(e))

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        sweeps = list_sweeps(client).to_dict("records")
        for s in sweeps:
            s["href"] = f"/sweeps/{quote(s['name'], safe='')}"
            s["ui_href"] = f"{ui}/#/experiments/{s['experiment_id']}" if ui else None
            s["started"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(s["start_time"] / 1000))
        return page(request, "index.html", sweeps=sweeps)

    @app.get("/sweeps/{name}", response_class=HTMLResponse)
    def sweep(request: Request, name: str, value: str | None = None):
        try:
            sr, ab = cache.get(name, value)
        except ReportError as e:
            return error(request, e)
        qv = f"?value={quote(ab.value)}"
        keys = ab.rows + ab.cols
        cells = figures.run_cells(ab.tidy, keys)
        samples = []
        for cell, ids in cells.items():
            for rid in ids:
                names = {a.path for a in client.list_artifacts(rid)}
                if "samples.png" in names:
                    samples.append(
                        dict(
                            label=figures.cell_label(keys, cell),
                            run_id=rid,
                            src=f"/artifacts/{rid}/samples.png",
                            href=run_url(sr.experiment_id, rid),
                        )
                    )
                    break
        counts = sr.runs["status"].value_counts().to_dict()
        return page(
            request,
            "sweep.html",
            name=name,
            ab=ab,
            sr=sr,
            counts=sorted(counts.items()),
            table=ab.render("html", run_url=(lambda r: run_url(sr.experiment_id, r)) if ui else None),
            curves=[(m, f"/sweeps/{quote(name, safe='')}/curves/{quote(m)}.png{qv}") for m in ab.metrics],
            parallel=[(m, f"/sweeps/{quote(name, safe='')}/parallel/{quote(m)}.png{qv}") for m in ab.metrics],
            samples=samples,
            downloads=[(f, f"/sweeps/{quote(name, safe='')}/table.{f}{qv}") for f in FORMATS],
            values=["last", "best"],
            ui_href=f"{ui}/#/experiments/{sr.experiment_id}" if ui else None,
            parent_href=run_url(sr.experiment_id, sr.parent_run_id),
        )

    @app.get("/sweeps/{name}/table.{fmt}")
    def table(name: str, fmt: str, value: str | None = None):
        try:
            _, ab = cache.get(name, value)
            return Response(ab.render(fmt), media_type=_MEDIA[fmt])
        except ReportError as e:
            return PlainTextResponse(str(e), status_code=404)

    @app.get("/sweeps/{name}/{kind}/{metric}.png")
    def figure(name: str, kind: str, metric: str, value: str | None = None):
        try:
            sr, ab = cache.get(name, value)
        except ReportError as e:
            return PlainTextResponse(str(e), status_code=404)
        if metric not in ab.metrics or kind not in ("curves", "parallel"):
            return PlainTextResponse(
                f"no {kind} figure for {metric!r}; metrics: {', '.join(ab.metrics)}", status_code=404
            )
        keys = ab.rows + ab.cols
        if kind == "curves":
            fig = figures.curves_figure(ab.history, figures.run_cells(ab.tidy, keys), keys, metric)
        else:
            varied = [f for f in sr.factors if ab.tidy[f].nunique() > 1] if len(ab.tidy) else []
            fig = figures.parallel_coordinates_figure(ab.tidy, varied, metric)
        return Response(figures.to_png_bytes(fig), media_type="image/png")

    @app.get("/artifacts/{run_id}/{path:path}")
    def artifact(run_id: str, path: str):
        if not run_id.isalnum() or ".." in Path(path).parts or path.startswith("/"):
            return PlainTextResponse("bad artifact path", status_code=400)
        try:
            local = Path(client.download_artifacts(run_id, path, str(artifacts / run_id)))
        except Exception as e:  # unknown run or artifact
            return PlainTextResponse(
                f"artifact {path!r} of run {run_id!r}: {str(e).splitlines()[0][:200]}", status_code=404
            )
        if not local.is_file():
            return PlainTextResponse(f"artifact {path!r} of run {run_id!r} is a directory", status_code=404)
        return FileResponse(
            local, media_type=mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        )

    return app
