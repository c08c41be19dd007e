#!/usr/bin/env python3
"""Local betadiff stack: MLflow tracking server + Ray head (job server) + N Ray worker nodes on this host.

Run by path through the `up`, `down` and `status` wrappers next to this file; it is never imported
(`platform/` is not a package). Usage:

    platform/local/up [--workers N] [--db-uri URI] [--expose]
    platform/local/status [--json]
    platform/local/down

State (database URI, ports, pids, logs, MLflow artifacts, SQLite fallback database) lives in
`.betadiff/stack/`; the client addresses go to `.betadiff/stack.env`, which the `betadiff` CLI loads
(variables already set in the environment win). `down` stops the processes and keeps the data.

Settings come from flags first, then from the environment (see `Settings.from_env`), then defaults.
Ray ports are explicit because Redis owns 6379 on shared machines and other Ray clusters may run here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROG = "platform/local"
REPO = Path(__file__).resolve().parents[2]
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/betadiff"


class StackError(Exception):
    """One-line, user-facing failure (printed as `platform/local/<cmd>: error: ...`, exit 1)."""


# --------------------------------------------------------------------------------------------- settings
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StackError(f"environment {name}: expected an integer, got {raw!r}") from None
    if value < 0:
        raise StackError(f"environment {name}: must be >= 0, got {value}")
    return value


@dataclass
class Settings:
    stack_dir: Path
    env_file: Path
    ray_temp_dir: str
    ray_port: int
    dashboard_port: int
    client_port: int
    agent_port: int  # dashboard agent HTTP port of the head; worker i uses agent_port + i
    mlflow_port: int
    mlflow_workers: int
    head_cpus: int | None
    worker_cpus: int | None
    object_store_bytes: int
    token_path: Path
    startup_timeout_s: int

    @classmethod
    def from_env(cls) -> Settings:
        stack_dir = Path(os.environ.get("BETADIFF_STACK_DIR") or REPO / ".betadiff" / "stack").resolve()
        head_cpus = os.environ.get("BETADIFF_RAY_HEAD_CPUS")
        worker_cpus = os.environ.get("BETADIFF_RAY_WORKER_CPUS")
        return cls(
            stack_dir=stack_dir,
            env_file=Path(os.environ.get("BETADIFF_STACK_ENV") or REPO / ".betadiff" / "stack.env").resolve(),
            ray_temp_dir=os.environ.get("BETADIFF_RAY_TEMP_DIR") or "/tmp/ray_betadiff_stack",
            ray_port=_env_int("BETADIFF_RAY_PORT", 6395),
            dashboard_port=_env_int("BETADIFF_RAY_DASHBOARD_PORT", 8285),
            client_port=_env_int("BETADIFF_RAY_CLIENT_PORT", 23095),
            agent_port=_env_int("BETADIFF_RAY_AGENT_PORT", 52395),
            mlflow_port=_env_int("BETADIFF_MLFLOW_PORT", 5055),
            mlflow_workers=max(1, _env_int("BETADIFF_MLFLOW_WORKERS", 2)),
            head_cpus=None if not head_cpus else _env_int("BETADIFF_RAY_HEAD_CPUS", 0),
            worker_cpus=None if not worker_cpus else _env_int("BETADIFF_RAY_WORKER_CPUS", 1),
            object_store_bytes=_env_int("BETADIFF_RAY_OBJECT_STORE_BYTES", 200 * 1024**2),
            # Ray 2.60 token auth: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (what `ray` clients read).
            token_path=Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"),
            startup_timeout_s=_env_int("BETADIFF_STACK_TIMEOUT_S", 120),
        )

    @property
    def state_file(self) -> Path:
        return self.stack_dir / "state.json"

    @property
    def secrets_file(self) -> Path:
        return self.stack_dir / "secrets.env"

    @property
    def log_dir(self) -> Path:
        return self.stack_dir / "logs"


@dataclass
class State:
    """What `up` decided, persisted so that a later `up` reuses the same database and ports."""

    db_uri: str = ""
    expose: bool = False
    workers: int = 1
    mlflow_pid: int = 0
    ports: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> State | None:
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise StackError(f"{path}: unreadable stack state ({e}); remove it and run up again") from None

    def save(self, path: Path) -> None:
        _write_private(path, json.dumps(asdict(self), indent=2) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Atomic write with 0600 permissions (state and secrets may hold credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _mask(secret: str) -> str:
    return f"{secret[:2]}…({len(secret)} chars)" if secret else "(empty)"


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------------------------- processes
def _procs() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, command line, process group) from /proc (psutil is not a project dependency)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # zombies hold no resources and cannot be signalled away
            continue
        out[int(d)] = (int(fields[1]), cmd, int(fields[2]))
    return out


def _with_descendants(roots: set[int], procs: dict[int, tuple[int, str, int]]) -> set[int]:
    found, changed = set(roots), True
    while changed:
        changed = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def _ray_pids(s: Settings) -> set[int]:
    """Processes of *this* stack's Ray cluster only.

    `ray stop` kills every Ray process on the machine (other engineers' clusters included), so we select
    by our temp dir (gcs_server, raylets, dashboard, monitors carry it on their command line), the client
    server by its port, plus all their descendants (agents, workers, dashboard subprocesses).
    """
    procs = _procs()
    roots = {
        pid
        for pid, (_, cmd, _) in procs.items()
        if f"{s.ray_temp_dir}/" in cmd
        or f"--temp-dir={s.ray_temp_dir} " in cmd + " "
        or ("ray.util.client.server" in cmd and f"--port={s.client_port} " in cmd + " ")
    }
    roots.discard(os.getpid())
    return _with_descendants(roots, procs)


def _gcs_running(s: Settings) -> bool:
    return any(
        "gcs_server" in cmd and f"--gcs_server_port={s.ray_port} " in cmd + " " and s.ray_temp_dir in cmd
        for _, cmd, _ in _procs().values()
    )


def _alive(pid: int, marker: str = "mlflow") -> bool:
    """`pid` runs and is still ours (pids are recycled after a reboot)."""
    proc = _procs().get(pid) if pid > 0 else None
    return proc is not None and marker in proc[1]


def _terminate(pids: set[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s` (gcs_server can ignore SIGTERM for a long time; the data that
    matters lives in MLflow's store, not in Ray)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p in _procs() for p in pids):
        time.sleep(0.2)
    for pid in pids & set(_procs()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tool(name: str) -> str:
    """`ray` / `mlflow` from the same environment as this interpreter."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    raise StackError(f"'{name}' not found next to {sys.executable}; activate the project's environment")


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines)


