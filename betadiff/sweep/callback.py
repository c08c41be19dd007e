"""Driver-side Tune callback: one MLflow child run per trial, metrics in batches, stable identity.

Status mapping (docs/architecture.md): finished → FINISHED; stopped by the scheduler before its budget →
KILLED with `betadiff.pruned=true`; failed → FAILED with `betadiff.error` (a retried trial is marked FAILED
while it waits and RUNNING again when it restarts from its checkpoint).
"""

from __future__ import annotations

import os
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from betadiff.sweep.tracking import SweepTracker, error_line, is_pending
from betadiff.sweep.trainable import ARTIFACTS, HISTORY_KEY, META_KEYS

_SKIP = (
    set(AUTO_RESULT_KEYS)
    | set(META_KEYS)
    | {"done", "trial_id", "experiment_id", "experiment_tag", "should_checkpoint", "__trial_index__"}
)


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's metrics in a Tune result (numbers only, Tune's bookkeeping left out)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def was_pruned(result: dict[str, Any] | None) -> bool:
    """A trial that ended before its budget without an error was stopped by the scheduler."""
    return (
        bool(result) and not result.get("final") and int(result.get("step", 0)) < int(result.get("budget", 0))
    )


class MlflowSweepCallback(Callback):
    def __init__(self, tracker: SweepTracker, describe, eval_keys: tuple[str, ...] = (), total: int = 0):
        """`describe(trial_config) -> (run_name, tags, params)` for a trial's Tune config; `eval_keys` are
        printed in the one-line progress messages."""
        self.tracker = tracker
        self.describe = describe
        self.eval_keys = eval_keys
        self.total = total
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id (also in Tune's state)
        self.failures: dict[str, int] = {}
        self._names: dict[str, str] = {}  # Tune trial id -> run name (describe once per trial)
        self._done_before: set[str] = set()  # trials whose run finished before a driver restore
        self._live: set[str] = set()  # trials started in this driver and not yet ended
        # restarted trial -> the last step its run already has: a trial resumed from a checkpoint older than the
        # driver's last report (Tune's state snapshot lags) reports those steps again; they are logged once
        self._logged_to: dict[str, int] = {}
        self.interrupted: list[str] = []  # run ids of trials the driver's stop (Ctrl-C) cut short
        # a restored driver (this object unpickled from Tune's state, or given its snapshot) may meet trials that
        # started after the snapshot and already have a run; a fresh sweep's trials never do, so it asks nothing
        self._restored = False

    def __setstate__(self, state: dict[str, Any]) -> None:  # also fills fields a callback pickled before them lacks
        self.__dict__.update(
            {"_names": {}, "_done_before": set(), "_live": set(), "interrupted": [], "_logged_to": {}, **state}
        )
        self._restored = True

    def get_state(self) -> dict[str, Any]:
        runs = {t: self.tracker.resolved.get(r, r) for t, r in self.runs.items()}
        return {"runs": runs, "failures": dict(self.failures)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._restored = True
        self.runs.update(state.get("runs", {}))
        self.failures.update(state.get("failures", {}))

    def _run_id(self, trial) -> str:
        """The trial's run id; a pending key (`trial:<id>`) while the server has not created the run."""
        rid = self.runs.get(trial.trial_id)
        if rid is None:
            name, tags, params = self.describe(trial.config)
            self._names[trial.trial_id] = name
            rid = self.tracker.start_child(trial.trial_id, name, tags, params)
        elif is_pending(rid):
            rid = self.tracker.resolved.get(rid, rid)
        self.runs[trial.trial_id] = rid
        return rid

    def _name(self, trial) -> str:
        """The trial's run name; describe() builds a whole trainer config, so once per trial."""
        if trial.trial_id not in self._names:
            self._names[trial.trial_id] = self.describe(trial.config)[0]
        return self._names[trial.trial_id]

    def _say(self, trial, trials, what: str) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        print(f"[{done}/{self.total or len(trials)}] trial {trial.trial_id} {what}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._live.add(trial.trial_id)
        if self._restored and trial.trial_id not in self.runs:
            # a trial that started after Tune's last state snapshot has a run the restored callback does not know
            found = self.tracker.existing_child(trial.trial_id)
            if found is not None:
                self.runs[trial.trial_id] = found
        restarted = trial.trial_id in self.runs  # after a failure or a driver restore
        rid = self._run_id(trial)
        if restarted:
            if self.tracker.run_status(rid) == "FINISHED":
                # finished before the driver died, after Tune's last state snapshot: Tune runs it again from
                # its last checkpoint; its MLflow run is complete and stays as it is
                self._done_before.add(trial.trial_id)
                self._say(trial, trials, f"already finished before the restore  ({self._name(trial)})")
                return
            self.tracker.set_status(rid, "RUNNING")
            self._logged_to[trial.trial_id] = self.tracker.last_logged_step(rid)
        run = f"run {rid}" if not is_pending(rid) else "run not created yet: MLflow away"
        self._say(trial, trials, f"started  {self._name(trial)}  ({run})")

    def _finished_before(self, trial) -> bool:
        return trial.trial_id in self._done_before

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._finished_before(trial):
            return
        # loss reports the trial held back, then this one; a final report repeats the last evaluation (it
        # carries the artifacts only)
        steps = [(int(s), metric_items(m)) for s, m in result.get(HISTORY_KEY) or ()]
        if not result.get("final"):
            steps.append((int(result.get("step", 0)), metric_items(result)))
        floor = self._logged_to.get(trial.trial_id, -1)
        steps = [(s, m) for s, m in steps if s > floor]
        if steps:
            self.tracker.log_metric_steps(self._run_id(trial), steps)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._live.discard(trial.trial_id)
        if self._finished_before(trial):
            return
        rid = self._run_id(trial)
        result = trial.last_result or {}
        if trial.checkpoint is not None and result.get("final"):
            with trial.checkpoint.as_directory() as d:
                self.tracker.log_artifacts(rid, d, ARTIFACTS)
            self.tracker.set_tags(rid, {"betadiff.torch_threads": str(result.get("torch_threads")),
                                        **({"betadiff.machine": result["machine"]} if result.get("machine") else {})})
        vals = "  ".join(
            f"{k}={result[k]:.4g}" for k in self.eval_keys if isinstance(result.get(k), (int, float))
        )
        if was_pruned(result):
            self.tracker.end_child(rid, "KILLED", {"betadiff.pruned": "true"})
            self._say(trial, trials, f"pruned at step {result.get('step')}  {vals}")
        else:
            self.tracker.end_child(rid, "FINISHED")
            self._say(trial, trials, f"finished  {vals}")

    def _error(self, trial) -> str:
        err = trial.get_error()  # reads the synced copy in storage, which may lag behind
        local = getattr(trial, "error_file", None)  # written by Tune before it calls this callback
        if err is None and local and os.path.exists(local):
            with open(local) as f:
                err = f.read()
        return error_line(str(err)) if err is not None else "unknown error"

    def _failed(self, trial, trials, what: str) -> None:
        self.failures[trial.trial_id] = self.failures.get(trial.trial_id, 0) + 1
        err = self._error(trial)
        self.tracker.end_child(
            self._run_id(trial),
            "FAILED",
            {"betadiff.error": err, "betadiff.failures": str(self.failures[trial.trial_id])},
        )
        self._say(trial, trials, f"failed ({what}): {err}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial, trials, "retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._live.discard(trial.trial_id)
        self._failed(trial, trials, "no retries left")

    def on_experiment_end(self, trials, **info):
        """Trials still live here were stopped with the driver (Ctrl-C, SIGTERM): Tune calls them TERMINATED, but
        they did not finish. Their runs end KILLED, tagged interrupted; `sweep resume` sets them RUNNING again."""
        for trial in trials:
            if trial.trial_id in self._live and trial.trial_id in self.runs:
                rid = self._run_id(trial)
                self.tracker.end_child(rid, "KILLED", {"betadiff.interrupted": "true"})
                self.interrupted.append(rid)
                self._say(trial, trials, f"interrupted  {self._name(trial)}")
        self._live.clear()
