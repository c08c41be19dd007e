"""The local stack (`platform/local/{up,down,status}`) against real components.

A real PostgreSQL (127.0.0.1:5432, trust auth; a fresh database per run), a real `mlflow server`, a real Ray
head with its job server and a Ray worker node, all on free ports with their own Ray temp dir and token file,
so a developer's stack or another engineer's Ray on this host is never touched. Everything is checked from the
outside: the job REST API with the Ray token, MLflow's REST API, PostgreSQL with psycopg2.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "platform" / "local"
PG = "postgresql://postgres@127.0.0.1:5432"


def _pg_conn(dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=dbname, connect_timeout=3)


def _pg_available() -> bool:
    try:
        _pg_conn().close()
    except Exception:
        return False
    return True


def _free_port(span: int = 1) -> int:
    """A port p with p..p+span-1 free now (Ray's per-node agent ports need consecutive ones)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + span < 65000 and all(_bindable(p + i) for i in range(span)):
            return p
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stack_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "BETADIFF_"))}
    env.update(
        BETADIFF_PYTHON=sys.executable,
        BETADIFF_STACK_DIR=str(root / "stack"),
        BETADIFF_STACK_ENV=str(root / "stack.env"),
        BETADIFF_RAY_TEMP_DIR=f"/tmp/ray_bdt_{uuid.uuid4().hex[:6]}",  # short: Ray's socket paths are limited
        BETADIFF_RAY_PORT=str(_free_port()),
        BETADIFF_RAY_DASHBOARD_PORT=str(_free_port()),
        BETADIFF_RAY_CLIENT_PORT=str(_free_port()),
        BETADIFF_RAY_AGENT_PORT=str(_free_port(4)),
        BETADIFF_MLFLOW_PORT=str(_free_port()),
        BETADIFF_MLFLOW_WORKERS="2",
        RAY_AUTH_TOKEN_PATH=str(root / "ray_token"),
    )
    return env


def _run(cmd: str, env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(LOCAL / cmd), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _http(url: str, headers: dict | None = None, data: dict | None = None) -> tuple[int, dict | str]:
    body = json.dumps(data).encode() if data is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=body, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read().decode()
            code = r.status
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    try:
        return code, json.loads(raw)
    except ValueError:
        return code, raw


class Mlflow:
    """Just enough of MLflow's REST API (2.0) to check what the server stored."""

    def __init__(self, base: str, headers: dict | None = None):
        self.base, self.headers = base.rstrip("/"), headers or {}

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        code, body = _http(f"{self.base}/api/2.0/mlflow/{path}?{query}", self.headers)
        assert code == 200, (path, code, body)
        return body

    def post(self, path: str, data: dict) -> dict:
        code, body = _http(f"{self.base}/api/2.0/mlflow/{path}", self.headers, data)
        assert code == 200, (path, code, body)
        return body

    def runs(self, experiment_id: str, filter_string: str) -> list[dict]:
        out, token = [], None
        while True:
            req = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000,
                   "run_view_type": "ALL"}
            if token:
                req["page_token"] = token
            body = self.post("runs/search", req)
            out += body.get("runs", [])
            token = body.get("next_page_token")
            if not token:
                return out

    def history(self, run_id: str, key: str) -> list[dict]:
        out, token = [], None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                params["page_token"] = token
            body = self.get("metrics/get-history", **params)
            out += body.get("metrics", [])
            token = body.get("next_page_token")
            if not token:
                return out

    def artifacts(self, run_id: str) -> set[str]:
        return {f["path"] for f in self.get("artifacts/list", run_id=run_id).get("files", [])}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


