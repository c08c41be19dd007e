"""Sweeps on a real two-node Ray cluster started on loopback: Job API submit/status/logs/stop, resume as a
job, and a worker node killed mid-trial.

Ports and temp dirs are this file's own (Redis owns 6379; other engineers use 6395/8285): head on 6385,
dashboard 8275. Each node gets its own temp dir: two nodes sharing one runtime-env folder on one machine
garbage-collect each other's unpacked working dirs (the job driver then loses its cwd). `ray stop` would stop
every Ray on the machine, so teardown kills exactly this cluster's processes (found by temp dir) and their
descendants.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # importlib mode: reuse the local sweep tests' helpers
from test_sweep_local import TINY, client, runs  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path("/tmp/ray_sweeptest")
DASH = "http://127.0.0.1:8275"
GCS = "127.0.0.1:6385"
HEAD = [
    "--head",
    "--port=6385",
    "--dashboard-port=8275",
    "--dashboard-host=127.0.0.1",
    "--ray-client-server-port=10005",
    "--node-manager-port=6386",
    "--object-manager-port=6387",
    "--dashboard-agent-listen-port=52465",
    "--dashboard-agent-grpc-port=52466",
    "--metrics-export-port=52467",
    "--runtime-env-agent-port=52468",
    "--min-worker-port=20100",
    "--max-worker-port=20999",
]
WORKER = [
    f"--address={GCS}",
    "--node-manager-port=6388",
    "--object-manager-port=6389",
    "--dashboard-agent-listen-port=52475",
    "--dashboard-agent-grpc-port=52476",
    "--metrics-export-port=52477",
    "--runtime-env-agent-port=52478",
    "--min-worker-port=21000",
    "--max-worker-port=21999",
]


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def kill_tree(marker: str) -> int:
    """SIGKILL every process whose command line holds `marker`, and their descendants."""
    procs = _procs()
    pids = {p for p, (_, cmd) in procs.items() if marker in cmd and p != os.getpid()}
    grew = True
    while grew:
        more = {p for p, (pp, _) in procs.items() if pp in pids} - pids
        grew, pids = bool(more), pids | more
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def ray_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def start_node(args: list[str], temp: Path, tries: int = 2) -> None:
    for _ in range(tries):  # on a busy 2-core machine a node can miss GCS's registration deadline once
        r = subprocess.run(
            ["ray", "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp}", *args],
            env=ray_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode == 0:
            return
        kill_tree(str(temp))
    raise AssertionError(r.stdout[-2000:] + r.stderr[-2000:])


@pytest.fixture(scope="module")
def cluster():
    kill_tree(str(ROOT))
    start_node(HEAD, ROOT / "head")
    start_node(WORKER, ROOT / "w1")
    try:
        yield
    finally:
        kill_tree(str(ROOT))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on PostgreSQL (the topology for clusters: http:// for every process)."""
    import psycopg2

    db = "betadiff_sweeptest"
    con = psycopg2.connect(
        host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=10
    )
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {db}")
    art = tmp_path_factory.mktemp("mlartifacts")
    log = open(art / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "5475",
            "--backend-store-uri",
            f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
            "--artifacts-destination",
            str(art),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = "http://127.0.0.1:5475"
    try:
        import urllib.request

        def up():
            try:
                return urllib.request.urlopen(uri + "/health", timeout=2).status == 200
            except OSError:
                return proc.poll() is not None and pytest.fail((art / "server.log").read_text()[-2000:])

        wait_for(up, 300, "mlflow server")  # imports and migrations: slow on a loaded machine
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with con.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        con.close()


def cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ray_env(),
    )


