"""The trainer: builds objects from a TrainConfig, loops, evaluates, checkpoints, resumes. No formulas here.

`train(cfg, report=callback)` is the API the sweep layer wraps; the callback receives `(step, metrics)` so Ray
and MLflow can be hooked in without this module importing either.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import losses, process, sampling
from .config import METRIC_MODES, TrainConfig, effective_scale_shift, from_dict, reported_metrics, to_dict, to_yaml, validate  # noqa: F401  (re-exported)
from .data import make_dataset
from .metrics import evaluate
from .nets import make_net, num_params
from .precond import BetaPrecond, GaussianPrecond, gaussian_affine
from .provenance import git_commit

Report = Callable[[int, dict[str, float]], None]

class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; carries the step. The last checkpoint on disk stays loadable."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite loss ({value}) at step {step}; last good checkpoint kept")
        self.step, self.value = step, value

    def __reduce__(self):  # picklable across Ray process boundaries
        return type(self), (self.step, self.value)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name}: CUDA is not available on this machine")
    return dev


@dataclass
class Model:
    """What sampling needs: the denoiser and the process parameters, built once from the config."""
    cfg: TrainConfig
    dataset: Any
    denoiser: nn.Module
    scale: float
    shift: float
    schedule: Callable[[torch.Tensor], torch.Tensor]

    def to_raw(self, x0: torch.Tensor) -> torch.Tensor:
        return (x0 - self.shift) / self.scale


def _schedule(cfg: TrainConfig):
    d = cfg.diffusion
    params = dict(beta_min=d.beta_min, beta_d=d.beta_d) if d.schedule == "beta_linear" else dict(c0=d.c0, c1=d.c1, p=d.p)
    return process.make_schedule(d.schedule, **params)


def build_model(cfg: TrainConfig, dataset, device: torch.device) -> Model:
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
        torch.manual_seed(cfg.train.seed)
        net = make_net(cfg.model, tuple(dataset.shape))
    schedule = _schedule(cfg)
    mode = "image" if dataset.kind == "image" else "toy"
    if cfg.diffusion.kind == "beta":
        scale, shift = effective_scale_shift(cfg, dataset.scale, dataset.shift)
        denoiser = BetaPrecond(net, eta=cfg.diffusion.eta, scale=scale, shift=shift, schedule=schedule, mode=mode)
    else:
        scale, shift = gaussian_affine(dataset.kind)
        denoiser = GaussianPrecond(net, schedule=schedule, mode=mode)
    return Model(cfg, dataset, denoiser.to(device), scale, shift, schedule)


def objective(model: Model) -> Callable[[nn.Module, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict]]:
    """The selected loss as `fn(denoiser, x0, generator) -> (loss, parts)`; only that loss is ever computed."""
    d = model.cfg.diffusion
    if d.kind == "beta":
        return lambda den, x0, g: losses.beta_loss(den, x0, eta=d.eta, schedule=model.schedule, loss=d.loss,
                                                    omega=d.omega, s_ratio=d.s_ratio, t_min=d.t_min, generator=g)
    return lambda den, x0, g: losses.gaussian_loss(den, x0, schedule=model.schedule, loss=d.loss,
                                                   s_ratio=d.s_ratio, t_min=d.t_min, generator=g)


def generate(model: Model, denoiser: nn.Module, n: int, generator: torch.Generator, *, steps: int | None = None,
             grid: str | None = None, batch_size: int | None = None, return_trajectory: bool = False) -> dict:
    """Draw n samples; returns {"raw": (n, *shape) in data space [0, 1] (x̂0 of the last call), ...sampler outputs}."""
    cfg, ds = model.cfg, model.dataset
    steps = steps or cfg.eval.steps
    grid = grid or cfg.eval.grid
    if grid == "auto":
        grid = "geometric_alpha" if ds.kind == "image" and steps <= 350 else "uniform_t"  # spec §3, §9
    device = next(denoiser.parameters()).device
    shape = (n, *ds.shape)
    common = dict(steps=steps, generator=generator, device=device, dtype=torch.float32,
                  batch_size=batch_size or cfg.eval.batch_size, return_trajectory=return_trajectory)
    was_training = denoiser.training
    denoiser.eval()
    try:
        if cfg.diffusion.kind == "beta":
            mu = ds.pixel_mean().to(device)  # raw-space prior mean (spec §3); the sampler maps it
            out = sampling.sample_beta(denoiser, shape, eta=cfg.diffusion.eta, scale=model.scale, shift=model.shift,
                                       schedule=model.schedule, mu=mu, grid=grid, **common)
            final = out["x0_hat"]
        else:
            out = sampling.sample_gaussian(denoiser, shape, schedule=model.schedule, grid=grid, **common)
            final = out["x0"]
    finally:
        denoiser.train(was_training)
    out["raw"] = model.to_raw(final.float())
    return out


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        if o.decay == "none":
            return w
        frac = min(1.0, step / max(1, total))
        return w * (0.5 * (1 + math.cos(math.pi * frac)) if o.decay == "cosine" else 1.0 - frac)
    return f


def _ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1.0 - beta)
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint as saved by `train` (state dicts + config; no pickled code)."""
    return torch.load(path, map_location=device, weights_only=True)


