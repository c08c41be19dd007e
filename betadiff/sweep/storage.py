"""Where a sweep keeps its state: a local folder (default `.betadiff/sweeps`) or a pyarrow filesystem URI.

Local storage: Tune and betadiff both write `<storage>/<name>/` (Tune's experiment state and trial
checkpoints, `sweep.yaml`, `betadiff_sweep.json`, `optuna.journal`, the MLflow write journal and its
artifact copies).

URI storage (`s3://bucket/prefix`, `gs://...`, any URI `pyarrow.fs.FileSystem.from_uri` accepts, e.g.
`s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http` for an S3-compatible server): Tune gets the URI
and writes through pyarrow; betadiff's own small files (`SYNCED` and `ARTIFACT_DIR`) live in a local working
folder while the driver runs and are uploaded to `<uri>/<name>/` when the sweep starts, whenever Tune saves
its experiment state (`statesync.StateSync`: changed files, at most every `SYNC_INTERVAL_S`) and when it
ends. `resume` and `list` read them there. The working folder (`default_work_dir`: per user, storage and
sweep under the temp dir) is recorded in the state and used again by every resume, on any machine, because
Tune pickles absolute paths into it (the Optuna journal, the write journal).

Pure except for pyarrow (imported on first use); no Ray.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

from betadiff.sweep.schema import SweepError

DEFAULT_STORAGE = ".betadiff/sweeps"
ENV = "BETADIFF_SWEEP_STORAGE"
STATE_FILE = "betadiff_sweep.json"
SWEEP_FILE = "sweep.yaml"
OPTUNA_FILE = "optuna.journal"
SPOOL_FILE = "unwritten_metrics.jsonl"  # the MLflow write journal (tracking.SweepTracker.spool)
ARTIFACT_DIR = "unwritten_artifacts"  # its artifact copies (tracking.SweepTracker.artifact_dir)
SYNCED = (SWEEP_FILE, STATE_FILE, OPTUNA_FILE, SPOOL_FILE)  # + ARTIFACT_DIR, a folder
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")  # the first path component is a bucket/container
CHECK_TIMEOUT_S = 25.0  # a storage check answers within this, reachable or not
SYNC_INTERVAL_S = 10.0


def setting(storage: str | None = None) -> tuple[str, str]:
    """(the storage setting, where it came from): the given value, else the env variable, else the default."""
    if storage:
        return storage, "storage"
    if os.environ.get(ENV):
        return os.environ[ENV], ENV
    return DEFAULT_STORAGE, "default"


def is_uri(s: str) -> bool:
    """A URI with a scheme other than file:// (one-letter schemes are Windows drive letters)."""
    scheme = urlsplit(s).scheme
    return len(scheme) > 1 and scheme != "file"


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with path components appended before its query: s3://b/p?x=1 + n -> s3://b/p/n?x=1."""
    p = urlsplit(uri)
    return urlunsplit(p._replace(path="/".join([p.path.rstrip("/"), *parts])))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:400]