needs_pg = pytest.mark.skipif(not _pg_available(), reason="needs PostgreSQL on 127.0.0.1:5432 (CI has one)")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "two"], "up: error: --workers: expected a non-negative integer, got 'two'"),
        (["--workers", "-1"], "up: error: --workers: expected a non-negative integer, got '-1'"),
        (["--db-uri", "mysql://u@h/db"], "up: error: --db-uri: unsupported scheme in 'mysql://u@h/db'"),
        (["--db-uri", "postgresql://postgres:hunter2@127.0.0.1:1/x"], "cannot connect to PostgreSQL"),
    ],
)
def test_up_rejects_bad_input_with_one_line_before_starting_anything(tmp_path, args, message):
    env = _stack_env(tmp_path)
    r = _run("up", env, *args, timeout=60)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("platform/local/up: error:") and message in err[0], r.stderr
    assert "hunter2" not in r.stderr + r.stdout  # passwords in URIs are masked
    assert not (tmp_path / "stack.env").exists()
    assert not (tmp_path / "stack" / "logs").exists()  # no service was started


def test_bad_port_variable_is_named(tmp_path):
    env = _stack_env(tmp_path) | {"BETADIFF_MLFLOW_PORT": "50x5"}
    r = _run("status", env, timeout=60)
    assert r.returncode == 1
    assert "environment BETADIFF_MLFLOW_PORT: expected an integer, got '50x5'" in r.stderr


# ------------------------------------------------------------------------------------------ the stack
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not _pg_available():
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432 (CI has one)")
    root = tmp_path_factory.mktemp("stack")
    env = _stack_env(root)
    db = f"betadiff_test_{uuid.uuid4().hex[:10]}"
    # Trust auth ignores the password; it is there to prove that it never leaks (ps, logs, output).
    password = f"pw{uuid.uuid4().hex}"
    r = _run("up", env, "--workers", "1", "--db-uri", f"postgresql://postgres:{password}@127.0.0.1:5432/{db}")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield {"env": env, "root": root, "db": db, "up": r, "password": password}
    finally:
        d = _run("down", env)
        print(d.stdout, d.stderr)
        shutil.rmtree(env["BETADIFF_RAY_TEMP_DIR"], ignore_errors=True)  # Ray's session logs
        conn = _pg_conn()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


def _env_file(stack) -> dict[str, str]:
    lines = (stack["root"] / "stack.env").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def _ray_headers(stack) -> dict[str, str]:
    return {"Authorization": "Bearer " + (stack["root"] / "ray_token").read_text().strip()}


