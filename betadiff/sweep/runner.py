"""Drive a validated sweep through Ray Tune: local Ray by default or any cluster by address; resume by name.

State lives under `<storage>/<name>/` (default storage `.betadiff/sweeps` in the working directory):
Tune's experiment state and trial checkpoints, `sweep.yaml` (self-contained: the base config inlined) and
`betadiff_sweep.json` (parent run id, tracking URI). `resume NAME` restores from there: finished trials are
not run again, unfinished and errored ones continue from their last checkpoint, runs are re-attached.
Storage may also be a URI (s3://, gs://, any pyarrow filesystem): Tune writes there, and betadiff's own files
are kept in a local working folder and uploaded next to Tune's state (`betadiff.sweep.storage`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import OmegaConf

from betadiff.config import config_hash, flatten, to_dict
from betadiff.sweep.schema import Sweep, SweepError, load_sweep, report_metrics, trial_key
from betadiff.sweep.storage import (
    DEFAULT_STORAGE,  # noqa: F401 - re-exported
    OPTUNA_FILE,
    SPOOL_FILE,
    STATE_FILE,
    SWEEP_FILE,
    WORK_DIRS,
    SweepStore,
)
from betadiff.sweep.trainable import trial_config, trial_factors


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot place a trial (one line)."""


def storage_root(spec_storage: str | None = None) -> Path | str:
    """The storage folder (absolute), or the storage URI as given (s3://bucket/prefix?...)."""
    store = SweepStore(spec_storage)
    return store.root if store.remote else Path(store.root)


def experiment_dir(sweep: Sweep) -> Path | str:
    """The sweep's Tune experiment folder, or its URI."""
    store = SweepStore(sweep.spec.storage)
    return store.experiment(sweep.name) if store.remote else Path(store.root) / sweep.name


def self_contained(sweep: Sweep) -> dict[str, Any]:
    """The sweep as a mapping with its base config inlined (overrides applied): resumable anywhere."""
    d = OmegaConf.to_container(OmegaConf.structured(sweep.spec), resolve=True)
    d["base"], d["overrides"] = to_dict(sweep.base), {}
    return d


# --- trials -------------------------------------------------------------------------------------------------
def param_space(sweep: Sweep) -> dict[str, Any]:
    from ray import tune

    r = sweep.spec.resources
    common = {
        "base": to_dict(sweep.base),
        "seeds": sweep.seeds,
        "cpu": r.cpu,
        "workers": sweep.workers,
        "gpu": r.gpu,
    }
    if sweep.spec.search is not None:
        return common  # Optuna fills in the searched keys; Repeater adds __trial_index__ for seeds
    trials = [{"key": t.key, "factors": t.factors, "overrides": t.overrides, "seed": t.seed} for t in sweep.trials]
    return {**common, "trial": tune.grid_search(trials)}


