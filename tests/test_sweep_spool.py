"""Sweep writes survive a tracking server that goes away: journalled, then sent oldest first (real MLflow
stores: SQLite, and a real `mlflow server` that is killed and restarted)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from betadiff.sweep.tracking import SweepTracker, is_pending, read_journal


def test_unreachable_server_spools_then_flushes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = SweepTracker(uri, "spool", "s")
    run_id = live.client.create_run(live.experiment_id).info.run_id

    t = SweepTracker("http://127.0.0.1:9", "spool", "s")  # nothing listens on the discard port
    t.spool = str(tmp_path / "unwritten.jsonl")
    t.log_metrics(run_id, {"loss": 1.0, "jsd": 0.5}, step=10)  # must not raise: training goes on
    t.log_metrics(run_id, {"loss": 0.9}, step=20)
    assert [json.loads(ln)["step"] for ln in open(t.spool)] == [10, 20]
    assert "kept in" in capsys.readouterr().out  # said once, clearly
    assert t.flush_spool() == 2

    t.uri, t._client = uri, None  # the server is back
    t.log_metrics(run_id, {"loss": 0.8}, step=30)
    hist = live.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(10, 1.0), (20, 0.9), (30, 0.8)]
    assert [m.step for m in live.client.get_metric_history(run_id, "jsd")] == [10]
    assert t.flush_spool() == 0 and not (tmp_path / "unwritten.jsonl").exists()


# --- every child-run write is durable: one journal, sent oldest first ------------------------------------
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture
def away(tmp_path, monkeypatch):
    """A live SQLite store (`live`, with a parent run); a tracker `t`, server away until `back(t)`."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.chdir(tmp_path)  # the SQLite store's artifacts land here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = SweepTracker(uri, "spool", "s")
    live.parent_run_id = live.client.create_run(live.experiment_id, run_name="parent").info.run_id
    t = SweepTracker(DEAD, "spool", "s")
    t.parent_run_id, t.spool = live.parent_run_id, str(tmp_path / "unwritten.jsonl")

    def back(tracker: SweepTracker) -> None:
        tracker.uri, tracker._client = uri, None

    return live, t, back


def _ops(t: SweepTracker) -> list[str]:
    return [op["op"] for op in read_journal(t.spool)]


def test_tags_status_artifact_and_end_arrive_in_order_after_an_outage(away, tmp_path, capsys):
    live, t, back = away
    rid = live.client.create_run(live.experiment_id).info.run_id
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    (ckpt / "final.json").write_text('{"fid": 1.5}')
    t.log_metrics(rid, {"loss": 1.0}, step=10)
    t.set_tags(rid, {"betadiff.torch_threads": "2"})
    t.log_artifacts(rid, ckpt, ("final.json", "samples.png"))  # no samples.png here: skipped
    shutil.rmtree(ckpt)  # Tune deletes an old checkpoint (num_to_keep=2): the kept copy must not care
    t.set_status(rid, "RUNNING")
    t.log_metrics(rid, {"loss": 0.5}, step=20)
    t.end_child(rid, "FINISHED", {"betadiff.note": "done"})
    assert _ops(t) == ["metrics", "tags", "artifact", "status", "metrics", "tags", "terminate"]
    ended = read_journal(t.spool)[-1]["ts"]
    warned = [ln for ln in capsys.readouterr().out.splitlines() if "warning" in ln]
    assert len(warned) == 1 and t.spool in warned[0]  # one line, naming the journal
    assert live.client.get_run(rid).info.status == "RUNNING" and not live.client.get_metric_history(
        rid, "loss"
    )
    assert t.flush_spool() == 7  # still away: everything kept

    back(t)
    assert t.flush_spool() == 0 and not os.path.exists(t.spool)
    assert "writes resumed" in capsys.readouterr().out
    run = live.client.get_run(rid)
    assert run.info.status == "FINISHED"  # the status update went before the end, as they were made
    assert run.info.end_time == ended  # the time the trial ended, not the time the server came back
    assert run.data.tags["betadiff.torch_threads"] == "2" and run.data.tags["betadiff.note"] == "done"
    assert [(m.step, m.value) for m in live.client.get_metric_history(rid, "loss")] == [(10, 1.0), (20, 0.5)]
    assert [a.path for a in live.client.list_artifacts(rid)] == ["final.json"]
    with open(live.client.download_artifacts(rid, "final.json", str(tmp_path / "dl"))) as f:
        assert f.read() == '{"fid": 1.5}'
    assert not [p for p in t.artifact_dir.rglob("*") if p.is_file()]  # kept copies deleted once written

    assert t.flush_spool() == 0  # flushing again writes nothing twice
    assert len(live.client.get_metric_history(rid, "loss")) == 2


