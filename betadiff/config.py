"""Typed trainer configuration: dataclass schema, YAML, `key=value` overrides, validation.

The schema is the single source of defaults. `load_config` merges, in order: the schema defaults, a YAML file
(optionally `base:`-chained), and dotlist overrides; struct mode makes unknown keys fail. `validate` then checks
the cross-field constraints of the spec (§1: 0 ≤ shift, shift + scale < 1; η > 0; c1 < c0; ω ∈ [0, 1]) so bad
input is rejected with one line before any work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

BETA_LOSSES = ("klub", "elbo", "klub_cond", "klub_marg", "elbo_cond", "elbo_marg", "l2", "l1")
GAUSSIAN_LOSSES = ("eps_mse", "gauss_klub")
DATASETS = ("toy1", "toy2", "mixture2d", "file", "fashion_mnist", "digits", "cifar10")


# Direction of every metric the trainer can report (used by sweeps, reports and the dashboard).
METRIC_MODES: dict[str, str] = {
    "loss": "min", "lr": "min", "step_time_ms": "min",
    "w1": "min", "jsd": "min", "hellinger": "min", "out_of_range": "min",
    "floor_w1": "min", "floor_jsd": "min", "floor_hellinger": "min",
    "ot": "min",
    "fd": "min", "cls_score": "max", "pix_jsd": "min", "boundary_err": "min",
    "boundary_lo": "min", "boundary_hi": "min", "boundary_lo_true": "min", "boundary_hi_true": "min",
}
_EVAL_KEYS = {
    "toy1d": {"w1", "jsd", "hellinger", "out_of_range", "floor_w1", "floor_jsd", "floor_hellinger"},
    "toy2d": {"ot", "out_of_range"},
    "image": {"fd", "cls_score", "pix_jsd", "boundary_err", "boundary_lo", "boundary_hi", "boundary_lo_true",
              "boundary_hi_true", "out_of_range"},
}
_DATA_KIND = {"toy1": "toy1d", "toy2": "toy1d", "mixture2d": "toy2d", "fashion_mnist": "image", "digits": "image",
              "cifar10": "image"}


def reported_metrics(cfg: "TrainConfig") -> set[str]:
    """Every metric name `train(cfg)` can pass to its report callback."""
    kind = _DATA_KIND.get(cfg.data.name)
    evals = _EVAL_KEYS[kind] if kind else _EVAL_KEYS["toy1d"] | _EVAL_KEYS["toy2d"]
    return {"loss", "lr", "step_time_ms"} | evals


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the file or key and the problem."""


@dataclass
class DataConfig:
    name: str = "toy1"                  # one of DATASETS
    path: Optional[str] = None          # file (name=file) or directory (image sets)
    low: Optional[float] = None         # declared raw range of a user file, mapped to [0, 1]
    high: Optional[float] = None
    image_size: Optional[int] = None
    subset: Optional[int] = None        # use only the first N training items (0/None: all)
    scale: Optional[float] = None       # x0 = scale * x + shift; None: the dataset's default (spec §1)
    shift: Optional[float] = None


@dataclass
class DiffusionConfig:
    kind: str = "beta"                  # beta | gaussian
    loss: str = "klub"                  # BETA_LOSSES or GAUSSIAN_LOSSES
    eta: float = 10000.0                # concentration η (spec §1)
    omega: float = 0.5                  # KLUB weight ω: 0.5 toy, 0.99 images (spec §5)
    schedule: str = "beta_linear"       # beta_linear (toy) | sigmoid (images), spec §4
    beta_min: float = 0.1
    beta_d: float = 19.9
    c0: float = 10.0
    c1: float = -13.0
    p: float = 1.0
    s_ratio: float = 0.95               # s = s_ratio * t (spec §4)
    t_min: float = 1e-5


@dataclass
class ModelConfig:
    arch: str = "mlp"                   # mlp | unet
    width: int = 256                    # MLP hidden width
    depth: int = 2                      # MLP hidden layers
    emb_dim: int = 20                   # sinusoidal embedding size
    channels: int = 32                  # U-Net base channels
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=lambda: [7])
    dropout: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: str = "none"                 # none | cosine | linear (to 0 at train.steps)
    grad_clip: float = 0.0              # 0: off (the authors only apply nan_to_num)