def describe(config: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(run name, tags, params) of a trial's Tune config — used by the MLflow callback on the driver."""
    from betadiff.provenance import git_commit

    cfg = trial_config(config)
    factors, seed = trial_factors(config)
    tags = {f"betadiff.factor.{k}": str(v) for k, v in factors.items()}
    tags.update(
        {
            "betadiff.seed": str(seed),
            "betadiff.git_commit": git_commit(),
            "betadiff.config_hash": config_hash(cfg),
            "betadiff.budget": str(cfg.train.steps),
            "betadiff.trial_key": trial_key(factors, seed),
            "betadiff.workers": str(config.get("workers") or 1),
        }
    )
    return tags["betadiff.trial_key"], tags, flatten(cfg)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def trainable_with_resources(sweep: Sweep):
    from ray import tune

    from betadiff.sweep.trainable import run_trial

    r = sweep.spec.resources
    if sweep.workers > 1:
        # a light driver: the TorchTrainer's workers hold the CPUs/GPUs; a 1-byte memory bundle because Tune
        # refuses an all-zero request (a CPU fraction would not fit next to 2 workers x 1 CPU on 2 CPUs)
        return tune.with_resources(run_trial, {"cpu": 0, "memory": 1})
    return tune.with_resources(run_trial, {"cpu": r.cpu, "gpu": r.gpu})


# --- cluster ------------------------------------------------------------------------------------------------
def check_address(address: str, timeout: float = 10.0) -> None:
    """A TCP probe so an unreachable cluster fails in seconds instead of hanging in ray.init."""
    if address in ("auto", "local"):
        return
    a = address if "://" in address else f"ray://{address}"
    p = urlparse(a)
    host, port = p.hostname, p.port or (10001 if p.scheme == "ray" else 8265)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(
            f"Ray address {address}: cannot connect to {host}:{port} ({e.strerror or e})"
        ) from None


def _sweep_callback(tuner):
    """The tuner's MlflowSweepCallback: ours on a fresh run, unpickled from Tune's state on a restore."""
    from betadiff.sweep.callback import MlflowSweepCallback

    internal = getattr(tuner, "_local_tuner", None)  # Ray keeps the run config there (no public accessor)
    callbacks = internal.get_run_config().callbacks if internal is not None else None
    return next((c for c in callbacks or () if isinstance(c, MlflowSweepCallback)), None)


def connect(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None or address == "local":
        # always a fresh local instance (never someone's `ray start` cluster on this machine)
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )  # trial errors reach the callback
    else:
        check_address(address)
        # Ray 2.60 clusters from `ray start --head` use token auth; the token is in ~/.ray/auth_token
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address=address, log_to_driver=False)