@needs_pg
def test_up_writes_env_file_and_all_health_checks_pass(stack):
    env = stack["env"]
    ef = _env_file(stack)
    assert ef == {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{env['BETADIFF_MLFLOW_PORT']}",
        "RAY_ADDRESS": f"127.0.0.1:{env['BETADIFF_RAY_PORT']}",
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{env['BETADIFF_RAY_DASHBOARD_PORT']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(stack["root"] / "ray_token"),
    }
    r = _run("status", env, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert st["healthy"] and st["ray"]["alive_nodes"] == 2 and st["ray"]["token_required"]
    assert st["mlflow"]["backend"].endswith(f"/{stack['db']}")
    # token auth is real: the job API refuses a missing or wrong token
    jobs = f"{ef['RAY_API_SERVER_ADDRESS']}/api/jobs/"
    assert _http(jobs)[0] == 401
    assert _http(jobs, {"Authorization": "Bearer not-the-token"})[0] == 403
    assert _http(jobs, _ray_headers(stack))[0] == 200
    assert stat.S_IMODE((stack["root"] / "ray_token").stat().st_mode) == 0o600
    # services bind to loopback only (Ray's GCS/raylet ports are token-protected, see docs/platform.md)
    listen = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    for port in (env["BETADIFF_MLFLOW_PORT"], env["BETADIFF_RAY_DASHBOARD_PORT"]):
        local = [ln.split()[3] for ln in listen.splitlines()]
        addrs = {a.rsplit(":", 1)[0] for a in local if a.endswith(f":{port}")}
        assert addrs == {"127.0.0.1"}, (port, addrs)
    # the database password shows in no output, log, env file or command line (only in 0600 state.json)
    stack_dir = stack["root"] / "stack"
    texts = [stack["up"].stdout, stack["up"].stderr, r.stdout, (stack["root"] / "stack.env").read_text()]
    texts += [p.read_text(errors="replace") for p in (stack_dir / "logs").glob("*")]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            texts.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        except OSError:
            pass
    assert not [t[:200] for t in texts if stack["password"] in t]
    assert stat.S_IMODE((stack_dir / "state.json").stat().st_mode) == 0o600
    # MLflow really runs on the fresh PostgreSQL database (its schema is there)
    conn = _pg_conn(stack["db"])
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'")
        assert cur.fetchone()[0] == 1
    conn.close()


@needs_pg
def test_up_is_idempotent(stack):
    env = stack["env"]
    before = json.loads((stack["root"] / "stack" / "state.json").read_text())
    r = _run("up", env, "--workers", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mlflow: already up" in r.stdout and "ray: head already up" in r.stdout
    assert "starting" not in r.stdout
    after = json.loads((stack["root"] / "stack" / "state.json").read_text())
    assert after["mlflow_pid"] == before["mlflow_pid"] and after["db_uri"] == before["db_uri"]
    # a conflicting request is refused instead of silently switching databases
    r = _run("up", env, "--db-uri", f"{PG}/other_db")
    assert r.returncode == 1 and "run down first" in r.stderr


WRITER = textwrap.dedent(
    """
    import sys, time
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    uri, exp_id, name, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = MlflowClient(tracking_uri=uri)
    run = c.create_run(exp_id, run_name=name, tags={"writer": name})
    rid = run.info.run_id
    for step in range(steps):  # one request per step, as a trial reports: no client-side batching
        ts = int(time.time() * 1000)
        c.log_batch(rid, metrics=[Metric("loss", 1.0 / (step + 1) + int(name[1:]), ts, step),
                                  Metric("lr", step * 1e-3, ts, step)], synchronous=True)
    c.log_text(rid, name * 100, "writer.txt")  # proxied by the server into the stack's artifact store
    c.set_terminated(rid)
    print(rid)
    """
)


@needs_pg
def test_parallel_writers_lose_no_metric_point(stack):
    uri = _env_file(stack)["MLFLOW_TRACKING_URI"]
    api = Mlflow(uri)
    exp_id = api.post("experiments/create", {"name": f"concurrency-{uuid.uuid4().hex[:6]}"})["experiment_id"]
    n_writers, steps = 4, 100
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, uri, exp_id, f"w{i}", str(steps)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(n_writers)
    ]  # fmt: skip
    run_ids = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        run_ids.append(out.strip().splitlines()[-1])
    runs = api.runs(exp_id, "")
    assert sorted(r["info"]["run_id"] for r in runs) == sorted(run_ids)
    for r in runs:
        name = _tags(r)["writer"]
        loss = api.history(r["info"]["run_id"], "loss")
        lr = api.history(r["info"]["run_id"], "lr")
        assert sorted(int(m.get("step", 0)) for m in loss) == list(range(steps))  # all points, no duplicate
        assert sorted(int(m.get("step", 0)) for m in lr) == list(range(steps))
        assert all(m["value"] == pytest.approx(1.0 / (int(m["step"]) + 1) + int(name[1:])) for m in loss)
        assert r["info"]["status"] == "FINISHED"
        assert api.artifacts(r["info"]["run_id"]) == {"writer.txt"}


def _quickstart_tiny(tmp: Path) -> Path:
    """sweeps/quickstart.yaml (same factors, seeds, report) at a few-second budget per trial."""
    spec = yaml.safe_load((REPO / "sweeps" / "quickstart.yaml").read_text())
    spec["name"] = f"quickstart_e2e_{uuid.uuid4().hex[:6]}"
    spec["base"] = str(REPO / "configs" / spec["base"])
    spec["overrides"].update({
        "train.steps": 40, "train.batch_size": 128, "train.eval_every": 20, "train.ckpt_every": 20,
        "train.log_every": 10, "optim.warmup_steps": 5, "eval.n_samples": 2000, "eval.steps": 20,
    })  # fmt: skip
    spec["storage"] = str(tmp / "sweeps")
    path = tmp / "quickstart_tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@needs_pg
@pytest.mark.ray
def test_quickstart_sweep_end_to_end_through_the_job_api(stack, tmp_path):
    if not (REPO / "betadiff" / "sweep" / "cli.py").exists():
        pytest.fail("betadiff/sweep/cli.py is missing: the sweep CLI is part of this project")
    ef = _env_file(stack)
    sweep_file = _quickstart_tiny(tmp_path)
    spec = yaml.safe_load(sweep_file.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "BETADIFF_"))}
    env.update(ef)  # exactly what the betadiff CLI loads from .betadiff/stack.env
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.cli", "sweep", "submit", str(sweep_file),
         "--address", ef["RAY_API_SERVER_ADDRESS"]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = re.search(r"as job (\S+)", r.stdout).group(1)
    job_url = f"{ef['RAY_API_SERVER_ADDRESS']}/api/jobs/{job_id}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        code, info = _http(job_url, _ray_headers(stack))
        assert code == 200, info
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _http(job_url + "/logs", _ray_headers(stack))[1]
    assert info["status"] == "SUCCEEDED", (info.get("message"), logs)

    api = Mlflow(ef["MLFLOW_TRACKING_URI"])
    exp_id = api.get("experiments/get-by-name", experiment_name=spec["tracking"]["experiment"])["experiment"][
        "experiment_id"
    ]
    parents = api.runs(exp_id, f"tags.`betadiff.role` = 'sweep' and tags.`betadiff.sweep` = '{spec['name']}'")
    assert len(parents) == 1
    parent = parents[0]
    ptags = _tags(parent)
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == spec["name"]
    assert {"betadiff.sweep_hash", "betadiff.status", "betadiff.best_config"} <= set(ptags)
    assert {"sweep.yaml", "report.md"} <= api.artifacts(parent["info"]["run_id"])

    children = api.runs(exp_id, f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
    losses = spec["factors"]["axes"]["diffusion.loss"]
    assert sorted(_tags(c)["betadiff.factor.diffusion.loss"] for c in children) == sorted(losses)
    for child in children:
        rid, tags, metrics = child["info"]["run_id"], _tags(child), _metrics(child)
        assert child["info"]["status"] == "FINISHED", tags.get("betadiff.error")
        assert tags["betadiff.role"] == "trial" and tags["betadiff.budget"] == "40"
        assert {"loss", "w1", "jsd", "hellinger"} <= set(metrics)
        assert {p["key"]: p["value"] for p in child["data"]["params"]}["diffusion.loss"] == tags[
            "betadiff.factor.diffusion.loss"
        ]
        # every logged step reached the server: log_every=10 over 40 steps, evaluations at 20 and 40
        assert {10, 20, 30, 40} <= {int(m.get("step", 0)) for m in api.history(rid, "loss")}
        assert {20, 40} <= {int(m.get("step", 0)) for m in api.history(rid, "w1")}
        assert {"config.yaml", "samples.png", "checkpoint.pt"} <= api.artifacts(rid)
    # artifacts are proxied by the server into the stack's own artifact store
    stored = list((stack["root"] / "stack" / "artifacts").rglob("checkpoint.pt"))
    assert len(stored) >= len(losses)


SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    uri, run_id, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = MlflowClient(tracking_uri=uri)
    for step in range(steps):
        metric = Metric("loss", float(step), int(time.time() * 1000), step)
        c.log_batch(run_id, metrics=[metric], synchronous=True)
        time.sleep(0.1)
    """
)


@needs_pg
def test_tracking_server_restart_mid_logging_loses_nothing(stack):
    """The server dies mid-logging; `up` restarts it; retries fill the gap; nothing is lost."""
    env = stack["env"]
    uri = _env_file(stack)["MLFLOW_TRACKING_URI"]
    api = Mlflow(uri)
    exp_id = api.post("experiments/create", {"name": f"fault-{uuid.uuid4().hex[:6]}"})["experiment_id"]
    run_id = api.post("runs/create", {"experiment_id": exp_id})["run"]["info"]["run_id"]
    steps = 60
    wenv = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLflow's HTTP client retries with exponential backoff: 1+2+4+...+32 s covers a restart.
    wenv |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    cmd = [sys.executable, "-c", SLOW_WRITER, uri, run_id, str(steps)]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=wenv)
    try:
        deadline = time.monotonic() + 120
        while len(api.history(run_id, "loss")) < 15 and time.monotonic() < deadline:
            time.sleep(0.2)
        before = {int(m.get("step", 0)) for m in api.history(run_id, "loss")}
        assert len(before) >= 15
        pid = json.loads((stack["root"] / "stack" / "state.json").read_text())["mlflow_pid"]
        os.killpg(pid, 9)  # the whole server (all its workers) goes away at once
        time.sleep(1)
        assert _run("status", env).returncode == 1
        r = _run("up", env, "--workers", "1")
        assert r.returncode == 0 and "mlflow: starting" in r.stdout, r.stdout + r.stderr
        out, err = writer.communicate(timeout=240)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    steps_stored = sorted(int(m.get("step", 0)) for m in api.history(run_id, "loss"))
    assert set(steps_stored) >= before  # what was stored before the crash survived
    assert sorted(set(steps_stored)) == list(range(steps))  # and every later point arrived after retries


@needs_pg
def test_down_stops_only_this_stack_and_keeps_the_data(stack):
    """Last in this module: stops the stack, checks that the data survived, then `up` brings it back."""
    env = stack["env"]
    conn = _pg_conn(stack["db"])
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        n_runs = cur.fetchone()[0]
    conn.close()
    assert n_runs >= 4  # the writers' runs at least
    temp_dir = env["BETADIFF_RAY_TEMP_DIR"]
    r = _run("down", env)
    assert r.returncode == 0, r.stdout + r.stderr
    left = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    assert left == []
    assert not (stack["root"] / "stack.env").exists()
    st = _run("status", env)
    assert st.returncode == 1 and "DOWN" in st.stdout
    conn = _pg_conn(stack["db"])
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs")
        assert cur.fetchone()[0] == n_runs
    conn.close()
    assert list((stack["root"] / "stack" / "artifacts").rglob("*"))  # artifacts kept on disk


# ------------------------------------------------------------------------------------------ --expose
@needs_pg
def test_expose_requires_auth_and_never_prints_the_secret(tmp_path):
    env = _stack_env(tmp_path) | {"BETADIFF_RAY_HEAD_CPUS": "1"}
    r = _run("up", env, "--workers", "0", "--expose", "--db-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        secrets_file = tmp_path / "stack" / "secrets.env"
        sec = dict(ln.split("=", 1) for ln in secrets_file.read_text().splitlines())
        password = sec["MLFLOW_TRACKING_PASSWORD"]
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "stack").stat().st_mode) == 0o700
        st = _run("status", env)
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "stack" / "logs").glob("*"))
        for text in (r.stdout, r.stderr, st.stdout, st.stderr, logs, (tmp_path / "stack.env").read_text()):
            assert password not in text
        assert f"BETADIFF_STACK_SECRETS={secrets_file}" in (tmp_path / "stack.env").read_text()
        base = f"http://127.0.0.1:{env['BETADIFF_MLFLOW_PORT']}"
        search = "experiments/search?max_results=1"
        assert _http(f"{base}/api/2.0/mlflow/{search}")[0] == 401
        wrong = base64.b64encode(b"betadiff:wrong").decode()
        assert _http(f"{base}/api/2.0/mlflow/{search}", {"Authorization": f"Basic {wrong}"})[0] == 401
        good = base64.b64encode(f"{sec['MLFLOW_TRACKING_USERNAME']}:{password}".encode()).decode()
        assert _http(f"{base}/api/2.0/mlflow/{search}", {"Authorization": f"Basic {good}"})[0] == 200
        listen = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        for port in (env["BETADIFF_MLFLOW_PORT"], env["BETADIFF_RAY_DASHBOARD_PORT"]):
            assert any(ln.split()[3] in (f"0.0.0.0:{port}", f"*:{port}") for ln in listen.splitlines()), port
        dash = f"http://127.0.0.1:{env['BETADIFF_RAY_DASHBOARD_PORT']}/api/jobs/"
        assert _http(dash)[0] == 401
    finally:
        _run("down", env)
        shutil.rmtree(env["BETADIFF_RAY_TEMP_DIR"], ignore_errors=True)
