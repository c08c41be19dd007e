"""`betadiff` console script.

    betadiff train CONFIG [key=value ...] [--run-dir DIR] [--no-resume] [--dry-run]
    betadiff sample CHECKPOINT -n N -o FILE [--steps K] [--seed S] [--no-ema]
    betadiff sweep ... | report ... | runs ... | dashboard ... | ui ...   (platform layers, imported lazily)

Bad input (config, data) prints one line `betadiff: error: ...` and exits 2 before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STACK_ENV = Path(".betadiff") / "stack.env"


def load_stack_env(path: Path = STACK_ENV) -> None:
    """Read KEY=VALUE lines written by `platform/local/up`; variables already set win.

    With an exposed stack, `BETADIFF_STACK_SECRETS` names a 0600 file of MLflow credentials, read the same way.
    """
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            os.environ.setdefault(k.strip(), v.strip())
    secrets = os.environ.get("BETADIFF_STACK_SECRETS")
    if secrets and Path(secrets).is_file() and Path(secrets) != path:
        load_stack_env(Path(secrets))


def _fail(msg: str, code: int = 2) -> int:
    print(f"betadiff: error: {msg}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config, to_yaml
    from .data import DataError, make_dataset
    try:
        cfg = load_config(args.config, args.overrides)
        make_dataset(cfg.data)  # read and check the data before any work starts
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from .train import NonFiniteLossError, train
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.out_dir) / cfg.name
    try:
        final = train(cfg, run_dir=run_dir, resume=not args.no_resume)
    except NonFiniteLossError as e:
        return _fail(str(e), 3)
    print(json.dumps({"run_dir": str(run_dir), **final}, sort_keys=True))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .train import generate, load_model
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        return _fail(f"{args.checkpoint}: checkpoint not found")
    model = load_model(path, device=args.device, use_ema=not args.no_ema)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, model.denoiser, args.n, g, steps=args.steps)
    raw = out["raw"].cpu()
    dest = Path(args.output)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".png":
        from .plots import plot_samples
        plot_samples(model.dataset, raw, dest)
    else:
        np.save(dest, raw.numpy())
    lo, hi = float(raw.min()), float(raw.max())
    print(json.dumps({"output": str(dest), "n": args.n, "min": lo, "max": hi,
                      "out_of_range": float(((raw < 0) | (raw > 1)).float().mean())}))
    return 0


def _lazy(module: str, with_name: bool):
    def run(argv: list[str], name: str) -> int:
        import importlib
        mod = importlib.import_module(module)
        return int(mod.main([name, *argv] if with_name else argv) or 0)
    return run


LAZY = {
    "sweep": _lazy("betadiff.sweep.cli", with_name=False),
    "report": _lazy("betadiff.report.cli", with_name=True),
    "runs": _lazy("betadiff.report.cli", with_name=True),
    "dashboard": _lazy("betadiff.report.cli", with_name=True),
    "ui": _lazy("betadiff.report.cli", with_name=True),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    load_stack_env()
    if argv and argv[0] in LAZY:
        return LAZY[argv[0]](argv[1:], argv[0])
    p = argparse.ArgumentParser(prog="betadiff", description="Beta diffusion: train, sample, sweep, report.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{train,sample,sweep,report,runs,dashboard,ui}")
    t = sub.add_parser("train", help="train one model from a config")
    t.add_argument("config", help="config YAML (path, or a name in configs/, e.g. toy1_beta)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=1000")
    t.add_argument("--run-dir", help="run folder (default OUT_DIR/NAME)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the run folder")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(fn=cmd_train)
    s = sub.add_parser("sample", help="draw samples from a checkpoint")
    s.add_argument("checkpoint", help="checkpoint.pt or a run folder")
    s.add_argument("-n", type=int, default=1000)
    s.add_argument("-o", "--output", required=True, help=".npy (raw samples in [0,1]) or .png (figure)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's eval.steps)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-ema", action="store_true")
    s.set_defaults(fn=cmd_sample)
    for name, helptext in [("sweep", "run, submit, resume sweeps (see `betadiff sweep -h`)"),
                           ("report", "ablation tables from MLflow"), ("runs", "compare runs"),
                           ("dashboard", "web dashboard"), ("ui", "MLflow UI on the same store")]:
        sub.add_parser(name, help=helptext)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
