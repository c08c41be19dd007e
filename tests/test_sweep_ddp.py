"""Data-parallel trials: train() under torch.distributed (gloo, 2 CPU processes) and a 2-worker sweep trial.

Oracles: the averaged gradient of one step recomputed here from each rank's own seeded streams (read back
from Adam's first moment in the checkpoint), the all-reduced logged loss, an uninterrupted 2-rank run for
resume, a 1-process run with twice the batch (same global batch) for the loss curve, and MLflow's records
of a real `betadiff sweep run` on a local Ray.
"""

from __future__ import annotations

import json
import socket
import statistics
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

B = 64
STEPS = 30
SMALL = ["train.batch_size=64", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=10",
         "eval.n_samples=300", "eval.steps=10", "train.progress=false", "model.width=32",
         "optim.warmup_steps=0", "optim.decay=none", "optim.grad_clip=0", "train.threads=1"]


class Stop(Exception):
    pass


def _cfg(*extra: str):
    from betadiff.config import load_config

    return load_config("toy1_beta", SMALL + list(extra))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str) -> None:
    """One rank: a 1-step run, an uninterrupted 30-step run, and a run stopped at 20 then resumed."""
    import torch.distributed as dist

    from betadiff.train import train

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # each rank gets its own run_dir: anything under the rank-1 folders is a write by rank 1
        train(_cfg("train.steps=1"), run_dir=f"{tmp}/one_{rank}")
        train(_cfg(f"train.steps={STEPS}"), run_dir=f"{tmp}/full_{rank}")

        def stop_at_20(step, metrics):  # raised on every rank, as a distributed stop must be
            if step == 20:
                raise Stop

        try:
            train(_cfg(f"train.steps={STEPS}"), report=stop_at_20, run_dir=f"{tmp}/cut_{rank}")
        except Stop:
            pass
        seen = []
        out = train(_cfg(f"train.steps={STEPS}"), report=lambda s, m: seen.append((s, m)),
                    run_dir=f"{tmp}/cut_0")
        Path(f"{tmp}/seen_{rank}.json").write_text(json.dumps({"seen": seen, "out": out}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=2, join=True)
    return tmp


def _lines(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in (p / "metrics.jsonl").read_text().splitlines()]


def test_one_step_gradient_is_the_mean_of_each_ranks_gradient(dp_runs):
    """Adam's first moment after step 1 is (1 - beta1) x the all-reduced gradient: recompute it here."""
    from betadiff.data import make_dataset
    from betadiff.train import _seeded, build_model, load_checkpoint, objective

    cfg = _cfg("train.steps=1")
    model = build_model(cfg, make_dataset(cfg.data), torch.device("cpu"))
    loss_fn = objective(model)
    losses = []
    for rank in (0, 1):  # the trainer's per-rank streams: _seeded(seed, salt, rank)
        g_data, g_noise = _seeded(cfg.train.seed, 1, rank), _seeded(cfg.train.seed, 2, rank)
        x0 = model.scale * model.dataset.sample(B, g_data) + model.shift
        losses.append(loss_fn(model.denoiser, x0, g_noise)[0])
    params = list(model.denoiser.parameters())
    grads = torch.autograd.grad((losses[0] + losses[1]) / 2, params)

    ck = load_checkpoint(dp_runs / "one_0/checkpoint.pt")
    beta1 = cfg.optim.betas[0]
    moments = [ck["opt"]["state"][i]["exp_avg"] / (1 - beta1) for i in range(len(params))]
    assert abs(losses[0].item() - losses[1].item()) > 1e-3  # the ranks drew different batches
    for g, m in zip(grads, moments, strict=True):
        torch.testing.assert_close(m, g, rtol=1e-4, atol=1e-6)
    logged = _lines(dp_runs / "one_0")[0]["loss"]
    assert logged == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-5)  # all-reduced
    assert len(ck["rng_ranks"]) == 2 and not torch.equal(ck["rng_ranks"][0][0], ck["rng_ranks"][1][0])


