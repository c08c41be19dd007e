"""The Tune trial: a thin wrapper around `betadiff.train.train(cfg, report=...)`.

The trial never talks to MLflow. Every trainer report becomes one `ray.tune.report` (plus `step` and
`budget`); the driver-side `tracking.MlflowSweepCallback` logs it. Checkpoints written by the trainer are
handed to Tune (`checkpoint_step == step`), so a retried or restored trial continues from the last one
exactly (`train(resume=True)`). A final report carries the run's artifacts (config, samples, checkpoint).
With more than one worker the trial is a light driver around a Ray Train `TorchTrainer` whose ranks run
`train()` data parallel; rank 0's reports reach Tune through `TuneReportCallback`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ARTIFACTS = ("config.yaml", "samples.png", "checkpoint.pt", "final.json")
# earlier loss-only reports held back and sent with a later one: [[step, {metric: value}], ...]
HISTORY_KEY = "history"
# keys the trial adds to the trainer's metrics; the driver does not log them as metrics
META_KEYS = ("step", "budget", "final", "checkpoint_step", "torch_threads", "machine", HISTORY_KEY)
# Each Tune report pauses the training thread for a round trip to the driver; loss-only reports are held for up
# to this long and sent together with the next report (evaluations and checkpoints go at once).
HOLD_S = 2.0


def _ran_on() -> dict[str, Any]:
    """The trial's thread count and machine, reported with its final result (tags of its run)."""
    import torch

    from betadiff.provenance import machine

    return {"torch_threads": torch.get_num_threads(), "machine": machine()}


class TrialError(RuntimeError):
    """A trial's failure, re-raised with a plain message: Ray must pickle it back to the driver."""