@dataclass
class TrainSection:
    steps: int = 50000
    batch_size: int = 1000
    seed: int = 0
    ema_halflife: float = 0.0           # in samples (images seen); 0: no EMA
    log_every: int = 100
    eval_every: int = 5000              # 0: only at the end
    ckpt_every: int = 5000              # 0: only at the end
    device: str = "cpu"                 # cpu | cuda | cuda:N | auto
    threads: int = 0                    # torch threads; 0: leave torch's default
    amp: str = "none"                   # none | bf16 (autocast) | auto (bf16 where the hardware has it natively)
    progress: bool = True


@dataclass
class EvalConfig:
    n_samples: int = 100000
    steps: int = 200                    # sampling steps (NFE)
    grid: str = "auto"                  # auto | uniform_t | geometric_alpha
    batch_size: int = 100000
    use_ema: bool = True


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(cfg, True)
    return cfg


def resolve_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A config path as given, relative to `relative_to`, or a bare name in the shipped `configs/`."""
    p = Path(path)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to / p)
    candidates += [CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{path}: config file not found (looked in ., {relative_to or '.'}, {CONFIG_DIR})")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a YAML config; a top-level `base: other.yaml` is merged underneath it."""
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers: keep them
        raise ConfigError(f"{path}: cannot parse YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return OmegaConf.merge(_read_yaml(resolve_path(base, path.parent), seen + (path,)), raw)


def _merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: key '{key}': {msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Schema defaults <- YAML at `path` <- dotlist `overrides` ("train.steps=100"); validated."""
    cfg = _schema()
    where = "defaults"
    if path is not None:
        p = resolve_path(path)
        where = str(p)
        cfg = _merge(cfg, _read_yaml(p), where)
    if overrides:
        where = f"{where} (with overrides)"
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"{where}: override '{o}': expected key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([o]), f"{where}: override '{o}'")
    out = OmegaConf.to_object(cfg)
    validate(out, where)
    return out


def merge_overrides(cfg: TrainConfig, overrides: dict[str, Any], where: str = "overrides") -> TrainConfig:
    """`cfg` with dotted-key `overrides` applied (unknown keys and wrong types raise ConfigError).

    One OmegaConf merge for all keys (a sweep driver and every trial call this; a merge per key cost ~10 ms each)."""
    keys = config_keys()
    patch: dict[str, Any] = {}
    for k, v in overrides.items():
        if k not in keys:
            raise ConfigError(f"{where}: key '{k}': not a trainer config key")
        node = patch
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    c = OmegaConf.structured(cfg)
    OmegaConf.set_struct(c, True)
    out = OmegaConf.to_object(_merge(c, patch, where) if patch else c)
    validate(out, where)
    return out


def from_dict(d: dict[str, Any], where: str = "config") -> TrainConfig:
    """A nested mapping (e.g. a saved `config.yaml` or an inline sweep base) as a validated TrainConfig."""
    out = OmegaConf.to_object(_merge(_schema(), OmegaConf.create(d), where))
    validate(out, where)
    return out


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Nested plain dict of a config (dataclasses hold no interpolations, so no OmegaConf round trip)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: TrainConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys → values (lists kept as lists)."""
    d = cfg if isinstance(cfg, dict) else to_dict(cfg)
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_keys(cfg: TrainConfig | None = None) -> set[str]:
    """The dotted leaf keys of the schema (the same for every config)."""
    return set(_schema_keys())


@functools.cache
def _schema_keys() -> frozenset[str]:
    return frozenset(flatten(TrainConfig()))


def config_hash(cfg: TrainConfig) -> str:
    """Stable short hash of the resolved config (same config ⇒ same hash across processes)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _check(ok: bool, where: str, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: key '{key}': {problem}")


def effective_scale_shift(cfg: TrainConfig, default_scale: float, default_shift: float) -> tuple[float, float]:
    scale = cfg.data.scale if cfg.data.scale is not None else default_scale
    shift = cfg.data.shift if cfg.data.shift is not None else default_shift
    return scale, shift


def validate(cfg: TrainConfig, where: str = "config") -> None:
    """Cross-field checks of the spec; raises ConfigError naming the key and the problem."""
    d, f, m, o, t, e = cfg.data, cfg.diffusion, cfg.model, cfg.optim, cfg.train, cfg.eval
    _check(d.name in DATASETS, where, "data.name", f"unknown dataset '{d.name}' (choose from {', '.join(DATASETS)})")
    if d.name == "file":
        _check(bool(d.path), where, "data.path", "required when data.name=file")
        _check(d.low is not None and d.high is not None, where, "data.low/data.high",
               "a file's declared raw range is required when data.name=file")
    if d.low is not None and d.high is not None:
        _check(d.low < d.high, where, "data.low", f"must be < data.high (got {d.low} >= {d.high})")
    if d.shift is not None:
        _check(d.shift >= 0, where, "data.shift", f"must be >= 0 (got {d.shift})")
    if d.scale is not None:
        _check(d.scale > 0, where, "data.scale", f"must be > 0 (got {d.scale})")
    if f.kind == "beta" and (d.scale is not None or d.shift is not None):
        s = d.scale if d.scale is not None else 1.0
        h = d.shift if d.shift is not None else 0.0
        # spec §1: shift + scale < 1 keeps η(1 − α x0) > 0 as α → 1
        _check(s + h < 1, where, "data.scale",
               f"scale + shift must be < 1 (got {s} + {h} = {s + h}); leave both unset for the dataset's default")
    _check(f.kind in ("beta", "gaussian"), where, "diffusion.kind", f"must be beta or gaussian (got '{f.kind}')")
    losses = BETA_LOSSES if f.kind == "beta" else GAUSSIAN_LOSSES
    _check(f.loss in losses, where, "diffusion.loss",
           f"'{f.loss}' is not a {f.kind} loss (choose from {', '.join(losses)})")
    _check(f.eta > 0, where, "diffusion.eta", f"must be > 0 (got {f.eta})")
    _check(0.0 <= f.omega <= 1.0, where, "diffusion.omega", f"must be in [0, 1] (got {f.omega})")
    _check(f.schedule in ("beta_linear", "sigmoid"), where, "diffusion.schedule",
           f"must be beta_linear or sigmoid (got '{f.schedule}')")
    _check(f.c1 < f.c0, where, "diffusion.c1", f"must be < diffusion.c0 (got c1={f.c1}, c0={f.c0})")
    _check(0 < f.s_ratio < 1, where, "diffusion.s_ratio", f"must be in (0, 1) (got {f.s_ratio})")
    _check(0 < f.t_min < 1, where, "diffusion.t_min", f"must be in (0, 1) (got {f.t_min})")
    _check(f.beta_min >= 0 and f.beta_d > 0, where, "diffusion.beta_d", "beta_min >= 0 and beta_d > 0 required")
    _check(m.arch in ("mlp", "unet"), where, "model.arch", f"must be mlp or unet (got '{m.arch}')")
    _check(m.width > 0 and m.depth > 0 and m.channels > 0, where, "model", "sizes must be positive")
    _check(o.lr > 0, where, "optim.lr", f"must be > 0 (got {o.lr})")
    _check(o.decay in ("none", "cosine", "linear"), where, "optim.decay", f"must be none|cosine|linear (got '{o.decay}')")
    _check(o.warmup_steps >= 0, where, "optim.warmup_steps", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), where, "optim.betas", "two values in [0, 1)")
    _check(t.steps > 0, where, "train.steps", f"must be > 0 (got {t.steps})")
    _check(t.batch_size > 0, where, "train.batch_size", f"must be > 0 (got {t.batch_size})")
    _check(t.log_every > 0, where, "train.log_every", "must be > 0")
    _check(t.eval_every >= 0 and t.ckpt_every >= 0, where, "train.eval_every", "must be >= 0")
    _check(t.amp in ("none", "bf16", "auto"), where, "train.amp", f"must be none, bf16 or auto (got '{t.amp}')")
    _check(t.ema_halflife >= 0, where, "train.ema_halflife", "must be >= 0")
    _check(e.n_samples > 0 and e.steps > 1 and e.batch_size > 0, where, "eval", "n_samples, steps>1, batch_size")
    _check(e.grid in ("auto", "uniform_t", "geometric_alpha"), where, "eval.grid",
           f"must be auto|uniform_t|geometric_alpha (got '{e.grid}')")