def test_flush_stops_at_the_first_failure_and_keeps_the_rest(away):
    live, t, back = away
    rid = live.client.create_run(live.experiment_id).info.run_id
    t.log_metrics(rid, {"loss": 1.0}, step=1)
    t.end_child("no-such-run", "FINISHED")  # the server will refuse this one
    t.log_metrics(rid, {"loss": 0.5}, step=2)
    t.end_child(rid, "FINISHED")
    back(t)
    assert t.flush_spool() == 3  # step 1 went through; the refused end and everything after it are kept
    assert [m.step for m in live.client.get_metric_history(rid, "loss")] == [1]
    assert _ops(t) == ["terminate", "metrics", "terminate"]
    assert live.client.get_run(rid).info.status == "RUNNING"  # its end did not overtake its last point


def _trial(trial_id: str, **kw) -> SimpleNamespace:
    """The parts of a Tune trial the callback reads."""
    return SimpleNamespace(
        trial_id=trial_id, config={"x": 1}, status="RUNNING", checkpoint=None, last_result={}, **kw
    )


def test_a_trial_started_while_the_server_is_away_gets_its_run_on_flush(away, tmp_path):
    from ray.tune import Checkpoint

    from betadiff.sweep.callback import MlflowSweepCallback

    live, t, back = away
    describe = lambda cfg: ("cell-x1-s0", {"betadiff.cell": "x=1"}, {"x": cfg["x"], "lr": 0.1})  # noqa: E731
    cb = MlflowSweepCallback(t, describe, ("loss",), total=1)
    trial = _trial("abc_00000")
    cb.on_trial_start(0, [trial], trial)  # must not raise: training goes on
    assert cb.runs["abc_00000"] == "trial:abc_00000" and is_pending(cb.runs["abc_00000"])
    cb.on_trial_result(0, [trial], trial, {"loss": 1.0, "step": 10, "budget": 20})
    cb.on_trial_result(0, [trial], trial, {"loss": 0.5, "step": 20, "budget": 20})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "final.json").write_text("{}")
    trial.checkpoint = Checkpoint.from_directory(str(ckpt))
    trial.last_result = {"loss": 0.5, "step": 20, "budget": 20, "final": True, "torch_threads": 1}
    trial.status = "TERMINATED"
    cb.on_trial_complete(0, [trial], trial)
    shutil.rmtree(ckpt)
    assert _ops(t) == ["child", "metrics", "metrics", "artifact", "tags", "terminate"]
    journal = open(t.spool).read()

    back(t)
    assert t.flush_spool() == 0
    (kid,) = live.children()
    rid = kid.info.run_id
    assert kid.info.run_name == "cell-x1-s0" and kid.info.status == "FINISHED"
    assert kid.data.params == {"x": "1", "lr": "0.1"}
    assert kid.data.tags["betadiff.trial_id"] == "abc_00000" and kid.data.tags["betadiff.cell"] == "x=1"
    assert kid.data.tags["betadiff.torch_threads"] == "1"
    assert [(m.step, m.value) for m in live.client.get_metric_history(rid, "loss")] == [(10, 1.0), (20, 0.5)]
    assert [a.path for a in live.client.list_artifacts(rid)] == ["final.json"]
    assert cb._run_id(trial) == rid and cb.get_state()["runs"] == {"abc_00000": rid}

    # nothing is written twice: flushing again, replaying the same journal (a driver killed mid-flush),
    # or starting the trial's run again
    assert t.flush_spool() == 0
    open(t.spool, "w").write(journal)
    assert t.flush_spool() == 0
    assert t.start_child("abc_00000", "cell-x1-s0", {}, {"x": 1, "lr": 0.1}) == rid
    assert [k.info.run_id for k in live.children()] == [rid]
    assert len(live.client.get_metric_history(rid, "loss")) == 2
    assert [a.path for a in live.client.list_artifacts(rid)] == ["final.json"]


