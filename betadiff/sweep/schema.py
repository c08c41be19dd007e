"""Sweep file schema: typed OmegaConf dataclasses, validation, and expansion into trials.

A sweep file names a base trainer config plus overrides, the factors it varies (full factorial or one at a
time from a baseline), the seeds it replicates (never searched), an optional Optuna search and scheduler,
the resources per trial, tracking and the ablation table it produces. Everything here is pure (no Ray, no
MLflow): `load_sweep` either returns a `Sweep` whose every key was checked, or raises `SweepError` with one
line "FILE: key 'PATH': problem".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from betadiff.config import ConfigError, TrainConfig, config_keys, from_dict, merge_overrides, resolve_path

DESIGNS = ("grid", "one_at_a_time")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
SCHEDULERS = ("none", "asha", "median")
REPORT_VALUES = ("last", "best", "step")
MODES = ("min", "max")


class SweepError(ValueError):
    """One line naming the sweep file, the key path and the problem."""


@dataclass
class FactorsSpec:
    design: str = "grid"  # grid: full factorial | one_at_a_time
    axes: dict[str, Any] = field(default_factory=dict)  # dotted trainer key -> list of values
    baseline: dict[str, Any] = field(default_factory=dict)  # one_at_a_time: default = first value per axis
    # named bundles of overrides: axis name -> level name -> {dotted key: value}; one axis whose levels set several
    # keys at once (e.g. method: {gaussian: {diffusion.kind: gaussian, diffusion.loss: eps_mse}})
    variants: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricSpec:
    name: str = "w1"
    mode: Optional[str] = None  # min | max; None: the trainer's METRIC_MODES


@dataclass
class ParamSpec:
    type: str = "choice"  # choice | uniform | loguniform | int
    values: Optional[list[Any]] = None  # choice
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False  # int only: log-spaced integers


@dataclass
class SearchSpec:
    sampler: str = "tpe"
    seed: int = 0
    num_samples: int = 8
    metrics: list[MetricSpec] = field(default_factory=list)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    # points tried first, before the sampler's own (counted in num_samples); a key left out takes the base config's
    # value, so `start: [{}]` runs the defaults under the same budget and scheduler as the searched points
    start: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SchedulerSpec:
    type: str = "none"  # none | asha | median (on the training step)
    metric: Optional[str] = None  # default: the first search metric
    mode: Optional[str] = None
    grace_period: int = 0  # steps before a trial may be stopped; 0: train.eval_every
    reduction_factor: float = 2.0  # ASHA only


@dataclass
class ResourcesSpec:
    cpu: float = 1.0  # per worker
    gpu: float = 0.0  # per trial; > 1: data parallel over `workers`
    workers: int = 0  # data-parallel workers; 0: max(1, gpu)
    fractional_gpu: bool = False  # fractions are scheduling labels, not memory limits


@dataclass
class TrackingSpec:
    uri: Optional[str] = None  # default: env or sqlite:///mlflow.db in the cwd
    experiment: str = "betadiff"


@dataclass
class ReportSpec:
    rows: list[str] = field(default_factory=list)  # factor keys forming the table rows
    cols: list[str] = field(default_factory=list)  # factor keys spread over columns
    metrics: list[str] = field(default_factory=list)
    value: str = "last"  # last | best | step
    step: Optional[int] = None  # value=step


@dataclass
class SweepSpec:
    name: str = "???"
    description: str = ""
    base: Any = None  # config path or inline mapping
    overrides: dict[str, Any] = field(default_factory=dict)
    factors: FactorsSpec = field(default_factory=FactorsSpec)
    seeds: Any = field(default_factory=lambda: [0])  # list of ints, or an int n: seeds 0..n-1
    search: Optional[SearchSpec] = None
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_concurrent: int = 0  # 0: as many as the cluster places
    max_failures: int = 1  # retries per trial, from its last checkpoint
    time_budget_s: Optional[float] = None
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    storage: Optional[str] = None  # Tune state; default .betadiff/sweeps (cwd)
    smoke: dict[str, Any] = field(default_factory=dict)  # overrides for `--smoke` (a tiny run of the same sweep)


@dataclass(frozen=True)
class TrialSpec:
    """One grid point: the overrides it applies on top of the base config, and its identity."""

    key: str  # stable: "diffusion.loss=elbo,seed=1"
    factors: dict[str, Any]  # varied key or variant axis -> value or level name
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)  # the config keys the factors set (variants expanded)


@dataclass
class Sweep:
    spec: SweepSpec
    path: str  # the sweep file ("<inline>" for dicts)
    base: TrainConfig  # base config with `overrides` applied
    base_source: str
    seeds: list[int]
    trials: list[TrialSpec]  # grid trials; search: one per seed template
    metrics: list[MetricSpec]  # resolved modes
    resolved_yaml: str
    sweep_hash: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def workers(self) -> int:
        r = self.spec.resources
        return r.workers or max(1, int(math.ceil(r.gpu)) if r.gpu > 1 else 1)

    def trial_config(self, factors: dict[str, Any], seed: int) -> TrainConfig:
        overrides = expand_factors(factors, self.spec.factors.variants)
        return merge_overrides(self.base, {**overrides, "train.seed": seed}, where=f"{self.path}: trial")


def expand_factors(factors: dict[str, Any], variants: dict[str, Any]) -> dict[str, Any]:
    """Factor values -> config overrides: a variant axis's level name becomes that level's {key: value} bundle."""
    out: dict[str, Any] = {}
    for k, v in factors.items():
        if k in variants:
            out.update(_plain(variants[k])[v])
        else:
            out[k] = v
    return out


def _fail(path: str, key: str, problem: str) -> None:
    raise SweepError(f"{path}: key '{key}': {problem}")


def _load_raw(path: Path) -> DictConfig:
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise SweepError(f"{path}: file not found") from None
    except Exception as e:  # yaml errors carry the line: keep it on one line
        raise SweepError(f"{path}: cannot parse YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, DictConfig):
        raise SweepError(f"{path}: top level must be a mapping")
    return raw


def _typed(raw: DictConfig | dict, path: str) -> SweepSpec:
    schema = OmegaConf.structured(SweepSpec)  # dataclass nodes reject unknown keys; dicts stay open
    raw = OmegaConf.create(raw) if isinstance(raw, dict) else raw
    try:
        merged = OmegaConf.merge(schema, raw)
        if OmegaConf.is_missing(merged, "name"):
            _fail(path, "name", "required")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        if "Key '" in msg and "not in" in msg:
            msg = f"unknown key ({msg})"
        raise SweepError(f"{path}: key '{key}': {msg}") from None


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _resolve_base(spec: SweepSpec, path: str) -> tuple[TrainConfig, str]:
    where = Path(path).parent if path != "<inline>" else None
    base = _plain(spec.base)
    try:
        if base is None:
            cfg, source = TrainConfig(), "defaults"
        elif isinstance(base, str):
            from betadiff.config import load_config

            p = resolve_path(base, where)
            cfg, source = load_config(str(p), []), str(p)
        elif isinstance(base, dict):
            cfg, source = from_dict(base, where=f"{path}: base"), "inline"
        else:
            _fail(path, "base", f"must be a config path or a mapping (got {type(base).__name__})")
    except ConfigError as e:
        raise SweepError(f"{path}: key 'base': {e}") from None
    keys = config_keys(cfg)
    overrides = {str(k): _plain(v) for k, v in spec.overrides.items()}
    for k in overrides:
        if k not in keys:
            _fail(path, f"overrides.{k}", f"not a key of the base config ({source})")
    try:
        cfg = merge_overrides(cfg, overrides, where=f"{path}: overrides")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    return cfg, source


def _seeds(spec: SweepSpec, path: str) -> list[int]:
    s = _plain(spec.seeds)
    if isinstance(s, int) and not isinstance(s, bool):
        if s < 1:
            _fail(path, "seeds", f"a seed count must be >= 1 (got {s})")
        return list(range(s))
    if not isinstance(s, list) or not s or not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
        _fail(path, "seeds", f"must be a non-empty list of integers or a count (got {s!r})")
    if len(set(s)) != len(s):
        _fail(path, "seeds", f"duplicate seeds {s}")
    return list(s)


def _check_value(base: TrainConfig, key: str, value: Any, path: str, where: str) -> None:
    try:
        merge_overrides(base, {key: value}, where="")
    except ConfigError as e:
        problem = str(e).split(": ", 1)[-1].split(": ", 1)[-1]
        _fail(path, where, f"value {value!r}: {problem}")


def _grid(spec: SweepSpec, base: TrainConfig, path: str) -> list[dict[str, Any]]:
    f = spec.factors
    if f.design not in DESIGNS:
        _fail(path, "factors.design", f"must be one of {', '.join(DESIGNS)} (got '{f.design}')")
    keys = config_keys(base)
    axes: dict[str, list[Any]] = {}
    for k, vals in f.axes.items():
        vals = _plain(vals)
        where = f"factors.axes.{k}"
        if k not in keys:
            _fail(path, where, "not a key of the base config")
        if k == "train.seed":
            _fail(path, where, "seeds are an axis of their own: use the top-level 'seeds'")
        if not isinstance(vals, list) or not vals:
            _fail(path, where, f"must be a non-empty list of values (got {vals!r})")
        for v in vals:
            _check_value(base, k, v, path, where)
        axes[k] = vals
    for name, levels in _plain(f.variants).items():
        where = f"factors.variants.{name}"
        if name in keys or "." in name:
            _fail(path, where, "a variant axis needs a name that is not a config key (and has no dots)")
        if name in axes:
            _fail(path, where, "also listed in factors.axes")
        if not isinstance(levels, dict) or not levels:
            _fail(path, where, "must map level names to {config key: value} bundles")
        for level, bundle in levels.items():
            if not isinstance(bundle, dict) or not bundle:
                _fail(path, f"{where}.{level}", "must be a non-empty mapping of config keys to values")
            for k in bundle:
                if k not in keys:
                    _fail(path, f"{where}.{level}.{k}", "not a key of the base config")
            try:
                merge_overrides(base, bundle, where="")
            except ConfigError as e:
                _fail(path, f"{where}.{level}", str(e).split(": ", 1)[-1].split(": ", 1)[-1])
        axes[name] = list(levels)
    for k in f.baseline:
        if k not in axes:
            _fail(path, f"factors.baseline.{k}", "not one of factors.axes")
    if f.baseline and f.design != "one_at_a_time":
        _fail(path, "factors.baseline", "only used with design: one_at_a_time")
    if not axes:
        return [{}]
    if f.design == "grid":
        return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    # one at a time: the baseline, then each axis moved alone through its other values
    baseline = {k: _plain(f.baseline.get(k, vals[0])) for k, vals in axes.items()}
    points = [baseline]
    for k, vals in axes.items():
        points += [{**baseline, k: v} for v in vals if v != baseline[k]]
    return points


def _metric_modes(base: TrainConfig, path: str) -> tuple[set[str], dict[str, str]]:
    from betadiff.train import METRIC_MODES, reported_metrics

    return set(reported_metrics(base)), dict(METRIC_MODES)


def _check_metric(name: str, reported: set[str], path: str, where: str) -> None:
    if name not in reported:
        _fail(
            path,
            where,
            f"metric '{name}' is never reported by the trainer for this data "
            f"(reported: {', '.join(sorted(reported))})",
        )


def _check_search(
    spec: SweepSpec, base: TrainConfig, path: str, reported: set[str], modes: dict[str, str]
) -> list[MetricSpec]:
    s = spec.search
    if s is None:
        return []
    if s.sampler not in SAMPLERS:
        _fail(path, "search.sampler", f"must be one of {', '.join(SAMPLERS)} (got '{s.sampler}')")
    if s.num_samples < 1:
        _fail(path, "search.num_samples", f"must be >= 1 (got {s.num_samples})")
    if not s.metrics:
        _fail(path, "search.metrics", "at least one metric is required")
    if not s.space:
        _fail(path, "search.space", "at least one parameter is required")
    if spec.factors.axes:
        _fail(path, "factors.axes", "a sweep either searches (search.space) or lays out factors, not both")
    keys = config_keys(base)
    for k, p in s.space.items():
        where = f"search.space.{k}"
        if k not in keys:
            _fail(path, where, "not a key of the base config")
        if k == "train.seed":
            _fail(path, where, "seeds are replicates, never searched: use the top-level 'seeds'")
        if p.type not in DISTRIBUTIONS:
            _fail(path, f"{where}.type", f"must be one of {', '.join(DISTRIBUTIONS)} (got '{p.type}')")
        if p.type == "choice":
            if not p.values:
                _fail(path, f"{where}.values", "choice needs a non-empty list of values")
            for v in p.values:
                _check_value(base, k, v, path, f"{where}.values")
            continue
        if p.low is None or p.high is None:
            _fail(path, where, f"{p.type} needs low and high")
        if not p.low < p.high:
            _fail(path, f"{where}.low", f"must be < high (got low={p.low}, high={p.high})")
        if (p.type == "loguniform" or (p.type == "int" and p.log)) and p.low <= 0:
            _fail(path, f"{where}.low", f"{p.type}{' log' if p.log else ''} needs low > 0 (got {p.low})")
        if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
            _fail(path, where, f"int bounds must be integers (got {p.low}, {p.high})")
        probe = int(p.low) if p.type == "int" else float(p.low)
        _check_value(base, k, probe, path, where)
    if len(s.start) > s.num_samples:
        _fail(path, "search.start", f"{len(s.start)} start points but num_samples is {s.num_samples}")
    for i, point in enumerate(s.start):
        for k, v in _plain(point).items():
            where = f"search.start.{i}.{k}"
            if k not in s.space:
                _fail(path, where, f"not a searched key ({', '.join(s.space)})")
            p = s.space[k]
            if p.type == "choice" and v not in p.values:
                _fail(path, where, f"{v!r} is not one of the choices {p.values}")
            if p.type != "choice" and not (isinstance(v, (int, float)) and p.low <= v <= p.high):
                _fail(path, where, f"must be a number in [{p.low}, {p.high}] (got {v!r})")
            _check_value(base, k, v, path, where)
    if s.sampler == "grid" and any(p.type != "choice" for p in s.space.values()):
        _fail(path, "search.sampler", "grid sampling needs choice parameters only")
    if s.sampler == "cmaes" and any(p.type == "choice" for p in s.space.values()):
        _fail(path, "search.sampler", "cmaes samples numeric parameters only (no choice)")
    out = []
    for i, m in enumerate(s.metrics):
        _check_metric(m.name, reported, path, f"search.metrics.{i}.name")
        mode = m.mode or modes.get(m.name)
        if mode not in MODES:
            _fail(path, f"search.metrics.{i}.mode", f"must be min or max (got {m.mode!r})")
        out.append(MetricSpec(m.name, mode))
    return out


def _check_scheduler(
    spec: SweepSpec,
    base: TrainConfig,
    path: str,
    reported: set[str],
    metrics: list[MetricSpec],
    modes: dict[str, str],
    n_seeds: int,
) -> None:
    sc = spec.scheduler
    if sc.type not in SCHEDULERS:
        _fail(path, "scheduler.type", f"must be one of {', '.join(SCHEDULERS)} (got '{sc.type}')")
    if sc.type == "none":
        return
    name = sc.metric or (metrics[0].name if metrics else None)
    if name is None:
        _fail(path, "scheduler.metric", f"{sc.type} needs a metric (or a search metric)")
    _check_metric(name, reported, path, "scheduler.metric")
    mode = sc.mode or modes.get(name)
    if mode not in MODES:
        _fail(path, "scheduler.mode", f"must be min or max (got {sc.mode!r})")
    if len(metrics) > 1:
        _fail(path, "scheduler", "early stopping needs a single search metric")
    if spec.search is not None and n_seeds > 1:
        # stopping one replicate of a searched point would bias the average the sampler learns from
        _fail(path, "seeds", "a searched sweep with a scheduler takes one seed")
    if sc.grace_period < 0 or sc.reduction_factor <= 1:
        _fail(path, "scheduler", "grace_period >= 0 and reduction_factor > 1 required")
    if base.train.eval_every <= 0:
        _fail(path, "scheduler", "early stopping needs intermediate evaluations: set train.eval_every > 0")


def _check_resources(spec: SweepSpec, path: str) -> None:
    r = spec.resources
    if r.cpu <= 0:
        _fail(path, "resources.cpu", f"must be > 0 (got {r.cpu})")
    if r.gpu < 0:
        _fail(path, "resources.gpu", f"must be >= 0 (got {r.gpu})")
    if r.gpu != int(r.gpu) and not r.fractional_gpu:
        _fail(
            path,
            "resources.gpu",
            f"{r.gpu} is fractional: GPUs are whole unless resources.fractional_gpu: true",
        )
    if r.gpu > 1 and r.gpu != int(r.gpu):
        _fail(path, "resources.gpu", "a data-parallel trial takes whole GPUs")
    if r.workers < 0:
        _fail(path, "resources.workers", "must be >= 0")
    if r.workers and r.gpu > 1 and r.workers != int(r.gpu):
        _fail(path, "resources.workers", f"one worker per GPU: workers must equal gpu ({int(r.gpu)})")
    if r.workers > 1 and 0 < r.gpu <= 1:
        _fail(path, "resources.workers", f"data-parallel workers take one whole GPU each: set gpu: {r.workers}")
    if spec.max_concurrent < 0:
        _fail(path, "max_concurrent", "must be >= 0")
    if spec.max_failures < 0:
        _fail(path, "max_failures", "must be >= 0")
    if spec.time_budget_s is not None and spec.time_budget_s <= 0:
        _fail(path, "time_budget_s", "must be > 0")


def _check_report(spec: SweepSpec, path: str, reported: set[str], varied: set[str]) -> None:
    rp = spec.report
    if rp.value not in REPORT_VALUES:
        _fail(path, "report.value", f"must be one of {', '.join(REPORT_VALUES)} (got '{rp.value}')")
    if rp.value == "step" and rp.step is None:
        _fail(path, "report.step", "required when report.value is 'step'")
    for i, m in enumerate(rp.metrics):
        _check_metric(m, reported, path, f"report.metrics.{i}")
    for part in ("rows", "cols"):
        for i, k in enumerate(getattr(rp, part)):
            if k not in varied:
                _fail(
                    path,
                    f"report.{part}.{i}",
                    f"'{k}' is not a varied key ({', '.join(sorted(varied)) or 'none'})",
                )


def sweep_hash(resolved_yaml: str) -> str:
    return hashlib.sha256(resolved_yaml.encode()).hexdigest()[:12]


def trial_key(factors: dict[str, Any], seed: int) -> str:
    parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(factors.items())]
    return ",".join(parts + [f"seed={seed}"])


def _same_level(level: Any, text: str) -> bool:
    """A factor level and a level typed on the command line: same text, same YAML value or same number."""
    if str(level) == text or level == yaml.safe_load(text):
        return True
    if isinstance(level, (int, float)) and not isinstance(level, bool):
        try:
            return float(text) == float(level)
        except ValueError:
            return False
    return False


def _slice(spec: SweepSpec, only: dict[str, list[str]], path: str) -> None:
    """Keep only the named levels of some factors (`--only method=beta_klub,beta_elbo`); the levels are matched by
    their YAML value or their text, so `--only diffusion.eta=1e2` finds 100.0."""
    f = spec.factors
    for key, wanted in only.items():
        table = f.axes if key in f.axes else f.variants if key in f.variants else None
        if table is None:
            factors = ", ".join([*f.axes, *f.variants]) or "none"
            _fail(path, f"--only {key}", f"not a factor of this sweep (factors: {factors})")
        levels = _plain(table[key])
        names = list(levels) if isinstance(levels, dict) else levels
        keep = []
        for w in wanted:
            hits = [n for n in names if _same_level(n, w)]
            if not hits:
                _fail(path, f"--only {key}", f"no level {w!r} (levels: {', '.join(map(str, names))})")
            keep += [n for n in hits if n not in keep]
        table[key] = {n: levels[n] for n in keep} if isinstance(levels, dict) else keep


def _apply_sets(raw: DictConfig, sets: list[str], path: str) -> None:
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            _fail(path, item, "a command-line edit must be KEY=VALUE")
        value = _plain(OmegaConf.from_dotlist([f"v={text}"]).v)  # YAML typing: 1000 → int, [1, 2] → list
        head, _, rest = key.partition(".")
        if head in ("overrides", "smoke") and rest:
            # these sections hold flat dotted keys of the trainer config ("train.steps"), not nested mappings
            if raw.get(head) is None:
                raw[head] = {}
            raw[head][rest] = value
        else:
            OmegaConf.update(raw, key, value, force_add=True)  # unknown keys then fail in _typed with their path


def load_sweep(
    source: str | Path | dict,
    name: str | None = None,
    smoke: bool = False,
    only: dict[str, list[str]] | None = None,
    seeds: list[int] | None = None,
    sets: list[str] | None = None,
) -> Sweep:
    """Read, type-check and validate a sweep (file path or mapping); expand its trials.

    sets are `key=value` edits of the sweep file itself, applied before it is typed (`max_concurrent=1`,
    `search.num_samples=12`); `overrides.train.steps=1000` sets one flat key of `overrides:`. They are recorded in
    the resolved YAML like any other key.

    only/seeds run a slice of the file: some levels of some factors, other seeds (the resolved YAML records the
    slice). smoke=True applies the file's `smoke:` overrides on top of `overrides`, keeps one seed (and at most two searched
    trials) and names the sweep `<name>_smoke`, so a tiny run of the same design never mixes with the full one.
    Raises SweepError("FILE: key 'a.b': problem") on the first problem found.
    """
    if isinstance(source, dict):
        path, raw = "<inline>", OmegaConf.create(source)
    else:
        path = str(source)
        raw = _load_raw(Path(source))
    if sets:
        _apply_sets(raw, sets, path)
    spec = _typed(raw, path)
    if name:
        spec.name = name
    if only:
        _slice(spec, only, path)
    if seeds is not None:
        spec.seeds = list(seeds)
    if smoke:
        if not spec.smoke:
            _fail(path, "smoke", "--smoke needs a 'smoke:' section of overrides in the sweep file")
        spec.overrides = {**spec.overrides, **spec.smoke}
        spec.name = f"{spec.name}_smoke"
        seeds0 = _plain(spec.seeds)
        spec.seeds = [seeds0[0]] if isinstance(seeds0, list) and seeds0 else 1  # one replicate
        if spec.search is not None:
            spec.search.num_samples = min(spec.search.num_samples, 2)
    if not spec.name or any(c in spec.name for c in "/\\ '\""):
        _fail(path, "name", f"must be a non-empty name without slashes, quotes or spaces (got {spec.name!r})")
    base, source_name = _resolve_base(spec, path)
    for k in spec.smoke:
        if k not in config_keys(base):
            _fail(path, f"smoke.{k}", "not a key of the base config")
    seeds = _seeds(spec, path)
    reported, modes = _metric_modes(base, path)
    metrics = _check_search(spec, base, path, reported, modes)
    points = _grid(spec, base, path)
    _check_scheduler(spec, base, path, reported, metrics, modes, len(seeds))
    _check_resources(spec, path)
    varied = (set(spec.factors.axes) | set(spec.factors.variants)
              | (set(spec.search.space) if spec.search else set()))
    _check_report(spec, path, reported, varied)
    trials = []
    for point in points:
        overrides = expand_factors(point, _plain(spec.factors.variants))
        for seed in seeds:
            try:
                merge_overrides(base, {**overrides, "train.seed": seed}, where="")
            except ConfigError as e:
                _fail(
                    path,
                    "factors",
                    f"trial {trial_key(point, seed)} is not a valid config: {str(e).split(': ', 1)[-1]}",
                )
            trials.append(TrialSpec(trial_key(point, seed), point, seed, overrides))
    resolved = OmegaConf.to_yaml(OmegaConf.structured(spec))
    return Sweep(
        spec=spec,
        path=path,
        base=base,
        base_source=source_name,
        seeds=seeds,
        trials=trials,
        metrics=metrics,
        resolved_yaml=resolved,
        sweep_hash=sweep_hash(resolved),
    )


def report_metrics(sweep: Sweep) -> list[MetricSpec]:
    """The metrics the sweep's table and best-config use: search metrics, else report metrics."""
    if sweep.metrics:
        return sweep.metrics
    from betadiff.train import METRIC_MODES

    return [MetricSpec(m, METRIC_MODES.get(m, "min")) for m in sweep.spec.report.metrics]