def trial_factors(config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(varied key -> value, seed) of a trial's Tune config: a grid point, or Optuna's flat dotted keys."""
    trial = config.get("trial") or {}
    factors = dict(trial.get("factors") or {})
    factors.update({k: v for k, v in config.items() if "." in k})
    seed = trial["seed"] if "seed" in trial else config["seeds"][config.get("__trial_index__", 0)]
    return factors, int(seed)


def trial_config(config: dict[str, Any]):
    """The TrainConfig of one trial from its Tune config (base + factors/search values + seed + threads)."""
    from betadiff.config import from_dict, merge_overrides

    base = from_dict(config["base"], where="sweep base")
    factors, seed = trial_factors(config)
    overrides = {**factors, **((config.get("trial") or {}).get("overrides") or {})}  # variants expanded
    overrides = {k: v for k, v in overrides.items() if "." in k}  # variant axis names are labels, not keys
    threads = max(1, int(config["cpu"]))
    return merge_overrides(
        base,
        {**overrides, "train.seed": seed, "train.threads": threads, "train.progress": False},
        where="trial",
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _bundle(run_dir: Path, names: tuple[str, ...]) -> str:
    """A fresh directory holding `names` from run_dir (hard links when possible) for a Tune checkpoint."""
    d = Path(tempfile.mkdtemp(prefix="betadiff_ckpt_"))
    for n in names:
        if (run_dir / n).exists():
            _link_or_copy(run_dir / n, d / n)
    return str(d)


def _restore_into(run_dir: Path) -> None:
    """Put the checkpoint Tune hands back into the run folder, so `train(resume=True)` continues from it. (Not a
    newer one the trial persisted after the driver's last snapshot: the driver never logged that report's metrics,
    so resuming past it would leave a gap in the run's history.)"""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        for name in ("checkpoint.pt", "final.json"):  # final.json: a finished run is not scored again
            if (Path(d) / name).exists():
                shutil.copy2(Path(d) / name, run_dir / name)


def _loss_only(metrics: dict[str, float]) -> bool:
    return bool(metrics) and all(k in ("lr", "step_time_ms") or k.startswith("loss") for k in metrics)


def make_reporter(
    budget: int, run_dir: Path, send: Callable[..., None], checkpoint_cls: Any = None, hold_s: float = 0.0
) -> Callable[[int, dict], None]:
    """Trainer callback → Tune (or Ray Train: `checkpoint_cls`) report; attach the checkpoint just written.

    hold_s > 0: loss-only reports are held (at most hold_s seconds) and sent in the `history` of the next report;
    `report.held` is what is still held (the trial's final report carries it). Only for a single worker: Ray
    Train's report is a barrier, so every rank must report at the same steps."""
    held: list[list] = []
    last = [time.monotonic()]

    def report(step: int, metrics: dict[str, float]) -> None:
        ckpt = metrics.get("checkpoint_step") == step and (run_dir / "checkpoint.pt").exists()
        if hold_s > 0 and not ckpt and _loss_only(metrics) and time.monotonic() - last[0] < hold_s:
            held.append([int(step), dict(metrics)])
            return
        out = {**metrics, "step": int(step), "budget": budget}
        if held:
            out[HISTORY_KEY] = list(held)
            held.clear()
        last[0] = time.monotonic()
        if ckpt:
            from ray import tune

            d = _bundle(run_dir, ("checkpoint.pt", "config.yaml"))
            send(out, checkpoint=(checkpoint_cls or tune.Checkpoint).from_directory(d))
            shutil.rmtree(d, ignore_errors=True)  # Tune persisted a copy
        else:
            send(out)

    report.held = held
    return report


def _train(cfg, run_dir: Path, report: Callable[[int, dict], None]) -> dict[str, float]:
    from betadiff.train import NonFiniteLossError, train

    try:
        return train(cfg, report=report, run_dir=run_dir, resume=True)
    except NonFiniteLossError as e:  # its __init__(step, value) does not survive pickling
        raise TrialError(f"NonFiniteLossError: {e}") from None


def _run_local(cfg, run_dir: Path, send: Callable[..., None]) -> tuple[dict[str, float], list]:
    """(final metrics, loss reports still held back)."""
    report = make_reporter(cfg.train.steps, run_dir, send, hold_s=HOLD_S)
    return _train(cfg, run_dir, report), report.held


# --- data parallel: a Ray Train TorchTrainer inside the Tune trial ------------------------------------------
def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop: every rank runs `train()` (data parallel); rank 0 writes the run folder and
    reports metrics and checkpoints. Train's report is a barrier, so ranks > 0 report empty results in step."""
    import ray.train
    import torch

    cfg = trial_config(config)
    torch.set_num_threads(cfg.train.threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    run_dir = Path(config["run_dir"])
    if ray.train.get_context().get_world_rank() > 0:
        _train(cfg, run_dir, lambda step, metrics: ray.train.report({}))
        ray.train.report({})  # rank 0's final report
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ray.train.get_checkpoint()  # Train restores its latest checkpoint when the trial is retried
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / "checkpoint.pt").exists():
                shutil.copy2(Path(d) / "checkpoint.pt", run_dir / "checkpoint.pt")
    budget = cfg.train.steps
    final = _train(cfg, run_dir, make_reporter(budget, run_dir, ray.train.report, ray.train.Checkpoint))
    d = _bundle(run_dir, ARTIFACTS)
    final = {**final, "step": budget, "budget": budget, "final": 1, **_ran_on()}
    ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(d))
    shutil.rmtree(d, ignore_errors=True)


def _run_data_parallel(config: dict[str, Any], run_dir: Path) -> tuple[dict[str, float], str]:
    """Fit a TorchTrainer of `workers` ranks (gloo on CPU, nccl on GPU); rank 0's reports reach Tune through
    TuneReportCallback. Returns (final metrics, a directory holding the run's artifacts)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpu = float(config["gpu"])
    storage = tune.get_context().get_storage()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**config, "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(config["workers"]),
            use_gpu=gpu > 0,
            resources_per_worker={"CPU": float(config["cpu"]), **({"GPU": 1} if gpu > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            name="train",  # under the trial's folder: a retried or restored trial resumes this run
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrialError(str(e)) from None
    d = tempfile.mkdtemp(prefix="betadiff_ckpt_")
    with result.checkpoint.as_directory() as src:
        shutil.copytree(src, d, dirs_exist_ok=True)
    return {k: v for k, v in result.metrics.items() if k not in ("step", "budget", "final")}, d


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable (one trial; `config` built by `runner`)."""
    import torch
    from ray import tune

    cfg = trial_config(config)
    # per trial id: with reused actors (warm workers) one process runs several trials
    run_dir = Path(os.getcwd()) / f"run_{tune.get_context().get_trial_id()}"
    if int(config.get("workers") or 1) > 1:
        final, d = _run_data_parallel(config, run_dir)
    else:
        # Ray sets OMP_NUM_THREADS=1 in workers: give torch the trial's CPUs back
        torch.set_num_threads(cfg.train.threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        _restore_into(run_dir)
        final, held = _run_local(cfg, run_dir, tune.report)
        final = {**(final or {}), **_ran_on(), **({HISTORY_KEY: held} if held else {})}
        d = _bundle(run_dir, ARTIFACTS)
    tune.report(
        {**final, "step": cfg.train.steps, "budget": cfg.train.steps, "final": 1},
        checkpoint=tune.Checkpoint.from_directory(d),
    )
    shutil.rmtree(d, ignore_errors=True)
