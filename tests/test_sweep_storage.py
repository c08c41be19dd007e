"""Sweeps whose `storage:` is a cloud URI, against a real S3 API server (moto, on loopback).

Oracles: the bucket's objects (Tune's experiment state, the trials' checkpoints, betadiff's state), MLflow's
records (no duplicate runs after a resume from elsewhere), and the CLI's exit code and error line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # importlib mode: reuse the local sweep tests' helpers
from test_sweep_local import cli, runs, sweep_file  # noqa: E402

BUCKET = "betadiff-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port with one empty bucket; yields its `endpoint_override`."""
    pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")

    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - t0 > 60:
                    raise AssertionError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        endpoint = f"127.0.0.1:{port}"
        _s3(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _s3(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _object(endpoint: str, key: str) -> str:
    return _s3(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _keys(endpoint: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in _s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, **CREDENTIALS, **extra}
    env.pop("BETADIFF_SWEEP_STORAGE", None)
    return env


@pytest.mark.ray
def test_s3_storage_run_then_resume_from_elsewhere(tmp_path, s3):
    uri = f"s3://{BUCKET}/sweeps?endpoint_override={s3}&scheme=http"
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    search = {
        "sampler": "random",
        "seed": 0,
        "num_samples": 2,
        "metrics": [{"name": "w1"}],
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3}},
    }  # an Optuna search: its journal is one of betadiff's files that must travel through the bucket
    p = sweep_file(here, "clouds", search=search, storage=uri)
    r = cli("run", str(p), cwd=here, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"s3://{BUCKET}/sweeps/clouds?" in r.stdout  # "Tune state: <uri>"
    assert not (here / ".betadiff").exists()  # nothing of the sweep in the working directory

    keys = _keys(s3, "sweeps/clouds/")
    names = {k[len("sweeps/clouds/"):] for k in keys}
    # Tune's experiment state, written by Tune through pyarrow
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names), sorted(names)
    # each trial's checkpoints (persisted by the trial workers): the trainer's checkpoint.pt
    ckpts = [n.split("/") for n in names if n.endswith("/checkpoint.pt")]
    assert len({c[0] for c in ckpts}) == 2, sorted(names)
    assert all(c[1].startswith("checkpoint_") for c in ckpts), sorted(names)
    # betadiff's own files
    assert {"betadiff_sweep.json", "sweep.yaml", "optuna.journal"} <= names
    assert not any(n.startswith(("unwritten_metrics", "unwritten_artifacts")) for n in names)  # all written

    children = runs(here, "clouds", "trial")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    finished = {c.info.run_id: c.info.end_time for c in children}
    (parent,) = runs(here, "clouds", "sweep")

    # no local copy anywhere: the resume must read the state from the bucket
    r = cli("run", str(p), cwd=elsewhere, env=_env(), timeout=60)  # a second run of the same name is refused
    assert r.returncode == 2 and "already has state" in r.stderr, r.stderr
    state = json.loads(_object(s3, "sweeps/clouds/betadiff_sweep.json"))
    assert state["parent_run_id"] == parent.info.run_id and state["storage"] == uri
    shutil.rmtree(state["work_dir"])

    r = cli("list", "--storage", uri, cwd=elsewhere, env=_env(), timeout=60)
    assert r.returncode == 0 and f"clouds  parent run {parent.info.run_id}" in r.stdout, r.stdout + r.stderr

    r = cli("resume", "clouds", "--storage", uri, cwd=elsewhere, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FINISHED; 2 trials, 0 failed" in r.stdout
    children = runs(here, "clouds", "trial")
    assert len(children) == 2  # 0 duplicate runs
    assert {c.info.run_id: c.info.end_time for c in children} == finished  # nothing ran again
    assert [x.info.run_id for x in runs(here, "clouds", "sweep")] == [parent.info.run_id]
    assert not (elsewhere / ".betadiff").exists()
    # the Optuna study came back from the bucket (the restored searcher reads it) and holds the 2 trials only
    import optuna

    journal = optuna.storages.journal.JournalFileBackend(str(Path(state["work_dir"]) / "optuna.journal"))
    study = optuna.load_study(study_name="clouds", storage=optuna.storages.JournalStorage(journal))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    shutil.rmtree(Path(state["work_dir"]).parent)  # this storage URI's local working folders


def test_storage_settings_and_job_environment(tmp_path, monkeypatch):
    from betadiff.sweep import jobs, runner
    from betadiff.sweep.storage import SweepStore, is_uri, join_uri

    uri = "s3://bucket/prefix?endpoint_override=10.0.0.1:9000&scheme=http"
    assert is_uri(uri) and is_uri("gs://b/p") and not is_uri("rel/dir") and not is_uri("file:///abs/dir")
    assert join_uri(uri, "sweep") == "s3://bucket/prefix/sweep?endpoint_override=10.0.0.1:9000&scheme=http"
    assert join_uri("s3://bucket/", "sweep") == "s3://bucket/sweep"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BETADIFF_SWEEP_STORAGE", raising=False)
    # a Ray Job driver gets a storage URI as it is, a local folder as an absolute path (as before)
    assert jobs._driver_env("sqlite:////x.db", runner.storage_root(uri))["BETADIFF_SWEEP_STORAGE"] == uri
    local = jobs._driver_env("sqlite:////x.db", runner.storage_root("rel/sweeps"))["BETADIFF_SWEEP_STORAGE"]
    assert local == str(tmp_path / "rel" / "sweeps")
    assert runner.storage_root(None) == tmp_path / ".betadiff" / "sweeps"
    assert runner.storage_root(f"file://{tmp_path}/s") == tmp_path / "s"
    monkeypatch.setenv("BETADIFF_SWEEP_STORAGE", uri)
    assert runner.storage_root(None) == uri and SweepStore(None).source == "BETADIFF_SWEEP_STORAGE"
    # the local working folder of a URI storage: per storage and sweep, the same from any working directory
    a = SweepStore(uri).default_work_dir("s1")
    monkeypatch.chdir("/")
    assert SweepStore(uri).default_work_dir("s1") == a != SweepStore(uri + "x").default_work_dir("s1")


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return lines[0]


def test_bad_storage_uris_exit_2_with_one_line(tmp_path, s3):
    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    cases = {
        "ftpish://bucket/sweeps": "unsupported scheme 'ftpish://'",
        f"s3://{BUCKET}/sweeps?endpoint_override={dead}&scheme=http": f"cannot connect to {dead}",
        f"s3://no-such-bucket/x?endpoint_override={s3}&scheme=http": "bucket 'no-such-bucket' does not exist",
    }
    for i, (uri, problem) in enumerate(cases.items()):
        p = sweep_file(tmp_path, f"bad{i}", storage=uri)
        t0 = time.monotonic()
        line = _one_line(cli("run", str(p), cwd=tmp_path, env=_env(), timeout=60))
        assert time.monotonic() - t0 < 30
        assert line.startswith(f"error: {p}: key 'storage': {uri}: ") and problem in line, line
    # resume and list name the URI they were given
    line = _one_line(cli("resume", "bad0", "--storage", f"s3://{BUCKET}/x?endpoint_override={dead}&scheme=http",
                         cwd=tmp_path, env=_env(), timeout=60))
    assert "sweep 'bad0': --storage s3://" in line and f"cannot connect to {dead}" in line, line
    line = _one_line(cli("list", "--storage", "ftpish://b/x", cwd=tmp_path, env=_env(), timeout=60))
    assert "unsupported scheme" in line, line
    # a bucket that is there but holds no such sweep
    line = _one_line(cli("resume", "nope", "--storage", f"s3://{BUCKET}/sweeps?endpoint_override={s3}&scheme=http",
                         cwd=tmp_path, env=_env(), timeout=60))
    assert "no saved state under s3://" in line, line
    assert not (tmp_path / ".betadiff").exists()
