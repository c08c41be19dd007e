"""Metric writes survive a tracking server that goes away: spooled, then sent oldest first (real MLflow stores)."""

from __future__ import annotations

import json

from betadiff.sweep.tracking import SweepTracker


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