def test_a_trial_the_restored_driver_does_not_know_reuses_its_run_and_logs_each_step_once(away):
    """Tune's state snapshot can predate a trial's start (CI: `ray job stop` while the second trial was at step
    50): the restored callback has no run for it, the trial starts again from scratch, and its run already has
    step 50. A trial that finished after the snapshot keeps its finished run as it is."""
    from betadiff.sweep.callback import MlflowSweepCallback

    live, t, back = away
    back(t)
    describe = lambda cfg: ("cell-x1-s0", {}, {"x": cfg["x"]})  # noqa: E731
    first = MlflowSweepCallback(t, describe, total=2)
    a, b = _trial("abc_00000"), _trial("abc_00001")
    for trial in (a, b):
        first.on_trial_start(0, [a, b], trial)
        first.on_trial_result(0, [a, b], trial, {"loss": 1.0, "step": 50, "budget": 100})
    a.last_result = {"loss": 0.5, "step": 100, "budget": 100}
    first.on_trial_result(0, [a, b], a, a.last_result)
    first.on_trial_complete(0, [a, b], a)
    ended = live.client.get_run(first.runs[a.trial_id]).info.end_time

    again = MlflowSweepCallback(t, describe, total=2)  # the driver restored from a snapshot without either
    again.set_state({"runs": {}, "failures": {}})
    for trial in (a, b):
        again.on_trial_start(0, [a, b], trial)
        for step in (50, 100):
            again.on_trial_result(0, [a, b], trial, {"loss": 0.1, "step": step, "budget": 100})
        again.on_trial_complete(0, [a, b], trial)
    assert again.runs == first.runs and len(live.children()) == 2
    hist = lambda r: [(m.step, m.value) for m in live.client.get_metric_history(r, "loss")]  # noqa: E731
    assert hist(first.runs[a.trial_id]) == [(50, 1.0), (100, 0.5)]  # finished before: untouched
    assert live.client.get_run(first.runs[a.trial_id]).info.end_time == ended
    assert hist(first.runs[b.trial_id]) == [(50, 1.0), (100, 0.1)]
    assert live.client.get_run(first.runs[b.trial_id]).info.status == "FINISHED"


def _describe(cfg: dict) -> tuple:  # module level: Tune pickles the callback with it
    return "cell-x1-s0", {}, {"x": cfg["x"]}


def test_only_a_restored_driver_looks_for_runs_of_trials_it_does_not_know(away, monkeypatch):
    """A fresh sweep's trials have no runs yet: no lookup per trial start. A callback unpickled from Tune's
    state (or given its snapshot) looks once for each trial it does not know."""
    import pickle

    from betadiff.sweep.callback import MlflowSweepCallback

    live, t, back = away
    back(t)
    asked: list[str] = []
    look = SweepTracker.existing_child
    monkeypatch.setattr(SweepTracker, "existing_child", lambda self, tid: asked.append(tid) or look(self, tid))
    fresh = MlflowSweepCallback(t, _describe, total=3)
    a, b, c = _trial("abc_00000"), _trial("abc_00001"), _trial("abc_00002")
    fresh.on_trial_start(0, [a, b, c], a)
    assert asked == [] and len(live.children()) == 1
    restored = pickle.loads(pickle.dumps(fresh))  # Tune's tuner.pkl: the callback as the sweep began
    restored.on_trial_start(0, [a, b, c], a)  # known: its run id came with the pickle
    restored.on_trial_start(0, [a, b, c], b)
    assert asked == ["abc_00001"]
    given = MlflowSweepCallback(t, _describe, total=3)
    given.set_state({"runs": {}, "failures": {}})
    given.on_trial_start(0, [a, b, c], c)
    assert asked == ["abc_00001", "abc_00002"] and len(live.children()) == 3


def test_old_spool_lines_are_metric_batches(away):
    live, t, back = away
    rid = live.client.create_run(live.experiment_id).info.run_id
    with open(t.spool, "w") as f:  # the format before the journal: no "op"
        f.write(json.dumps({"run_id": rid, "step": 5, "ts": 1000, "metrics": {"loss": 2.0}}) + "\n")
    back(t)
    t.set_tags(rid, {"a": "b"})
    assert not os.path.exists(t.spool)
    assert [(m.step, m.value) for m in live.client.get_metric_history(rid, "loss")] == [(5, 2.0)]