def node_capacity() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def local_capacity() -> list[dict[str, float]]:
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def _worker_slots(sweep: Sweep, nodes: list[dict[str, float]]) -> tuple[int, float, list]:
    """(workers the cluster places at once, GPUs per worker, nodes that fit one worker)."""
    r = sweep.spec.resources
    per_worker_gpu = r.gpu / sweep.workers if sweep.workers > 1 else r.gpu
    fits = [n for n in nodes if n.get("CPU", 0) >= r.cpu and n.get("GPU", 0) >= per_worker_gpu]
    slots = sum(
        min(
            int(n.get("CPU", 0) // r.cpu), int(n.get("GPU", 0) // per_worker_gpu) if per_worker_gpu else 10**9
        )
        for n in fits
    )
    return slots, per_worker_gpu, fits


def check_placement(sweep: Sweep, nodes: list[dict[str, float]]) -> str:
    """Raise SweepError when no node (or, data parallel, not enough nodes) can place one trial."""
    r = sweep.spec.resources
    w = sweep.workers
    slots, per_worker_gpu, fits = _worker_slots(sweep, nodes)
    summary = "; ".join(
        f"node {i}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for i, n in enumerate(nodes)
    )
    if not fits or slots < w:
        key = (
            "resources.gpu"
            if per_worker_gpu and not any(n.get("GPU", 0) >= per_worker_gpu for n in nodes)
            else "resources.cpu"
        )
        raise SweepError(
            f"{sweep.path}: key '{key}': a trial needs {w} worker(s) × ({r.cpu:g} CPU, "
            f"{per_worker_gpu:g} GPU) but the cluster cannot place it ({summary})"
        )
    return f"a trial fits ({slots // w} at once; {summary})"


# --- dry run ------------------------------------------------------------------------------------------------
def measure_step(sweep: Sweep, steps: int = 30) -> dict[str, float]:
    """Median training step (ms) and one evaluation (s) of the base config, measured here on few steps."""
    import torch

    from betadiff.config import merge_overrides
    from betadiff.train import train

    base = sweep.base
    n_eval = min(base.eval.n_samples, 2000)
    cfg = merge_overrides(
        base,
        {
            "train.steps": steps,
            "train.log_every": 1,
            "train.eval_every": 0,
            "train.ckpt_every": 0,
            "train.progress": False,
            "eval.n_samples": n_eval,
            "train.threads": max(1, int(sweep.spec.resources.cpu)),
        },
        where="dry run",
    )
    times: list[float] = []
    marks: list[float] = []

    def cb(step, m):
        marks.append(time.perf_counter())
        if "step_time_ms" in m and step > 3:
            times.append(m["step_time_ms"])

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train(cfg, report=cb, run_dir=d, resume=False)
        total = time.perf_counter() - t0
    torch.set_num_threads(threads)
    step_ms = statistics.median(times) if times else 1000 * total / steps
    # the last report follows the final evaluation: its share of the wall time, scaled to eval.n_samples
    eval_s = max(0.0, (marks[-1] - marks[-2]) if len(marks) > 1 else 0.0) * base.eval.n_samples / n_eval
    return {"step_ms": step_ms, "eval_s": eval_s}


def dry_run(sweep: Sweep, address: str | None, out=print, measure: bool = True) -> int:
    r = sweep.spec.resources
    n = len(sweep.trials) if sweep.spec.search is None else sweep.spec.search.num_samples * len(sweep.seeds)
    out(f"sweep {sweep.name}: {n} trials  (base {sweep.base_source}; hash {sweep.sweep_hash})")
    out(
        f"resources per trial: {sweep.workers} worker(s) × {r.cpu:g} CPU, {r.gpu / sweep.workers:g} GPU"
        f"{'  [data parallel]' if sweep.workers > 1 else ''}"
    )
    if sweep.spec.search is None:
        out(f"{'#':>4}  trial")
        for i, t in enumerate(sweep.trials):
            out(f"{i:>4}  {t.key}")
    else:
        s = sweep.spec.search
        out(
            f"search: {s.sampler} (seed {s.seed}), {s.num_samples} samples × seeds {sweep.seeds}; metrics "
            + ", ".join(f"{m.name} ({m.mode})" for m in sweep.metrics)
        )
        for k, p in s.space.items():
            out(f"   {k}: {p.type} " + (f"{p.values}" if p.type == "choice" else f"[{p.low}, {p.high}]"))
    if sweep.spec.scheduler.type != "none":
        out(f"scheduler: {sweep.spec.scheduler.type} on the training step")
    store = SweepStore(sweep.spec.storage)
    if store.remote:
        store.check(sweep.path)
        out(f"storage: {store.experiment(sweep.name)} (reachable)")
    if address:
        connect(address)
        nodes = node_capacity()
    else:
        nodes = local_capacity()
    out("placement: " + check_placement(sweep, nodes))
    if measure:
        m = measure_step(sweep)
        b = sweep.base.train
        evals = (b.steps // b.eval_every if b.eval_every else 0) + 1
        trial_s = b.steps * m["step_ms"] / 1000 + evals * m["eval_s"]
        slots = max(
            1,
            min(
                n,
                sweep.spec.max_concurrent or n,
                int(sum(nd.get("CPU", 0) for nd in nodes) // (r.cpu * sweep.workers)),
            ),
        )
        out(
            f"cost estimate: step {m['step_ms']:.2f} ms (measured), "
            f"evaluation {m['eval_s']:.1f} s × {evals}; "
            f"{trial_s / 60:.1f} min per trial, {n * trial_s / 3600:.2f} CPU-trial-hours, "
            f"≈{n * trial_s / slots / 60:.1f} min wall at {slots} concurrent"
        )
    return 0


# --- run / resume -------------------------------------------------------------------------------------------
def _save_state(exp_dir: Path, sweep: Sweep, state: dict[str, Any]) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / SWEEP_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(self_contained(sweep))))
    (exp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_saved(name: str, storage: str | None = None) -> tuple[Sweep, dict[str, Any]]:
    store = SweepStore(storage)
    if store.remote:
        return _load_saved_remote(name, store)
    exp_dir = storage_root(storage) / name
    if not (exp_dir / STATE_FILE).exists():
        raise SweepError(f"sweep '{name}': no saved state under {exp_dir} (was it started with `sweep run`?)")
    state = json.loads((exp_dir / STATE_FILE).read_text())
    sweep = load_sweep(str(exp_dir / SWEEP_FILE))
    sweep.spec.storage = str(exp_dir.parent)
    return sweep, state


def _work_dir(store: SweepStore, name: str, recorded: str | None) -> Path:
    """The local working folder of a sweep in URI storage: the one its earlier drivers used (the Optuna and
    write journals' paths are pickled in Tune's state) when it can be made here, else the default."""
    for d in ([Path(recorded)] if recorded else []) + [store.default_work_dir(name)]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
    raise SweepError(f"sweep '{name}': cannot create a local working folder ({store.default_work_dir(name)})")


def _load_saved_remote(name: str, store: SweepStore) -> tuple[Sweep, dict[str, Any]]:
    """Read the state from `<uri>/<name>/` and download betadiff's files into the local working folder."""
    err = store.problem()
    if err:
        raise SweepError(f"sweep '{name}': --storage {err}")
    exp = store.experiment(name)
    try:
        text = store.read_text(name, STATE_FILE)
    except OSError as e:
        raise SweepError(f"sweep '{name}': cannot read {exp}: {str(e).splitlines()[0]}") from None
    if text is None:
        raise SweepError(f"sweep '{name}': no saved state under {exp} (was it started with `sweep run`?)")
    state = json.loads(text)
    work = _work_dir(store, name, state.get("work_dir"))
    try:
        store.download(name, work)
    except OSError as e:
        raise SweepError(
            f"sweep '{name}': cannot download its state from {exp}: {str(e).splitlines()[0]}"
        ) from None
    sweep = load_sweep(str(work / SWEEP_FILE))
    sweep.spec.storage = store.root
    state["work_dir"] = str(work)
    return sweep, state


def _upload(store: SweepStore, sweep: Sweep, work: Path, **kw) -> None:
    """Upload the sweep's working folder to its storage URI (`SweepStore.upload`); SweepError if it fails."""
    try:
        store.upload(sweep.name, work, **kw)
    except Exception as e:  # noqa: BLE001 - permissions, network: one line
        where, why = store.experiment(sweep.name), str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SweepError(f"{sweep.path}: key 'storage': cannot write {where}: {why}") from None


def optuna_storage(exp_dir: Path):
    """The Optuna study lives in a journal file next to the Tune state (inspectable, survives restores); with
    URI storage in the local working folder, uploaded next to the Tune state."""
    import optuna

    exp_dir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(exp_dir / OPTUNA_FILE))
    )