# --------------------------------------------------------------------------------------------- HTTP
def _http(url: str, headers: dict | None = None, timeout: float = 3.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def _wait(what: str, check, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; last lines of {log}:\n{_tail(log)}")
        time.sleep(0.5)
    hint = f"; last log lines ({log}):\n{_tail(log)}" if log else ""
    raise StackError(f"{what} not healthy after {timeout_s:.0f} s{hint}")


# --------------------------------------------------------------------------------------------- database
def _pg_url(uri: str):
    from sqlalchemy.engine import make_url  # mlflow's dependency; imported lazily (SQLite-only setups)

    return make_url(uri)


def _mask_uri(uri: str) -> str:
    if uri.startswith("postgresql"):
        return _pg_url(uri).render_as_string(hide_password=True)
    return uri


def _pg_connect(url, dbname: str, timeout_s: int = 3):
    import psycopg2

    return psycopg2.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        dbname=dbname,
        connect_timeout=timeout_s,
    )


def _ensure_pg_database(uri: str) -> None:
    """Create the database named in `uri` when missing (connects to the `postgres` maintenance db)."""
    import psycopg2

    url = _pg_url(uri)
    if not url.database:
        raise StackError(f"--db-uri {_mask_uri(uri)}: no database name in the URI")
    try:
        conn = _pg_connect(url, "postgres")
    except psycopg2.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StackError(f"--db-uri {_mask_uri(uri)}: cannot connect to PostgreSQL: {first}") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{url.database}"')
                print(f"created PostgreSQL database {url.database!r}")
    finally:
        conn.close()


def _local_pg_answers(uri: str) -> bool:
    try:
        conn = _pg_connect(_pg_url(uri), "postgres", timeout_s=2)
    except Exception:  # any failure means "no usable local PostgreSQL": fall back to SQLite
        return False
    conn.close()
    return True


def _resolve_db(s: Settings, arg_uri: str | None, prev: State | None) -> str:
    uri = arg_uri or os.environ.get("BETADIFF_DB_URI")
    if not uri and prev and prev.db_uri:
        uri = prev.db_uri  # keep the data of the previous `up`
    if not uri:
        local = os.environ.get("BETADIFF_LOCAL_PG_URI", LOCAL_PG)
        uri = local if _local_pg_answers(local) else f"sqlite:///{s.stack_dir / 'mlflow.db'}"
    if uri.startswith("postgresql://"):
        # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3; the project depends on psycopg2-binary.
        uri = "postgresql+psycopg2://" + uri[len("postgresql://") :]
    if uri.startswith("postgresql"):
        _ensure_pg_database(uri)
    elif not uri.startswith("sqlite:///"):
        raise StackError(f"--db-uri: unsupported scheme in {_mask_uri(uri)!r} (postgresql://... or sqlite:///...)")
    return uri


# --------------------------------------------------------------------------------------------- components
def _token(s: Settings) -> str:
    """The Ray auth token; created (0600) only when missing: other clusters on this host may use it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if not s.token_path.exists() or not s.token_path.read_text().strip():
        s.token_path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(s.token_path, secrets.token_hex(32))
        print(f"generated Ray auth token in {s.token_path}")
    return s.token_path.read_text().strip()


def _mlflow_healthy(s: Settings) -> bool:
    return _http(f"http://127.0.0.1:{s.mlflow_port}/health")[0] == 200


def _client_secrets(s: Settings) -> dict[str, str]:
    return _read_env_file(s.secrets_file)


def _ensure_secrets(s: Settings) -> dict[str, str]:
    sec = _client_secrets(s)
    if not sec.get("MLFLOW_TRACKING_PASSWORD"):
        sec = {
            "MLFLOW_TRACKING_USERNAME": "betadiff",
            "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
        }
        _write_private(s.secrets_file, "".join(f"{k}={v}\n" for k, v in sec.items()))
    return sec


def _start_mlflow(s: Settings, st: State) -> subprocess.Popen | None:
    """Launch the server unless it is up; returns the process to wait for (health is checked by the caller,
    after Ray has started in the meantime: both take 10-20 s on 2 cores)."""
    if _mlflow_healthy(s):
        if not _alive(st.mlflow_pid):
            raise StackError(
                f"port {s.mlflow_port} already serves an MLflow that this stack did not start; "
                "stop it or set BETADIFF_MLFLOW_PORT"
            )
        print(f"mlflow: already up at http://127.0.0.1:{s.mlflow_port}")
        return None
    if _port_busy(s.mlflow_port):
        raise StackError(f"port {s.mlflow_port} (MLflow) is taken; set BETADIFF_MLFLOW_PORT")
    artifacts = s.stack_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    s.log_dir.mkdir(parents=True, exist_ok=True)
    log = s.log_dir / "mlflow.log"
    cmd = [
        _tool("mlflow"), "server",  # backend URI via env: a password in it must not show in `ps`
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "0.0.0.0" if st.expose else "127.0.0.1",
        "--port", str(s.mlflow_port),
        "--workers", str(s.mlflow_workers),
    ]  # fmt: skip
    env = dict(os.environ)
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    env["MLFLOW_BACKEND_STORE_URI"] = st.db_uri
    # The server's job runner (GenAI scorers) forks 7 busy consumers; betadiff never uses it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if st.expose:
        import importlib.util

        if importlib.util.find_spec("flask_wtf") is None:  # basic-auth app imports it at start
            raise StackError("--expose: MLflow basic auth needs its extra: pip install 'mlflow[auth]'")
        sec = _ensure_secrets(s)
        ini = s.stack_dir / "mlflow_auth.ini"
        _write_private(
            ini,
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{s.stack_dir / 'mlflow_auth.db'}\n"
            f"admin_username = {sec['MLFLOW_TRACKING_USERNAME']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        cmd += ["--app-name", "basic-auth"]
        # Exposed on purpose: accept any Host header; basic auth is the gate.
        cmd += ["--allowed-hosts", os.environ.get("BETADIFF_MLFLOW_ALLOWED_HOSTS", "*")]
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=sec["MLFLOW_TRACKING_PASSWORD"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=sec["MLFLOW_FLASK_SERVER_SECRET_KEY"],
        )
    print(f"mlflow: starting on port {s.mlflow_port}, backend {_mask_uri(st.db_uri)} (log {log})")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=s.stack_dir, start_new_session=True,  # own process group: `down` stops it and its workers
        )  # fmt: skip
    st.mlflow_pid = proc.pid
    return proc


def _ray_api(s: Settings, path: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return _http(f"http://127.0.0.1:{s.dashboard_port}{path}", headers)


def _alive_nodes(s: Settings, token: str) -> int:
    code, body = _ray_api(s, "/nodes?view=summary", token)
    if code != 200:
        return -1
    try:
        summary = json.loads(body)["data"]["summary"]
    except (ValueError, KeyError):
        return -1
    return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")


def _ray_env(s: Settings) -> dict[str, str]:
    # Job entrypoints (`python -m ...`) resolve through the raylet's PATH: put this environment first.
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    if not os.environ.get("RAY_AUTH_TOKEN"):
        env["RAY_AUTH_TOKEN_PATH"] = str(s.token_path)
    return env


def _ray_start(s: Settings, args: list[str], what: str) -> None:
    s.log_dir.mkdir(parents=True, exist_ok=True)
    log = s.log_dir / "ray-start.log"
    with open(log, "ab") as out:
        out.write(f"\n$ ray start {' '.join(args)}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(
                [_tool("ray"), "start", *args, "--disable-usage-stats", "--log-style", "record"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_ray_env(s),
                cwd=s.stack_dir, timeout=s.startup_timeout_s,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = -1
    if rc != 0:
        raise StackError(f"{what}: `ray start` failed (exit {rc}); last log lines ({log}):\n{_tail(log)}")


def _start_ray(s: Settings, st: State, token: str) -> None:
    common = ["--object-store-memory", str(s.object_store_bytes)]
    if not st.expose:
        common += ["--node-ip-address", "127.0.0.1"]
    if _gcs_running(s):
        print(f"ray: head already up (GCS port {s.ray_port})")
    else:
        for port, name, var in (
            (s.ray_port, "Ray GCS", "BETADIFF_RAY_PORT"),
            (s.dashboard_port, "Ray dashboard", "BETADIFF_RAY_DASHBOARD_PORT"),
            (s.client_port, "Ray client server", "BETADIFF_RAY_CLIENT_PORT"),
        ):
            if _port_busy(port):
                raise StackError(f"port {port} ({name}) is in use by another program; set {var}")
        head_cpus = s.head_cpus if s.head_cpus is not None else (0 if st.workers > 0 else os.cpu_count() or 1)
        print(f"ray: starting head (GCS {s.ray_port}, dashboard {s.dashboard_port}, {head_cpus} CPUs)")
        _ray_start(
            s,
            ["--head", "--port", str(s.ray_port), "--dashboard-port", str(s.dashboard_port),
             "--dashboard-host", "0.0.0.0" if st.expose else "127.0.0.1", "--include-dashboard", "true",
             "--ray-client-server-port", str(s.client_port),
             "--dashboard-agent-listen-port", str(s.agent_port),
             "--num-cpus", str(head_cpus), "--temp-dir", s.ray_temp_dir, *common],
            "ray head",
        )  # fmt: skip
    _wait(
        "ray job server",
        lambda: _ray_api(s, "/api/jobs/", token)[0] == 200 and _alive_nodes(s, token) >= 1,
        s.startup_timeout_s,
        log=s.log_dir / "ray-start.log",
    )
    have = _alive_nodes(s, token) - 1
    worker_cpus = s.worker_cpus
    if worker_cpus is None:
        worker_cpus = max(1, (os.cpu_count() or 1) // max(1, st.workers))
    for i in range(have, st.workers):
        print(f"ray: starting worker node {i + 1}/{st.workers} ({worker_cpus} CPUs)")
        _ray_start(
            s,
            ["--address", f"127.0.0.1:{s.ray_port}", "--num-cpus", str(worker_cpus),
             "--dashboard-agent-listen-port", str(s.agent_port + 1 + i),
             # Own temp dir per node: nodes sharing one would garbage-collect each other's job working
             # dirs (runtime_resources/), deleting the driver's cwd mid-sweep.
             "--temp-dir", f"{s.ray_temp_dir}/w{i + 1}", *common],
            f"ray worker {i + 1}",
        )  # fmt: skip
    if have > st.workers:
        print(f"ray: {have} worker nodes are up (more than --workers {st.workers}); run down + up to shrink")
    want = st.workers + 1
    _wait(f"ray cluster ({want} nodes)", lambda: _alive_nodes(s, token) >= want, s.startup_timeout_s)


def _write_env_file(s: Settings, st: State) -> None:
    lines = [
        "# Written by platform/local/up; loaded by the betadiff CLI (variables already set win).",
        f"MLFLOW_TRACKING_URI=http://127.0.0.1:{s.mlflow_port}",
        f"RAY_ADDRESS=127.0.0.1:{s.ray_port}",
        f"RAY_API_SERVER_ADDRESS=http://127.0.0.1:{s.dashboard_port}",
        "RAY_AUTH_MODE=token",
    ]
    if not os.environ.get("RAY_AUTH_TOKEN"):
        lines.append(f"RAY_AUTH_TOKEN_PATH={s.token_path}")
    if st.expose:
        lines.append(f"BETADIFF_STACK_SECRETS={s.secrets_file}")
    s.env_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = s.env_file.with_name(s.env_file.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, s.env_file)


# --------------------------------------------------------------------------------------------- commands
def cmd_up(s: Settings, a: argparse.Namespace) -> int:
    prev = State.load(s.state_file)
    running = _gcs_running(s) or (prev is not None and _alive(prev.mlflow_pid))
    if running and prev is not None:
        if a.expose != prev.expose:
            raise StackError(
                f"the stack is up {'with' if prev.expose else 'without'} --expose; run down first"
            )
        if a.db_uri and a.db_uri.split("://", 1)[-1] != prev.db_uri.split("://", 1)[-1]:
            raise StackError(
                f"the stack is up on {_mask_uri(prev.db_uri)}, not {_mask_uri(a.db_uri)}; run down first"
            )
    s.stack_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(s.stack_dir, 0o700)
    st = State(
        db_uri=_resolve_db(s, a.db_uri, prev),
        expose=a.expose,
        workers=a.workers,
        mlflow_pid=prev.mlflow_pid if prev else 0,
        ports={"ray": s.ray_port, "dashboard": s.dashboard_port, "mlflow": s.mlflow_port},
    )
    token = _token(s)
    mlflow_proc = _start_mlflow(s, st)
    st.save(s.state_file)
    _start_ray(s, st, token)
    if mlflow_proc is not None:
        log = s.log_dir / "mlflow.log"
        _wait("mlflow server", lambda: _mlflow_healthy(s), s.startup_timeout_s, mlflow_proc, log)
    st.save(s.state_file)
    _write_env_file(s, st)
    report = _status(s)
    _print_status(report)
    if not report["healthy"]:
        raise StackError("a health check failed (see above); platform/local/down stops what was started")
    print(f"env file: {s.env_file}  (the betadiff CLI loads it; `set -a; . {s.env_file}` for other tools)")
    return 0


def cmd_down(s: Settings, a: argparse.Namespace) -> int:
    st = State.load(s.state_file)
    pids = _ray_pids(s)
    if pids:
        print(f"ray: stopping {len(pids)} processes of this stack (temp dir {s.ray_temp_dir})")
        _terminate(pids)
    if st and _alive(st.mlflow_pid):
        print(f"mlflow: stopping (pid {st.mlflow_pid})")
        # The server's workers (and job consumers) are re-parented to init but keep its process group.
        procs = _procs()
        group = {pid for pid, (_, _, pgid) in procs.items() if pgid == st.mlflow_pid}
        _terminate(_with_descendants(group | {st.mlflow_pid}, procs))
    if st:
        st.mlflow_pid = 0
        st.save(s.state_file)
    if s.env_file.exists():
        s.env_file.unlink()  # a stale env file would point the CLI at dead services
    print(f"down; data kept in {s.stack_dir}" + (f" and {_mask_uri(st.db_uri)}" if st else ""))
    return 0


def _status(s: Settings) -> dict:
    st = State.load(s.state_file)
    token = None
    if os.environ.get("RAY_AUTH_TOKEN") or s.token_path.exists():
        token = os.environ.get("RAY_AUTH_TOKEN") or s.token_path.read_text().strip()
    mlflow_up = _mlflow_healthy(s)
    mlflow = {"url": f"http://127.0.0.1:{s.mlflow_port}", "healthy": mlflow_up}
    if st:
        mlflow["backend"] = _mask_uri(st.db_uri)
        mlflow["expose"] = st.expose
    if mlflow_up and st and st.expose:
        # Exposed MLflow must refuse anonymous API calls and accept the generated credentials.
        api = f"http://127.0.0.1:{s.mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        anon = _http(api)[0]
        sec = _client_secrets(s)
        basic = base64.b64encode(
            f"{sec.get('MLFLOW_TRACKING_USERNAME', '')}:{sec.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        ).decode()
        authed = _http(api, {"Authorization": f"Basic {basic}"})[0]
        mlflow["auth"] = {"anonymous": anon, "with_credentials": authed}
        mlflow["healthy"] = anon == 401 and authed == 200
        mlflow["user"] = sec.get("MLFLOW_TRACKING_USERNAME", "")
        mlflow["password"] = _mask(sec.get("MLFLOW_TRACKING_PASSWORD", ""))
    gcs = _gcs_running(s)
    jobs_code = _ray_api(s, "/api/jobs/", token)[0] if gcs else 0
    anon_code = _ray_api(s, "/api/jobs/", None)[0] if gcs else 0
    nodes = _alive_nodes(s, token) if jobs_code == 200 else 0
    ray = {
        "address": f"127.0.0.1:{s.ray_port}",
        "dashboard": f"http://127.0.0.1:{s.dashboard_port}",
        "gcs_running": gcs,
        "jobs_api": jobs_code,
        "token_required": anon_code == 401,
        "alive_nodes": nodes,
        "expected_nodes": (st.workers + 1) if st else None,
    }
    ray["healthy"] = gcs and jobs_code == 200 and anon_code == 401 and nodes >= (ray["expected_nodes"] or 1)
    return {
        "healthy": bool(mlflow["healthy"] and ray["healthy"]),
        "mlflow": mlflow,
        "ray": ray,
        "env_file": str(s.env_file) if s.env_file.exists() else None,
        "stack_dir": str(s.stack_dir),
    }


def _print_status(r: dict) -> None:
    m, ray = r["mlflow"], r["ray"]
    print(f"mlflow  {'UP  ' if m['healthy'] else 'DOWN'} {m['url']}  backend={m.get('backend', '?')}")
    if "auth" in m:
        auth = f"user={m['user']} password={m['password']} anonymous->{m['auth']['anonymous']}"
        print(f"        basic auth: {auth}")
    print(
        f"ray     {'UP  ' if ray['healthy'] else 'DOWN'} {ray['address']}  dashboard={ray['dashboard']}  "
        f"nodes={ray['alive_nodes']}/{ray['expected_nodes']}  jobs_api={ray['jobs_api']}  "
        f"token_required={ray['token_required']}"
    )
    print(f"env     {r['env_file'] or '(none: stack not up)'}")


def cmd_status(s: Settings, a: argparse.Namespace) -> int:
    r = _status(s)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        _print_status(r)
    return 0 if r["healthy"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (or complete) the stack; idempotent")
    up.add_argument("--workers", default="1", help="Ray worker nodes on this host (default 1)")
    up.add_argument("--db-uri", default=None, help="MLflow backend store (postgresql://... or sqlite:///...)")
    up.add_argument("--expose", action="store_true", help="bind 0.0.0.0; MLflow basic auth + Ray token")
    sub.add_parser("down", help="stop this stack's processes; keep the data")
    stp = sub.add_parser("status", help="health of each component; exit 1 unless all healthy")
    stp.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    name = f"{PROG}/{a.cmd}"
    try:
        if a.cmd == "up":
            raw = a.workers
            a.workers = int(raw) if raw.isdigit() else -1
            if a.workers < 0:
                raise StackError(f"--workers: expected a non-negative integer, got {raw!r}")
        s = Settings.from_env()
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[a.cmd](s, a)
    except StackError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; run {PROG}/down to clean up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
