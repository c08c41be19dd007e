"""`betadiff sweep {run,submit,status,logs,stop,resume,list}` — argv excludes the word "sweep".

Exit codes: 0 success, 1 the sweep ran but some trial failed (or the job did), 130 interrupted (Ctrl-C: the
parent and the unfinished trial runs end KILLED; `sweep resume` continues them), 2 bad input or an
unreachable service (one line on stderr, before any trial runs).
"""

from __future__ import annotations

import argparse
import os
import sys


def _slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", default=[], metavar="FACTOR=L1,L2",
                   help="run only these levels of a factor (repeatable); give the slice its own --name")
    p.add_argument("--seeds", default=None, metavar="S1,S2", help="run these seeds instead of the file's")
    p.add_argument("sets", nargs="*", metavar="KEY=VALUE",
                   help="edit the sweep file: max_concurrent=1, overrides.train.steps=1000 (recorded in the run)")


def _slice(args) -> dict:
    only: dict[str, list[str]] = {}
    for item in args.only:
        key, sep, levels = item.partition("=")
        if not sep or not key or not levels:
            raise SystemExit(f"betadiff sweep: --only wants FACTOR=LEVEL[,LEVEL...] (got {item!r})")
        only.setdefault(key, []).extend(v for v in levels.split(",") if v)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"betadiff sweep: --seeds wants integers like 0,1,2 (got {args.seeds!r})") from None
    return {"only": only or None, "seeds": seeds, "sets": list(args.sets) or None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="betadiff sweep", description="Ray Tune sweeps tracked in MLflow.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="validate and run a sweep file (local Ray by default)")
    r.add_argument("file", nargs="?", help="sweep YAML")
    r.add_argument("--address", default=None, help="Ray cluster (ray://HOST:10001, HOST:PORT, auto)")
    r.add_argument("--dry-run", action="store_true", help="print trials, cost and placement; run nothing")
    r.add_argument("--no-measure", action="store_true", help="dry run without the measured step time")
    r.add_argument("--name", default=None, help="override the sweep name")
    r.add_argument("--smoke", action="store_true", help="apply the file's smoke: overrides (sweep NAME_smoke)")
    _slice_args(r)
    r.add_argument("--from-env", action="store_true", help=argparse.SUPPRESS)  # Ray Job entrypoint
    s = sub.add_parser("submit", help="send a sweep to a cluster as a Ray Job")
    s.add_argument("file")
    s.add_argument("--address", required=True, help="dashboard URL, e.g. http://HEAD:8265")
    s.add_argument("--name", default=None)
    s.add_argument("--smoke", action="store_true", help="apply the file's smoke: overrides (sweep NAME_smoke)")
    _slice_args(s)
    for name, helptext in [("status", "job status"), ("logs", "job driver logs"), ("stop", "stop a job")]:
        c = sub.add_parser(name, help=helptext)
        c.add_argument("job")
        c.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    rs = sub.add_parser("resume", help="continue a sweep after its driver or job died")
    rs.add_argument("name")
    rs.add_argument("--address", default=None, help="Ray address, or a dashboard URL to resume as a job")
    rs.add_argument("--storage", default=None, help="the sweep's storage: a folder or a URI (s3://bucket/prefix)")
    ls = sub.add_parser("list", help="saved sweeps here (and jobs on --address)")
    ls.add_argument("--address", default=None)
    ls.add_argument("--storage", default=None, help="a folder or a URI (s3://bucket/prefix)")
    return p


def _load(args):
    from betadiff.sweep.schema import load_sweep

    if getattr(args, "from_env", False):
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.create(os.environ["BETADIFF_SWEEP_YAML"]))
        return load_sweep(raw, name=args.name)
    if not args.file:
        raise SystemExit("betadiff sweep run: a sweep file is required")
    return load_sweep(args.file, name=getattr(args, "name", None), smoke=getattr(args, "smoke", False), **_slice(args))


def _main(args) -> int:
    if args.cmd == "run":
        from betadiff.sweep import runner

        sweep = _load(args)
        if args.dry_run:
            return runner.dry_run(sweep, args.address, measure=not args.no_measure)
        return runner.run_sweep(sweep, address=args.address)
    if args.cmd == "submit":
        from betadiff.sweep import jobs

        sweep = _load(args)
        job_id = jobs.submit_sweep(sweep, args.address)
        print(f"submitted sweep {sweep.name} as job {job_id}")
        print(f"  betadiff sweep status {job_id} --address {args.address}")
        print(f"  betadiff sweep logs {job_id} --address {args.address}")
        return 0
    if args.cmd in ("status", "logs", "stop"):
        from betadiff.sweep import jobs

        if args.cmd == "status":
            st = jobs.status(args.address, args.job)
            print(f"{st['job_id']}  {st['status']}  sweep={st['sweep']}  {st['message']}".rstrip())
        elif args.cmd == "logs":
            sys.stdout.write(jobs.logs(args.address, args.job))
        else:
            print(f"{args.job}: {'stop requested' if jobs.stop(args.address, args.job) else 'not running'}")
        return 0
    if args.cmd == "resume":
        if args.address and args.address.startswith(("http://", "https://")):
            from betadiff.sweep import jobs

            job_id = jobs.submit_resume(args.name, args.address, storage=args.storage)
            print(f"resuming sweep {args.name} as job {job_id}")
            return 0
        from betadiff.sweep import runner

        return runner.resume_sweep(args.name, address=args.address, storage=args.storage)
    if args.cmd == "list":
        from betadiff.sweep.schema import SweepError
        from betadiff.sweep.storage import SweepStore

        store = SweepStore(args.storage)
        err = store.problem()  # a storage URI that cannot be used: one line, exit 2
        if err:
            raise SweepError(f"--storage {err}")
        try:
            states = store.states()
        except OSError as e:
            raise SweepError(f"--storage {store.root}: {str(e).splitlines()[0]}") from None
        for st in states:
            print(f"{st['name']}  parent run {st['parent_run_id']}  {st['tracking_uri']}")
        if args.address:
            from betadiff.sweep import jobs

            for j in jobs.list_jobs(args.address):
                print(f"job {j['job_id']}  {j['status']}  sweep={j['sweep']}")
        return 0
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE edits may follow options (`run F --seeds 0 max_concurrent=1`), which plain parse_args refuses
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "sets") and all("=" in a and not a.startswith("-") for a in extra):
            args.sets = [*args.sets, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from betadiff.config import ConfigError
    from betadiff.sweep.jobs import JobError
    from betadiff.sweep.runner import ClusterError
    from betadiff.sweep.schema import SweepError
    from betadiff.sweep.tracking import TrackingError

    try:
        return _main(args)
    except (SweepError, ConfigError, TrackingError, ClusterError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