def sweep_file(tmp: Path, name: str, **doc) -> Path:
    d = {
        "name": name,
        "base": "toy1_beta.yaml",
        "overrides": dict(TINY),
        "seeds": [0],
        "resources": {"cpu": 1},
        "max_concurrent": 2,
        "max_failures": 2,
        "tracking": {"experiment": name},
    }
    d.update(doc)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def job_status(tmp: Path, job: str) -> str:
    r = cli("status", job, "--address", DASH, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[1]


def wait_for(pred, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            v = pred()
        except Exception:  # the driver may still be creating the MLflow schema this poll reads
            v = None
        if v:
            return v
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def submit(tmp: Path, p: Path) -> str:
    r = cli("submit", str(p), "--address", DASH, cwd=tmp)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout.split(" as job ")[1].split()[0]


def test_submit_status_logs_stop_and_resume_as_job(cluster, mlflow_server, tmp_path):
    # tracked through an MLflow server on PostgreSQL instead of the SQLite default
    over = {
        **TINY,
        "train.steps": 200,
        "train.eval_every": 100,
        "train.ckpt_every": 50,
        "train.log_every": 50,
    }
    p = sweep_file(
        tmp_path,
        "jobsweep",
        overrides=over,
        factors={"axes": {"diffusion.loss": ["klub", "elbo"]}},
        max_concurrent=1,
        tracking={"uri": mlflow_server, "experiment": "jobsweep"},
    )
    job = submit(tmp_path, p)
    # stop the job once a trial is past a checkpoint: the driver dies mid-sweep
    wait_for(
        lambda: any(
            c.data.metrics.get("loss") is not None
            and client(mlflow_server).get_metric_history(c.info.run_id, "loss")[-1].step >= 100
            for c in runs(mlflow_server, "jobsweep", "trial")
        ),
        180,
        "a trial past its checkpoint",
    )
    r = cli("stop", job, "--address", DASH, cwd=tmp_path)
    assert r.returncode == 0 and "stop requested" in r.stdout
    assert (
        wait_for(
            lambda: job_status(tmp_path, job) in ("STOPPED", "FAILED") and job_status(tmp_path, job),
            60,
            "job stopped",
        )
        == "STOPPED"
    )
    logs = cli("logs", job, "--address", DASH, cwd=tmp_path)
    assert logs.returncode == 0 and "parent run" in logs.stdout and "jobsweep" in logs.stdout

    r = cli("resume", "jobsweep", "--address", DASH, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    job2 = r.stdout.split(" as job ")[1].split()[0]
    assert (
        wait_for(
            lambda: (s := job_status(tmp_path, job2)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
            240,
            "resumed job to end",
        )
        == "SUCCEEDED"
    ), cli("logs", job2, "--address", DASH, cwd=tmp_path).stdout[-3000:]
    children = runs(mlflow_server, "jobsweep", "trial")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)  # no duplicates
    assert len(runs(mlflow_server, "jobsweep", "sweep")) == 1
    arts = {a.path for a in client(mlflow_server).list_artifacts(children[0].info.run_id)}
    assert {"config.yaml", "samples.png", "checkpoint.pt"} <= arts  # via the server's proxy
    for c in children:  # a trial interrupted past step 100 continued from its checkpoint, not from scratch
        steps = [m.step for m in client(mlflow_server).get_metric_history(c.info.run_id, "loss")]
        assert sorted(set(steps)) == [50, 100, 150, 200] and steps.count(50) == 1, steps


def test_worker_node_killed_mid_trial_recovers_from_checkpoint(cluster, tmp_path):
    over = {
        **TINY,
        "train.steps": 300,
        "train.eval_every": 100,
        "train.ckpt_every": 50,
        "train.log_every": 50,
    }
    p = sweep_file(
        tmp_path, "nodeloss", overrides=over, factors={"axes": {"diffusion.loss": ["klub", "elbo"]}}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p), "--address", GCS],
        cwd=tmp_path,
        env=ray_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # both trials run at once (one CPU per node): kill the worker node once both are past a checkpoint
        wait_for(
            lambda: (
                len(
                    [
                        c
                        for c in runs(tmp_path, "nodeloss", "trial")
                        if c.data.metrics.get("loss") is not None
                        and client(tmp_path).get_metric_history(c.info.run_id, "loss")[-1].step >= 100
                    ]
                )
                == 2
            ),
            180,
            "two trials past a checkpoint",
        )
        assert kill_tree(str(ROOT / "w1")) > 0
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        start_node(WORKER, ROOT / "w1")  # leave the cluster as the fixture made it
    assert proc.returncode == 0, out[-4000:]
    children = runs(tmp_path, "nodeloss", "trial")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    recovered = [c for c in children if int(c.data.tags.get("betadiff.failures", "0")) >= 1]
    assert len(recovered) == 1
    steps = [m.step for m in client(tmp_path).get_metric_history(recovered[0].info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(50, 301, 50)) and steps.count(50) == 1, steps
