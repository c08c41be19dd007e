"""``betadiff report | runs | dashboard | ui`` (dispatched here by betadiff/cli.py).

    betadiff report SWEEP [--rows K..] [--cols K..] [--metrics M..] [--value last|best|at:STEP]
                          [--format md|tex|csv|html|json] [-o FILE ..] [--figures DIR] [--ci] [--budget N]
    betadiff runs ls | diff RUN_A RUN_B | export SWEEP [--metrics M..] [-o FILE.csv|.parquet]
    betadiff dashboard [--host H] [--port P] [--mlflow-ui URL]
    betadiff ui [--host H] [--port P] [--workers N]

SWEEP is a sweep YAML path or a sweep name. Every command takes --tracking-uri (else the sweep file's
tracking.uri, BETADIFF_TRACKING_URI, MLFLOW_TRACKING_URI, sqlite:///mlflow.db). Bad input prints one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
from pathlib import Path

from betadiff.report.table import FORMATS, ablation
from betadiff.report.tracking import ReportError, connect, list_sweeps, load_sweep, resolve_tracking_uri

_SUFFIX_FORMAT = {".md": "md", ".tex": "tex", ".csv": "csv", ".html": "html", ".htm": "html", ".json": "json"}


def _keys(values: list[str] | None) -> list[str] | None:
    """--rows a b / --rows a,b -> [a, b]."""
    if not values:
        return None
    return [k for v in values for k in v.split(",") if k]


def _experiment_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="look for the sweep in this MLflow experiment only")


def _uri_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the sweep file's, then $BETADIFF_TRACKING_URI, "
        "$MLFLOW_TRACKING_URI, sqlite:///mlflow.db)",
    )


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"betadiff {cmd}")
    if cmd == "report":
        p.description = "Ablation table of a sweep: mean ± std over seeds per cell, best per metric in bold."
        p.add_argument("sweep", nargs="?", help="sweep YAML path or sweep name")
        p.add_argument(
            "--document",
            metavar="SPEC",
            help="write a whole reproduction document (several sweeps, reference numbers, claims, run ids) "
            "from this spec YAML instead of one table; -o FILE.md",
        )
        _experiment_arg(p)
        p.add_argument("--rows", nargs="+", action="extend", help="dotted factor keys for table rows")
        p.add_argument("--cols", nargs="+", action="extend", help="dotted factor keys for table columns")
        p.add_argument("--metrics", nargs="+", action="extend", help="metric names (default: report.metrics)")
        p.add_argument("--value", help="last | best | at:STEP (default: report.value, else last)")
        p.add_argument("--format", choices=FORMATS, default="md", help="what is printed (default md)")
        p.add_argument(
            "-o",
            "--output",
            action="append",
            default=[],
            help="write the table to FILE too; format from the suffix (.md .tex .csv .html .json)",
        )
        p.add_argument("--figures", metavar="DIR", help="write curves / parallel coordinates / samples here")
        p.add_argument("--ci", action="store_true", help="add 95 %% bootstrap intervals")
        p.add_argument("--budget", type=int, help="tabulate the runs at this train.steps budget")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing when -o is given")
    elif cmd == "runs":
        sub = p.add_subparsers(dest="action", required=True)
        ls = sub.add_parser("ls", help="sweeps and their trial counts by status")
        diff = sub.add_parser("diff", help="configuration (params, betadiff.* tags) that differs")
        diff.add_argument("run_a")
        diff.add_argument("run_b")
        ex = sub.add_parser("export", help="per-step curves of every trial of a sweep")
        ex.add_argument("sweep")
        _experiment_arg(ex)
        ex.add_argument("--metrics", nargs="+", action="extend")
        ex.add_argument("-o", "--output", help="FILE.csv or FILE.parquet (default: CSV on stdout)")
        for s in (ls, diff, ex):
            _uri_arg(s)
        return p
    elif cmd in ("dashboard", "ui"):
        p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
        p.add_argument("--port", type=int, default=8050 if cmd == "dashboard" else 5000)
        if cmd == "dashboard":
            p.add_argument("--mlflow-ui", help="base URL of an MLflow UI on the same store, for links")
        else:
            p.add_argument("--workers", type=int, default=1, help="server processes (one is plenty locally)")
    else:
        raise ReportError(f"unknown command {cmd!r}; expected report, runs, dashboard or ui")
    _uri_arg(p)
    return p


def _warn_exposed(host: str, what: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        print(
            f"warning: {what} listens on {host}: anyone who can reach it can read every tracked run",
            file=sys.stderr,
        )


def _document(a: argparse.Namespace) -> int:
    from betadiff.report.document import read_document_spec, render_document

    if a.sweep:
        raise ReportError("--document takes no sweep argument (the spec names the sweeps)")
    if len(a.output) > 1 or any(Path(o).suffix.lower() != ".md" for o in a.output):
        raise ReportError("--document writes Markdown: give at most one -o FILE.md")
    spec = read_document_spec(a.document)
    out = Path(a.output[0]) if a.output else None
    text = render_document(spec, out, a.tracking_uri)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    if not (a.quiet and out):
        sys.stdout.write(text)
    return 0


def _report(a: argparse.Namespace) -> int:
    if a.document:
        return _document(a)
    if not a.sweep:
        raise ReportError("name a sweep (YAML path or name), or give --document SPEC")
    outputs = []
    for o in a.output:  # check before any work starts
        fmt = _SUFFIX_FORMAT.get(Path(o).suffix.lower())
        if fmt is None:
            raise ReportError(f"-o {o}: unknown suffix; use one of {', '.join(_SUFFIX_FORMAT)}")
        outputs.append((Path(o), fmt))
    sr = load_sweep(a.sweep, a.tracking_uri, experiment=a.experiment)
    ab = ablation(
        sr,
        rows=_keys(a.rows),
        cols=_keys(a.cols),
        metrics=_keys(a.metrics),
        value=a.value,
        ci=a.ci,
        budget=a.budget,
    )
    for path, fmt in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ab.render(fmt), encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if a.figures:
        from betadiff.report.figures import write_figures

        for f in write_figures(ab, sr, a.figures):
            print(f"wrote {f}", file=sys.stderr)
    if not (a.quiet and outputs):
        sys.stdout.write(ab.render(a.format))
    return 0


def _runs(a: argparse.Namespace) -> int:
    from betadiff.report.runs import config_diff, curves_frame, format_diff, write_frame

    if a.action == "ls":
        df = list_sweeps(connect(resolve_tracking_uri(a.tracking_uri)))
        cols = [
            "name",
            "experiment",
            "status",
            "trials",
            "finished",
            "failed",
            "killed",
            "running",
            "pruned",
            "parent_run_id",
        ]
        sys.stdout.write(df[cols].to_string(index=False) + "\n" if len(df) else "(no sweeps)\n")
    elif a.action == "diff":
        client = connect(resolve_tracking_uri(a.tracking_uri))
        sys.stdout.write(format_diff(config_diff(client, a.run_a, a.run_b), a.run_a, a.run_b))
    else:
        if a.output and Path(a.output).suffix not in (".csv", ".parquet"):
            raise ReportError(f"-o {a.output}: expected a .csv or .parquet file")
        text = write_frame(
            curves_frame(load_sweep(a.sweep, a.tracking_uri, experiment=a.experiment), _keys(a.metrics)),
            a.output,
        )
        if text is not None:
            sys.stdout.write(text)
    return 0


def _dashboard(a: argparse.Namespace) -> int:
    import uvicorn

    from dashboards.app import create_app

    uri = resolve_tracking_uri(a.tracking_uri)
    connect(uri)  # fail here, not on the first page view
    _warn_exposed(a.host, "the dashboard")
    uvicorn.run(create_app(uri, mlflow_ui=a.mlflow_ui), host=a.host, port=a.port, log_level="warning")
    return 0


def _ui(a: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(a.tracking_uri)
    connect(uri)
    _warn_exposed(a.host, "the MLflow UI")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        a.host,
        "--port",
        str(a.port),
        "--workers",
        str(a.workers),
    ]
    return subprocess.call(cmd)


_COMMANDS = {"report": _report, "runs": _runs, "dashboard": _dashboard, "ui": _ui}


def main(argv: list[str]) -> int:
    """argv[0] is the subcommand ("report" | "runs" | "dashboard" | "ui"), the rest its arguments."""
    cmd = argv[0] if argv else ""
    try:
        args = _parser(cmd).parse_args(argv[1:])
        return _COMMANDS[cmd](args)
    except ReportError as e:
        print(f"betadiff {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