def _tuner(sweep: Sweep, callback, exp_dir: Path, storage_path: str | None = None, extra_callbacks=()):
    from ray import tune

    from betadiff.sweep.search import make_scheduler, make_searcher

    spec = sweep.spec
    # loss-only reports carry no evaluation metric; the scheduler and searcher skip them
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # num_to_keep forces a state snapshot after checkpoints; expected with frequent trainer checkpoints
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    search_alg = None
    if spec.search is not None:
        search_alg = make_searcher(sweep, storage=optuna_storage(exp_dir))
        if len(sweep.seeds) > 1:
            from ray.tune.search import Repeater

            search_alg = Repeater(search_alg, repeat=len(sweep.seeds), set_index=True)
    concurrent = spec.max_concurrent or None
    if sweep.workers > 1:  # drivers hold no CPU: cap them so a waiting one does not start a TorchTrainer
        fit = max(1, _worker_slots(sweep, node_capacity())[0] // sweep.workers)
        concurrent = min(concurrent or fit, fit)
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=make_scheduler(sweep),
        num_samples=(spec.search.num_samples * len(sweep.seeds)) if spec.search else 1,
        max_concurrent_trials=concurrent,
        time_budget_s=spec.time_budget_s,
        trial_dirname_creator=_trial_dirname,
        trial_name_creator=_trial_dirname,
        reuse_actors=True,
    )  # warm workers: torch and the trainer are imported once per worker, not per trial
    run_config = tune.RunConfig(
        name=sweep.name,
        storage_path=storage_path or str(exp_dir.parent),
        callbacks=[callback, *extra_callbacks],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=0,
    )  # progress: the callback's lines
    return tune.Tuner(
        trainable_with_resources(sweep),
        param_space=param_space(sweep),
        tune_config=tune_config,
        run_config=run_config,
    )


