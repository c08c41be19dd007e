"""Sweep-file search and scheduler sections → Optuna distributions/samplers and Tune schedulers.

Registries map the names allowed in a sweep file to constructors; the YAML never names a class.
`PrunedOptunaSearch` fixes Ray's OptunaSearch for multi-fidelity sweeps: intermediate values are reported at
the training step, and a trial that the scheduler stopped before its budget is told to Optuna as PRUNED
(Ray tells COMPLETE with the truncated value, which misleads the sampler).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search.optuna import OptunaSearch

from betadiff.sweep.schema import ParamSpec, SchedulerSpec, SearchSpec, Sweep


def to_distribution(p: ParamSpec) -> optuna.distributions.BaseDistribution:
    """One `search.space` entry as an Optuna distribution (validated by schema.load_sweep)."""
    if p.type == "choice":
        return optuna.distributions.CategoricalDistribution(list(p.values))
    if p.type == "uniform":
        return optuna.distributions.FloatDistribution(float(p.low), float(p.high))
    if p.type == "loguniform":
        return optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=True)
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
    raise ValueError(f"unknown distribution type {p.type!r}")


def _grid_sampler(s: SearchSpec) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GridSampler({k: list(p.values) for k, p in s.space.items()}, seed=s.seed)


SAMPLER_FACTORIES = {
    "tpe": lambda s: optuna.samplers.TPESampler(seed=s.seed),  # Optuna 5: multivariate, constant_liar
    "random": lambda s: optuna.samplers.RandomSampler(seed=s.seed),
    "grid": _grid_sampler,
    "cmaes": lambda s: optuna.samplers.CmaEsSampler(seed=s.seed),
    "qmc": lambda s: optuna.samplers.QMCSampler(seed=s.seed),
}


class PrunedOptunaSearch(OptunaSearch):
    """OptunaSearch that reports at the training step and tells scheduler-stopped trials as PRUNED."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last: dict[str, dict[str, Any]] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        seen = {m: result[m] for m in metrics if m in result}
        if not seen:
            return  # a loss-only report: nothing for the sampler
        last = self._last.setdefault(trial_id, {})
        last.update(seen)
        last["step"], last["budget"] = result.get("step", 0), result.get("budget", 0)
        step = int(result.get("step", 0))
        reported = last.setdefault("reported", set())
        if (
            not isinstance(self.metric, list)
            and trial_id in self._ot_trials
            and not result.get("final")
            and step not in reported
        ):
            self._ot_trials[trial_id].report(float(seen[self.metric]), step)
            reported.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        from optuna.trial import TrialState

        ot_trial = self._ot_trials[trial_id]
        if result and not error:
            # the result that made the scheduler stop the trial never reached on_trial_result
            self.on_trial_result(trial_id, result)
        last = dict(self._last.get(trial_id, {}))
        if result:
            last.update({k: result[k] for k in ("step", "budget", "final") if k in result})
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [last.get(m) for m in metrics]
        if error:
            state, value = TrialState.FAIL, None
        elif not last.get("final") and int(last.get("step", 0)) < int(last.get("budget", 0)):
            state, value = TrialState.PRUNED, None  # stopped by the scheduler before its budget
        elif any(v is None for v in values):
            state, value = TrialState.PRUNED, None
        else:
            state, value = TrialState.COMPLETE, values if isinstance(self.metric, list) else values[0]
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as e:  # e.g. a NaN value: record the trial as failed rather than crash the sweep
            self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
            import logging

            logging.getLogger(__name__).warning("optuna tell failed for %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)


def make_searcher(sweep: Sweep, storage=None) -> PrunedOptunaSearch:
    s = sweep.spec.search
    space = {k: to_distribution(p) for k, p in s.space.items()}
    metrics = [m.name for m in sweep.metrics]
    modes = [m.mode for m in sweep.metrics]
    start = [{k: point.get(k, attrgetter(k)(sweep.base)) for k in s.space} for point in s.start]
    return PrunedOptunaSearch(
        space=space,
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=SAMPLER_FACTORIES[s.sampler](s),
        study_name=sweep.name,
        storage=storage,
        seed=s.seed,
        points_to_evaluate=start or None,
    )


def make_scheduler(sweep: Sweep):
    """The trial scheduler on the training step (`step` in every report); FIFO when none."""
    sc: SchedulerSpec = sweep.spec.scheduler
    if sc.type == "none":
        return FIFOScheduler()
    from betadiff.train import METRIC_MODES

    metric = sc.metric or sweep.metrics[0].name
    mode = sc.mode or (sweep.metrics[0].mode if sweep.metrics and not sc.metric else METRIC_MODES.get(metric))
    grace = sc.grace_period or sweep.base.train.eval_every
    if sc.type == "asha":
        return ASHAScheduler(
            time_attr="step",
            metric=metric,
            mode=mode,
            max_t=sweep.base.train.steps,
            grace_period=grace,
            reduction_factor=sc.reduction_factor,
            stop_last_trials=False,
        )  # a trial at its budget finishes (final artifacts)
    return MedianStoppingRule(
        time_attr="step", metric=metric, mode=mode, grace_period=grace, min_samples_required=2
    )