def load_model(path: str | Path, device: str = "cpu", use_ema: bool = True) -> Model:
    """Rebuild the denoiser from a checkpoint (EMA weights when present and asked for)."""
    ck = load_checkpoint(path, device)
    cfg = from_dict(ck["config"], where=str(path))
    dev = resolve_device(device)
    model = build_model(cfg, make_dataset(cfg.data), dev)
    state = ck["ema"] if (use_ema and ck.get("ema") is not None) else ck["model"]
    model.denoiser.load_state_dict(state)
    return model


def _seeded(seed: int, *salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """An independent generator for (seed, salt...): evaluation never touches the training streams."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sum(s * 7919 ** (i + 1) for i, s in enumerate(salt))) % (2**63))
    return g


# --- data parallel: only when a launcher (torchrun, Ray Train, mp.spawn) initialised torch.distributed
def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless torch.distributed is initialised with more than one process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(obj: Any) -> Any:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).tolist()


def _gather_rng(g_data: torch.Generator, g_noise: torch.Generator) -> list[list[torch.Tensor]]:
    """Every rank's [data, noise] generator states (collective): a resumed run equals an uninterrupted one."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, [g_data.get_state(), g_noise.get_state().cpu()])
    return out


def train(cfg: TrainConfig, report: Report | None = None, run_dir: str | Path | None = None,
          resume: bool = True) -> dict[str, float]:
    """Train per `cfg`; returns the final metrics. See docs/architecture.md ("train.py") for the run folder.

    Data parallel when torch.distributed is initialised with world size W > 1: each rank draws its own
    `train.batch_size` (global batch W x batch_size), gradients and logged losses are averaged over ranks.
    Rank 0 alone writes run_dir, evaluates and checkpoints (with every rank's RNG states); ranks > 0 get
    `report(step, {})` at the same steps (collective reporters such as Ray Train's need every rank; a
    callback that stops training must raise on every rank) and return {}.
    """
    validate(cfg)
    t_cfg = cfg.train
    rank, world = _world()
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out_dir) / cfg.name
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    if t_cfg.threads > 0:
        torch.set_num_threads(t_cfg.threads)
    device = resolve_device(t_cfg.device)
    dataset = make_dataset(cfg.data)
    model = build_model(cfg, dataset, device)
    denoiser = model.denoiser
    ema = copy.deepcopy(denoiser).requires_grad_(False) if t_cfg.ema_halflife > 0 else None
    ema_beta = 0.5 ** (world * t_cfg.batch_size / t_cfg.ema_halflife) if ema is not None else 0.0  # per image
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                           weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    loss_fn = objective(model)
    g_data = _seeded(t_cfg.seed, 1, rank)  # rank 0 draws exactly what a single-process run draws
    g_noise = _seeded(t_cfg.seed, 2, rank, device=device)
    fwd = nn.parallel.DistributedDataParallel(denoiser) if world > 1 else denoiser  # averages gradients
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(t_cfg.amp, device))

    start, acc = 0, [0.0, 0, 0.0]  # loss sum, count, seconds in the current log window
    ck = load_checkpoint(ckpt_path, "cpu") if rank == 0 and resume and ckpt_path.exists() else None
    done = json.loads((run_dir / "final.json").read_text()) if (
        ck is not None and int(ck["step"]) >= t_cfg.steps and (run_dir / "final.json").exists()) else None
    if world > 1:
        ck, done = _from_rank0((ck, done))
    if done is not None:  # finished before: nothing to redo
        return done if rank == 0 else {}
    if ck is not None:
        denoiser.load_state_dict(ck["model"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rngs = ck.get("rng_ranks") or [[ck["rng_data"], ck["rng_noise"]]]
        if len(rngs) != world:
            raise RuntimeError(f"{ckpt_path}: written by {len(rngs)} worker(s), resumed with {world}: "
                               "an exact resume needs the same number of workers")
        g_data.set_state(rngs[rank][0].cpu())
        g_noise.set_state(rngs[rank][1].cpu())  # generator states are CPU byte tensors, also for CUDA
        start, acc = int(ck["step"]), list(ck["acc"])
    mfile = run_dir / "metrics.jsonl"
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        _truncate_metrics(mfile, start)

    commit = git_commit() if rank == 0 else "unknown"  # once per run, not a subprocess per checkpoint

    def save(step: int, rng_ranks: list | None) -> None:
        _atomic_save({"model": denoiser.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                      "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                      "rng_data": g_data.get_state(), "rng_noise": g_noise.get_state().cpu(), "acc": acc,
                      "rng_ranks": rng_ranks, "config": to_dict(cfg), "git": commit,
                      "num_params": num_params(denoiser)}, ckpt_path)

    def evaluation(step: int) -> dict[str, float]:
        net = ema if (ema is not None and cfg.eval.use_ema) else denoiser
        g = _seeded(t_cfg.seed, 3, step, device=device)
        raw = generate(model, net, cfg.eval.n_samples, g)["raw"].cpu()
        return evaluate(dataset, raw, _seeded(t_cfg.seed, 4, step))

    is_tty = sys.stderr.isatty()
    bar = None
    if t_cfg.progress and is_tty and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=t_cfg.steps, initial=start, desc=cfg.name, dynamic_ncols=True)
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(start + 1, t_cfg.steps + 1):
        ts = time.perf_counter()
        x0 = model.scale * dataset.sample(t_cfg.batch_size, g_data).to(device) + model.shift
        with autocast:
            loss, parts = loss_fn(fwd, x0, g_noise)
        value = float(loss.detach())
        if world > 1:  # the logged loss and the non-finite check are global: all ranks stop together
            value, *rest = _mean_over_ranks([value, *parts.values()], device)
            parts = dict(zip(parts, rest, strict=True))
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in denoiser.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)  # spec §6, as the authors do
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            _ema_update(ema, denoiser, ema_beta)
        acc[0] += value
        acc[1] += 1
        acc[2] += time.perf_counter() - ts
        if bar is not None:
            bar.update(1)
        metrics: dict[str, float] = {}
        log_due = step % t_cfg.log_every == 0 or step == t_cfg.steps
        eval_due = (t_cfg.eval_every and step % t_cfg.eval_every == 0) or step == t_cfg.steps
        ckpt_due = (t_cfg.ckpt_every and step % t_cfg.ckpt_every == 0) or step == t_cfg.steps
        if log_due:
            metrics.update(loss=acc[0] / acc[1], lr=sched.get_last_lr()[0], step_time_ms=1000 * acc[2] / acc[1])
            metrics.update({f"loss_{k}": float(v) for k, v in parts.items() if k != "loss"})
            acc = [0.0, 0, 0.0]
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        if eval_due and rank == 0:
            metrics.update(evaluation(step))
        if ckpt_due:
            rng_ranks = _gather_rng(g_data, g_noise) if world > 1 else None  # collective: every rank
            if rank == 0:
                save(step, rng_ranks)
                metrics["checkpoint_step"] = step
        if rank > 0:
            if report is not None and (log_due or eval_due or ckpt_due):
                report(step, {})
            continue
        if metrics:
            last.update(metrics)
            with mfile.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if report is not None:
                report(step, metrics)
    if bar is not None:
        bar.close()
    if rank > 0:
        return {}
    final = {k: v for k, v in last.items() if k != "checkpoint_step"}
    final.update(step=t_cfg.steps, train_time_s=time.perf_counter() - t0)
    _write_samples(model, ema if (ema is not None and cfg.eval.use_ema) else denoiser, run_dir, t_cfg.seed)
    (run_dir / "final.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    return final


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step so a resumed run's log equals an uninterrupted one."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def use_bf16(amp: str, device: torch.device) -> bool:
    """train.amp → autocast on? "auto" takes bf16 only where the hardware computes it natively (CUDA with bf16;
    a CPU with AVX512-BF16 or AMX): on an AVX2-only CPU bf16 is emulated and a U-Net step runs ~40× slower."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _write_samples(model: Model, net: nn.Module, run_dir: Path, seed: int) -> None:
    from .plots import plot_samples  # matplotlib only when a figure is made
    n = 64 if model.dataset.kind == "image" else min(model.cfg.eval.n_samples, 20000)
    raw = generate(model, net, n, _seeded(seed, 5, device=next(net.parameters()).device))["raw"].cpu()
    ref = model.dataset.reference(n, _seeded(seed, 6))
    plot_samples(model.dataset, raw, run_dir / "samples.png", true_raw=ref)