def run_sweep(
    sweep: Sweep,
    address: str | None = None,
    resume: bool = False,
    out=print,
    parent_run_id: str | None = None,
    work_dir: str | Path | None = None,
) -> int:
    """Run (or resume) the sweep; returns 0 when every trial finished or was pruned, 1 otherwise.

    work_dir: the local working folder of a sweep in URI storage (resume: the one `load_saved` filled)."""
    from ray import tune

    from betadiff.sweep.callback import MlflowSweepCallback
    from betadiff.sweep.tracking import (
        SweepTracker,
        error_line,
        preflight,
        resolve_tracking_uri,
        sqlite_warning,
    )

    store = SweepStore(sweep.spec.storage)
    if store.remote:
        store.check(sweep.path)
        exp_dir = store.experiment(sweep.name)  # Tune's state: the URI
        work = Path(work_dir) if work_dir else store.default_work_dir(sweep.name)  # betadiff's files
    else:
        exp_dir = work = experiment_dir(sweep)
    uri = resolve_tracking_uri(sweep.spec.tracking.uri)
    preflight(uri)
    if not resume and tune.Tuner.can_restore(str(exp_dir)):
        raise SweepError(
            f"{sweep.path}: key 'name': sweep '{sweep.name}' already has state in {exp_dir}; "
            f"continue it with `betadiff sweep resume {sweep.name}` or delete that folder"
        )
    if store.remote:
        if not resume:  # files of an earlier sweep of this name whose state is gone
            shutil.rmtree(work, ignore_errors=True)
        work = _work_dir(store, sweep.name, str(work))
        WORK_DIRS[sweep.name] = work
        (work / SWEEP_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(self_contained(sweep))))
        _upload(store, sweep, work, files=(SWEEP_FILE,), folder=False, mirror=False)  # can we write there?
    connect(address)
    check_placement(sweep, node_capacity())
    concurrent = sweep.spec.max_concurrent or len(sweep.trials)
    warn = sqlite_warning(uri, concurrent)
    if warn:
        out(warn)
    tracker = SweepTracker(uri, sweep.spec.tracking.experiment, sweep.name)
    # the journal of writes the server did not take (all kinds now; the name is kept because the callback
    # pickled in the Tune state of an existing sweep points at it)
    tracker.spool = str(work / SPOOL_FILE)
    tracker.retry_s = 30.0  # a server that is away costs one bounded wait per 30 s or more, not one per write
    tracker.start_parent(sweep.sweep_hash, sweep.resolved_yaml, parent_run_id)
    state = {
        "name": sweep.name,
        "parent_run_id": tracker.parent_run_id,
        "tracking_uri": uri,
        "experiment": sweep.spec.tracking.experiment,
        "sweep_hash": sweep.sweep_hash,
        "source": sweep.path,
    }
    if store.remote:
        state.update(storage=store.root, work_dir=str(work))
    _save_state(work, sweep, state)
    if store.remote:
        _upload(store, sweep, work)
    out(f"MLflow: {uri}  experiment '{sweep.spec.tracking.experiment}'  parent run {tracker.parent_run_id}")
    out(f"Tune state: {exp_dir}" + (f"  (betadiff's files: {work}, uploaded there)" if store.remote else ""))
    sys.stdout.flush()
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable_with_resources(sweep), resume_unfinished=True, resume_errored=True
        )
    else:
        keys = tuple(m.name for m in report_metrics(sweep))
        total = sweep.spec.search.num_samples * len(sweep.seeds) if sweep.spec.search else len(sweep.trials)
        callback = MlflowSweepCallback(tracker, describe, keys, total)
        if store.remote:
            from betadiff.sweep.statesync import StateSync

            tuner = _tuner(sweep, callback, work, store.root, [StateSync(store, sweep.name, work)])
        else:
            tuner = _tuner(sweep, callback, exp_dir)
    status, results, errors, unfinished = "FAILED", [], 0, 0
    try:
        results = tuner.fit()
        errors = sum(1 for r in results if r.error is not None)
        # Ctrl-C makes Tune save its state, stop the running trials (it calls them TERMINATED: the callback knows
        # better) and return; pending trials never started. The sweep is KILLED until `sweep resume` completes it.
        cb = _sweep_callback(tuner)
        unfinished = len(results) - results.num_terminated - results.num_errors + len(cb.interrupted if cb else [])
        status = "KILLED" if unfinished else "FINISHED" if errors == 0 else "FAILED"
    finally:
        unwritten = tracker.flush_spool()
        if unwritten:
            out(
                f"MLflow: {unwritten} operation(s) (metrics, tags, run statuses, artifacts) could not be "
                f"written; they are kept in {tracker.spool} (artifact files in {tracker.artifact_dir}) and "
                f"sent by `betadiff sweep resume {sweep.name}` once the server answers"
            )
        report_md, best = summarise(sweep, uri, out)
        try:
            tracker.finish_parent(status, best, report_md)
        except Exception as e:  # noqa: BLE001 - the server is away: say so; resume closes the parent run
            out(
                f"MLflow: parent run {tracker.parent_run_id} could not be closed ({error_line(str(e))}); "
                f"`betadiff sweep resume {sweep.name}` closes it once the server answers"
            )
        if store.remote:
            try:  # the final journals; what was sent meanwhile is deleted there too
                store.upload(sweep.name, work)
            except Exception as e:  # noqa: BLE001 - the sweep's outcome stands; say where the files are
                out(f"warning: cannot upload the sweep state to {exp_dir} ({str(e).splitlines()[0]}); "
                    f"it is kept in {work}")
    out(f"sweep {sweep.name}: {status}; {len(results)} trials, {errors} failed"
        + (f", {unfinished} interrupted: continue with `betadiff sweep resume {sweep.name}`" if unfinished else ""))
    if report_md:
        out(report_md)
    out(f"MLflow: {uri}  experiment '{sweep.spec.tracking.experiment}'  parent run {tracker.parent_run_id}")
    return 0 if status == "FINISHED" else 130 if status == "KILLED" else 1