def _bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """fn() in a daemon thread: its result, its exception, or a TimeoutError after `timeout` s (no hang)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name="betadiff-storage-check")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f} s ({what})")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class SweepStore:
    """A sweep storage setting resolved: `root` is an absolute local path or the URI as given."""

    def __init__(self, storage: str | None = None):
        value, self.source = setting(storage)
        self.remote = is_uri(value)
        if self.remote:
            self.root = value
        else:
            if value.startswith("file://"):
                value = urlsplit(value).path
            self.root = str(Path(value).expanduser().resolve())
        self._fs = None

    def __getstate__(self) -> dict[str, Any]:  # pickled by Tune inside StateSync: no filesystem object
        return {**self.__dict__, "_fs": None}

    def __repr__(self) -> str:
        return f"SweepStore({self.root!r})"

    # --- names ----------------------------------------------------------------------------------------------
    def experiment(self, name: str) -> str:
        """The sweep's Tune experiment folder: a local path or a URI."""
        return join_uri(self.root, name) if self.remote else str(Path(self.root) / name)

    def default_work_dir(self, name: str) -> Path:
        """The local working folder of a sweep in URI storage: stable per user, storage and sweep name."""
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name (containers): the uid
            user = str(os.getuid())
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"betadiff-{user}" / "sweeps" / digest / name

    # --- the filesystem -------------------------------------------------------------------------------------
    def filesystem(self):
        """(pyarrow filesystem, path of the storage root on it)."""
        if self._fs is None:
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(self.root)
            self._fs = (fs, path.rstrip("/"))
        return self._fs

    def _path(self, name: str, *parts: str) -> str:
        return "/".join([self.filesystem()[1], name, *parts])

    def _probe_endpoint(self) -> None:
        """A TCP probe of an explicit endpoint (`endpoint_override=HOST:PORT`): a dead server fails fast."""
        q = parse_qs(urlsplit(self.root).query)
        ep = (q.get("endpoint_override") or [None])[0]
        if not ep:
            return
        secure = (q.get("scheme") or ["https"])[0] != "http"
        p = urlsplit(ep if "://" in ep else f"//{ep}")
        host, port = p.hostname, p.port or (443 if secure else 80)
        try:
            with socket.create_connection((host, port), timeout=10):
                pass
        except OSError as e:
            raise ConnectionError(f"cannot connect to {host}:{port} ({e.strerror or e})") from None

    def problem(self) -> str | None:
        """Why this URI storage cannot be used (one line), or None; answers within CHECK_TIMEOUT_S."""
        if not self.remote:
            return None
        try:
            fs, path = self.filesystem()
        except Exception as e:  # noqa: BLE001 - unsupported scheme, bad query parameter, no such filesystem
            if "Unrecognized filesystem type" in str(e):
                scheme = urlsplit(self.root).scheme
                return (f"{self.root}: unsupported scheme '{scheme}://' (a local folder, s3://, gs:// or "
                        f"another pyarrow filesystem URI)")
            return f"{self.root}: {_first_line(e)}"

        def check() -> str | None:
            import pyarrow.fs

            self._probe_endpoint()
            scheme = urlsplit(self.root).scheme
            if scheme in BUCKET_SCHEMES:
                bucket = path.split("/")[0]
                if not bucket:
                    return "no bucket in the URI"
                if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                    return f"bucket '{bucket}' does not exist (or these credentials cannot see it)"
            if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
                return f"{path} is a file, not a folder"
            return None

        try:
            err = _bounded(check, CHECK_TIMEOUT_S, "storage check")
        except Exception as e:  # noqa: BLE001 - network, credentials, permissions
            err = f"cannot reach it: {_first_line(e)}"
        return f"{self.root}: {err}" if err else None

    def check(self, where: str) -> None:
        """Raise SweepError("WHERE: key 'storage': URI: problem") when this URI storage cannot be used."""
        err = self.problem()
        if err:
            env = f" (from {ENV})" if self.source == ENV else ""
            raise SweepError(f"{where}: key 'storage'{env}: {err}")

    # --- files ----------------------------------------------------------------------------------------------
    def read_text(self, name: str, filename: str) -> str | None:
        """A file of the sweep's folder, or None when it is not there."""
        if not self.remote:
            p = Path(self.root) / name / filename
            return p.read_text() if p.exists() else None
        import pyarrow.fs

        fs, _ = self.filesystem()
        path = self._path(name, filename)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    def states(self) -> list[dict[str, Any]]:
        """The saved state (betadiff_sweep.json) of every sweep in this storage, by name."""
        if not self.remote:
            root = Path(self.root)
            files = sorted(root.glob(f"*/{STATE_FILE}")) if root.exists() else []
            return [json.loads(f.read_text()) for f in files]
        import pyarrow.fs

        fs, base = self.filesystem()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=False, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
        out = []
        for n in names:
            text = self.read_text(n, STATE_FILE)
            if text is not None:
                out.append(json.loads(text))
        return out

    def upload(self, name: str, work: Path, files: tuple[str, ...] = SYNCED, folder: bool = True,
               mirror: bool = True, since: dict[str, float] | None = None) -> None:
        """Copy `files` (and the ARTIFACT_DIR folder) of the local working folder to `<uri>/<name>/`.

        mirror: a file absent here is deleted there (the write journal is deleted once sent). since: a map
        filename -> local mtime at its last upload; unchanged files are skipped and the map is updated."""
        if not self.remote:
            return
        import pyarrow.fs

        fs, _ = self.filesystem()
        fs.create_dir(self._path(name), recursive=True)
        for f in files:
            local, remote = work / f, self._path(name, f)
            if local.is_file():
                mtime = local.stat().st_mtime
                if since is not None and since.get(f) == mtime:
                    continue
                data = local.read_bytes()
                with fs.open_output_stream(remote) as out:
                    out.write(data)
                if since is not None:
                    since[f] = mtime
            elif mirror and fs.get_file_info(remote).type == pyarrow.fs.FileType.File:
                fs.delete_file(remote)
        if not folder:
            return
        local_dir, remote_dir = work / ARTIFACT_DIR, self._path(name, ARTIFACT_DIR)
        if mirror and fs.get_file_info(remote_dir).type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(remote_dir)
        if local_dir.is_dir():
            for p in sorted(local_dir.rglob("*")):
                if p.is_file():
                    key = f"{ARTIFACT_DIR}/{p.relative_to(local_dir).as_posix()}"
                    if since is not None and since.get(key) == p.stat().st_mtime:
                        continue
                    with fs.open_output_stream(self._path(name, key)) as out:
                        out.write(p.read_bytes())
                    if since is not None:
                        since[key] = p.stat().st_mtime

    def download(self, name: str, work: Path, files: tuple[str, ...] = SYNCED) -> None:
        """Copy the sweep's files (and ARTIFACT_DIR) from `<uri>/<name>/` into `work`; a local copy changed
        after its last upload (a driver that died on this machine) is newer and kept."""
        if not self.remote:
            return
        import pyarrow.fs

        fs, _ = self.filesystem()
        work.mkdir(parents=True, exist_ok=True)
        wanted = [(work / f, self._path(name, f)) for f in files]
        infos = fs.get_file_info(
            pyarrow.fs.FileSelector(self._path(name, ARTIFACT_DIR), recursive=True, allow_not_found=True)
        )
        prefix = self._path(name, ARTIFACT_DIR) + "/"
        wanted += [(work / ARTIFACT_DIR / i.path[len(prefix):], i.path) for i in infos
                   if i.type == pyarrow.fs.FileType.File]
        for local, remote in wanted:
            info = fs.get_file_info(remote)
            if info.type != pyarrow.fs.FileType.File:
                continue
            if local.exists() and info.mtime is not None and local.stat().st_mtime > info.mtime.timestamp():
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(remote) as f:
                local.write_bytes(f.read())


# the working folder of each sweep this driver runs (set by the runner before Tune starts): a StateSync
# restored from an older driver's Tune state uploads from this one
WORK_DIRS: dict[str, Path] = {}

