"""Send a sweep to a Ray cluster as a Ray Job (Job Submission API) and look after it.

The job's driver runs `python -m betadiff.sweep.cli run` on the head node with the sweep inlined in its
environment (the base config resolved here, so the cluster needs no access to local config paths). The
working directory is uploaded without `.git`, virtual environments, run outputs and large files; its size is
measured with Ray's own ignore rules first, so a too-large upload fails here with a clear message instead of
in Ray's 100 MiB gRPC limit. Tracking URI and sweep storage are passed as absolute paths; a storage URI
(s3://, gs://, ...) is passed as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

UPLOAD_LIMIT = 100 * 1024**2  # Ray's GCS package limit (max gRPC message size)
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".betadiff",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "ray_results",
    "bench/out",
    "*.pt",
    "*.ckpt",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "node_modules",
]


class JobError(RuntimeError):
    """A job cannot be submitted or found (one line)."""


def working_dir_size(root: str | Path, excludes: list[str] = EXCLUDES) -> tuple[int, list[tuple[int, str]]]:
    """Bytes Ray would upload from `root` (its exclude and .gitignore/.rayignore rules), largest files."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).absolute()
    files: list[tuple[int, str]] = []

    def handler(p: Path) -> None:
        if p.is_file():
            files.append((p.stat().st_size, str(p.relative_to(root))))

    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore=True)
    files.sort(reverse=True)
    return sum(s for s, _ in files), files[:5]


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    from betadiff.sweep.runner import check_address

    if not address.startswith(("http://", "https://")):
        raise JobError(f"job address {address}: expected the dashboard URL, e.g. http://HEAD:8265")
    check_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise JobError(f"job address {address}: {str(e).splitlines()[0]}") from None


def _submit(address: str, entrypoint: str, env: dict[str, str], name: str, root: str | Path) -> str:
    size, largest = working_dir_size(root)
    if size >= UPLOAD_LIMIT:
        top = ", ".join(f"{p} ({s / 2**20:.1f} MiB)" for s, p in largest)
        raise JobError(
            f"working dir {root}: {size / 2**20:.1f} MiB to upload, over Ray's 100 MiB limit; "
            f"largest: {top}; add them to .rayignore or move them out"
        )
    client = _client(address)
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env}
    return client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, metadata={"betadiff.sweep": name}
    )


def _driver_env(tracking_uri: str, storage: Path | str) -> dict[str, str]:
    env = {
        "BETADIFF_TRACKING_URI": tracking_uri,
        "BETADIFF_SWEEP_STORAGE": str(storage),
        # the job's working dir is a fresh unpacked copy: keep torch's MKL from the venv, not from there
        "PYTHONNOUSERSITE": "1",
    }
    return env


def project_root() -> Path:
    """The folder uploaded as the job's working dir: the checkout holding this package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def submit_sweep(sweep, address: str, root: str | Path | None = None) -> str:
    from betadiff.sweep.runner import self_contained, storage_root
    from betadiff.sweep.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(sweep.spec.tracking.uri)
    env = _driver_env(uri, storage_root(sweep.spec.storage))
    env["BETADIFF_SWEEP_YAML"] = OmegaConf.to_yaml(OmegaConf.create(self_contained(sweep)))
    return _submit(
        address,
        "python -m betadiff.sweep.cli run --from-env --address auto",
        env,
        sweep.name,
        root or project_root(),
    )


def submit_resume(name: str, address: str, storage: str | None = None, root: str | Path | None = None) -> str:
    from betadiff.sweep.runner import load_saved, storage_root

    _, state = load_saved(name, storage)
    env = _driver_env(state["tracking_uri"], storage_root(storage))
    return _submit(
        address,
        f"python -m betadiff.sweep.cli resume {name} --address auto",
        env,
        name,
        root or project_root(),
    )


def status(address: str, job_id: str) -> dict[str, Any]:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as e:
        raise JobError(f"job {job_id}: {str(e).splitlines()[0]}") from None
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "sweep": (info.metadata or {}).get("betadiff.sweep", ""),
    }


def logs(address: str, job_id: str) -> str:
    client = _client(address)
    try:
        return client.get_job_logs(job_id)
    except Exception as e:
        raise JobError(f"job {job_id}: {str(e).splitlines()[0]}") from None


def stop(address: str, job_id: str) -> bool:
    client = _client(address)
    try:
        return client.stop_job(job_id)
    except Exception as e:
        raise JobError(f"job {job_id}: {str(e).splitlines()[0]}") from None


def list_jobs(address: str) -> list[dict[str, Any]]:
    client = _client(address)
    return [
        {
            "job_id": j.submission_id,
            "status": str(j.status.value if hasattr(j.status, "value") else j.status),
            "sweep": (j.metadata or {}).get("betadiff.sweep", ""),
        }
        for j in client.list_jobs()
    ]