def test_a_server_that_hangs_costs_one_bounded_wait_per_retry_interval(tmp_path, monkeypatch):
    """A server that accepts connections but never answers: the first write waits for the HTTP timeout, the
    next writes go straight to the journal until `retry_s` has passed."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # never accepted, never answered
        t = SweepTracker(f"http://127.0.0.1:{hung.getsockname()[1]}", "spool", "s")
        t.spool, t.retry_s = str(tmp_path / "unwritten.jsonl"), 60.0
        t0 = time.monotonic()
        t.log_metrics("r", {"loss": 1.0}, step=0)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        for step in range(1, 11):
            t.log_metrics("r", {"loss": 1.0}, step=step)
        rest = time.monotonic() - t0
    assert first >= 0.9 and rest < 0.5  # the ten writes after it did not wait on the server
    assert [op["step"] for op in read_journal(t.spool)] == list(range(11))


# --- a real `mlflow server` killed and restarted while a tracker writes -------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(db: str, art: str, port: int, log) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        db,
        "--default-artifact-root",
        art,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    for _ in range(480):  # imports and migrations take a while on a loaded machine
        assert p.poll() is None, "mlflow server exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return p
        except OSError:
            time.sleep(0.25)
    raise AssertionError("mlflow server did not answer in 120 s")


def _kill(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)  # the whole server goes away at once
    p.wait(timeout=30)


@pytest.mark.slow
def test_server_killed_and_restarted_mid_sweep_loses_no_metric_point(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    db, art, port = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "art"), _free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = _server(db, art, port, log)
        try:
            t = SweepTracker(f"http://127.0.0.1:{port}", "restart", "s")
            t.spool = str(tmp_path / "unwritten.jsonl")
            t.parent_run_id = t.client.create_run(t.experiment_id, run_name="parent").info.run_id
            rid = t.start_child("t0", "t0", {}, {"lr": 0.1})
            for step in range(20):
                t.log_metrics(rid, {"loss": float(step), "jsd": 0.1}, step=step)
            _kill(server)
            for step in range(20, 40):  # the server is away: kept, training goes on
                t.log_metrics(rid, {"loss": float(step), "jsd": 0.1}, step=step)
            t.end_child(rid, "FINISHED")
            kid = t.start_child("t1", "t1", {}, {"lr": 0.2})  # a trial that starts while it is away
            t.log_metrics(kid, {"loss": 9.0}, step=0)
            assert is_pending(kid) and t.flush_spool() == 23
            server = _server(db, art, port, log)  # back, same store
            t.log_metrics(rid, {"loss": 40.0, "jsd": 0.1}, step=40)  # late point: goes after the journal
            assert t.flush_spool() == 0
        finally:
            _kill(server)
    live = SweepTracker(db, "restart", "s")
    live.parent_run_id = t.parent_run_id
    assert sorted(m.step for m in live.client.get_metric_history(rid, "loss")) == list(range(41))
    assert len(live.client.get_metric_history(rid, "jsd")) == 41
    assert live.client.get_run(rid).info.status == "FINISHED"
    (late,) = [k for k in live.children() if k.data.tags["betadiff.trial_id"] == "t1"]
    assert (
        late.data.params == {"lr": "0.2"}
        and len(live.client.get_metric_history(late.info.run_id, "loss")) == 1
    )


def test_trial_holds_loss_reports_and_sends_them_with_the_next_one(tmp_path):
    """Loss-only reports are held (each Tune report pauses training for a driver round trip) and reach the driver
    in the `history` of the next report; evaluations go at once; nothing is dropped or reordered."""
    from betadiff.sweep.trainable import HISTORY_KEY, make_reporter

    sent = []
    report = make_reporter(100, tmp_path, lambda out, **kw: sent.append(out), hold_s=3600.0)
    report(10, {"loss": 1.0, "lr": 0.1})
    report(20, {"loss": 0.9, "lr": 0.1, "loss_klub_cond": 0.5})
    assert sent == [] and [s for s, _ in report.held] == [10, 20]
    report(30, {"loss": 0.8, "jsd": 0.2})  # an evaluation: sent now, carrying what was held
    assert len(sent) == 1 and sent[0]["step"] == 30 and sent[0]["jsd"] == 0.2
    assert [(s, m["loss"]) for s, m in sent[0][HISTORY_KEY]] == [(10, 1.0), (20, 0.9)]
    assert report.held == []
    report(40, {"loss": 0.7})
    assert [s for s, _ in report.held] == [40]  # the trial's final report carries it
    eager = []
    r0 = make_reporter(100, tmp_path, lambda out, **kw: eager.append(out), hold_s=0.0)
    r0(10, {"loss": 1.0})
    assert [e["step"] for e in eager] == [10] and HISTORY_KEY not in eager[0]