def summarise(sweep: Sweep, uri: str, out=print) -> tuple[str | None, dict[str, Any] | None]:
    """The sweep's ablation table (Markdown) and best cell, built by the report layer from MLflow.

    A table that cannot be built (e.g. no finished trial) is reported and skipped: the sweep's runs stay.
    """
    try:
        from betadiff.report import ablation

        ab = ablation(sweep.name, tracking_uri=uri, experiment=sweep.spec.tracking.experiment)
        md = ab.render("md")
        s = ab.summary
        first = report_metrics(sweep)[0].name if report_metrics(sweep) else s["metric"].iloc[0]
        top = s[(s["metric"] == first) & s["best"]]
        best = None
        if len(top):
            row = top.iloc[0]
            best = {k: row[k] for k in ab.rows}
            best.update(metric=first, mean=float(row["mean"]), n=int(row["n"]))
        return md, best
    except Exception as e:  # the table is a summary; failing to build it must not lose the sweep's status
        out(f"warning: no ablation table for sweep {sweep.name}: {str(e).splitlines()[0] if str(e) else e!r}")
        return None, None


def resume_sweep(name: str, address: str | None = None, storage: str | None = None, out=print) -> int:
    sweep, state = load_saved(name, storage)
    os.environ.setdefault("BETADIFF_TRACKING_URI", state["tracking_uri"])
    sweep.spec.tracking.uri = sweep.spec.tracking.uri or state["tracking_uri"]
    return run_sweep(
        sweep,
        address=address,
        resume=True,
        out=out,
        parent_run_id=state["parent_run_id"],
        work_dir=state.get("work_dir") if SweepStore(storage).remote else None,
    )