def test_only_rank0_writes_and_ranks_report_in_step(dp_runs):
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "samples.png", "final.json"} <= {
        p.name for p in (dp_runs / "full_0").iterdir()
    }
    assert not (dp_runs / "one_1").exists() and not (dp_runs / "full_1").exists()
    assert not (dp_runs / "cut_1").exists()
    r0, r1 = (json.loads((dp_runs / f"seen_{r}.json").read_text()) for r in (0, 1))
    assert [s for s, _ in r0["seen"]] == [s for s, _ in r1["seen"]] == list(range(21, STEPS + 1))
    assert all(m == {} for _, m in r1["seen"]) and r1["out"] == {}
    assert "w1" in r0["out"] and r0["seen"][-1][1]["checkpoint_step"] == STEPS


def test_resumed_data_parallel_run_equals_uninterrupted(dp_runs):
    from betadiff.train import load_checkpoint

    a, b = load_checkpoint(dp_runs / "full_0/checkpoint.pt"), load_checkpoint(dp_runs / "cut_0/checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "step_time_ms"} for r in rows]
    assert drop(_lines(dp_runs / "full_0")) == drop(_lines(dp_runs / "cut_0"))


def test_two_workers_match_one_worker_with_twice_the_batch(dp_runs, tmp_path):
    """Same global batch (2 x 64 vs 1 x 128): the loss curves agree within 3 standard errors of their
    difference (each curve's spread over steps 11-30 measured here), and both fall from the start."""
    from betadiff.train import train

    train(_cfg(f"train.steps={STEPS}", f"train.batch_size={2 * B}"), run_dir=tmp_path / "single")
    dp = [r["loss"] for r in _lines(dp_runs / "full_0")]
    one = [r["loss"] for r in _lines(tmp_path / "single")]
    a, b = dp[10:], one[10:]
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    assert abs(statistics.mean(a) - statistics.mean(b)) < 3 * se, (statistics.mean(a), statistics.mean(b), se)
    assert statistics.mean(a) < statistics.mean(dp[:3]) and statistics.mean(b) < statistics.mean(one[:3])


def test_two_worker_sweep_trial_on_local_ray(tmp_path):
    import importlib.util

    # the local-sweep test's helpers (sweep file, CLI, MLflow queries), loaded by path: tests is no package
    path = Path(__file__).with_name("test_sweep_local.py")
    spec = importlib.util.spec_from_file_location("_sweep_local", path)
    local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local)
    cli, client, runs, sweep_file = local.cli, local.client, local.runs, local.sweep_file
    over = {"train.steps": 20, "train.eval_every": 10, "train.ckpt_every": 10, "train.log_every": 5,
            "train.batch_size": 128, "optim.warmup_steps": 0, "model.width": 32, "eval.n_samples": 500,
            "eval.steps": 10}
    p = sweep_file(tmp_path, "ddp", overrides=over, resources={"cpu": 1, "workers": 2}, max_concurrent=0)
    r = cli("run", str(p), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (child,) = runs(tmp_path, "ddp", "trial")
    assert child.info.status == "FINISHED" and child.data.tags["betadiff.workers"] == "2"
    c = client(tmp_path)
    assert [m.step for m in c.get_metric_history(child.info.run_id, "loss")] == [5, 10, 15, 20]
    assert [m.step for m in c.get_metric_history(child.info.run_id, "w1")] == [10, 20]
    final = json.loads(Path(c.download_artifacts(child.info.run_id, "final.json", str(tmp_path))).read_text())
    assert child.data.metrics["w1"] == final["w1"]
    ck_path = c.download_artifacts(child.info.run_id, "checkpoint.pt", str(tmp_path))
    ck = torch.load(ck_path, weights_only=True)
    assert ck["step"] == 20 and len(ck["rng_ranks"]) == 2  # written by a 2-rank run
    assert child.data.tags["betadiff.torch_threads"] == "1"
