"""Static checks of platform/: every manifest parses, and what can be checked without a cluster agrees.

Versions and image tags are compared with pyproject.toml and the installed (pinned) Ray; secrets must be
references; GPU worker groups must request `nvidia.com/gpu`; platform/ must stay a non-package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
K8S = PLATFORM / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
DEPS = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
IMAGE = f"ghcr.io/betadiff/betadiff:{VERSION}"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$|CREDENTIAL", re.I)


def _installed_ray() -> str:
    from importlib.metadata import version

    return version("ray")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _walk(node, path=()):
    """Yield (path, dict) for every mapping in a parsed YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _containers(doc: dict) -> list[tuple[tuple, dict]]:
    return [
        (p, c)
        for p, node in _walk(doc)
        for key in ("containers", "initContainers")
        for c in node.get(key, []) or []
        if isinstance(c, dict)
    ]


def _dockerfile_args() -> dict[str, str]:
    text = (PLATFORM / "docker" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


# ------------------------------------------------------------------------------------------ structure
def test_platform_is_never_an_importable_package():
    assert not list(PLATFORM.rglob("__init__.py"))
    py = sorted(p.relative_to(PLATFORM).as_posix() for p in PLATFORM.rglob("*.py"))
    assert py == ["local/stack.py"]  # a script run by path; `import platform` stays the stdlib module
    assert 'if __name__ == "__main__":' in (PLATFORM / "local" / "stack.py").read_text()
    import platform

    assert hasattr(platform, "system") and platform.__file__ and "site-packages" not in platform.__file__


YAMLS = sorted(PLATFORM.rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(PLATFORM).as_posix())
def test_every_manifest_parses(path):
    docs = _docs(path)
    assert docs, f"{path}: empty"
    for d in docs:
        assert isinstance(d, dict)


def test_scripts_are_executable_with_a_shebang():
    scripts = [PLATFORM / "local" / n for n in ("up", "down", "status", "stack.py")]
    scripts += [PLATFORM / "docker" / "build", PLATFORM / "cluster" / "launch", K8S / "create-secrets"]
    for s in scripts:
        assert os.access(s, os.X_OK), s
        assert s.read_text().startswith("#!/usr/bin/env "), s
        if s.suffix != ".py":
            assert subprocess.run(["bash", "-n", str(s)], capture_output=True).returncode == 0, s


# ------------------------------------------------------------------------------------------ kubernetes
def test_k8s_objects_have_required_fields_and_namespace():
    kinds = set()
    for path, d in _k8s_docs():
        if d.get("kind") == "Kustomization":
            continue
        assert d.get("apiVersion") and d.get("kind"), path
        meta = d.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), (path, d["kind"])
        if d["kind"] != "Namespace":
            assert meta.get("namespace") == "betadiff", (path, d["kind"])
        kinds.add(d["kind"])
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"} <= kinds


def test_kustomization_lists_existing_files_and_everything_but_the_per_sweep_rayjob():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(k["resources"])
    assert all((K8S / r).is_file() for r in listed)
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "rayjob.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_offline():
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert {d["kind"] for d in rendered} >= {"RayCluster", "Deployment", "StatefulSet"}
    assert all(d["metadata"].get("namespace") == "betadiff" for d in rendered if d["kind"] != "Namespace")


def test_images_and_ray_versions_agree_with_pyproject_and_the_pinned_ray():
    ray = _installed_ray()
    assert ray in DEPS["ray"].specifier
    images = {c["image"] for _, d in _k8s_docs() for _, c in _containers(d)}
    project = {i for i in images if "betadiff" in i}
    assert project == {IMAGE}
    assert images - project == {"postgres:15.10"}
    ray_versions = [n["rayVersion"] for _, d in _k8s_docs() for _, n in _walk(d) if "rayVersion" in n]
    assert len(ray_versions) == 2 and set(ray_versions) == {ray}
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == ray
    assert args["BETADIFF_VERSION"] == VERSION
    assert Version(args["TORCH_VERSION"]) in DEPS["torch"].specifier
    assert Version(args["MLFLOW_VERSION"]) in DEPS["mlflow"].specifier
    assert (PLATFORM / "docker" / "build").read_text().count("pyproject.toml") >= 1  # tag from the version


def _ray_specs() -> dict[str, dict]:
    out = {}
    for _, d in _k8s_docs():
        if d["kind"] == "RayCluster":
            out["RayCluster"] = d["spec"]
        elif d["kind"] == "RayJob":
            out["RayJob"] = d["spec"]["rayClusterSpec"]
    return out


def test_ray_clusters_have_a_cpu_head_and_gpu_worker_groups():
    specs = _ray_specs()
    assert set(specs) == {"RayCluster", "RayJob"}
    for kind, spec in specs.items():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", kind
        for _, c in _containers(head["template"]):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), kind
        gpu_groups = 0
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], kind
            for _, c in _containers(group["template"]):
                lim, req = c["resources"]["limits"], c["resources"]["requests"]
                if "nvidia.com/gpu" in lim:
                    gpu_groups += 1
                    assert lim["nvidia.com/gpu"] == req["nvidia.com/gpu"], kind  # no GPU overcommit
                    assert group["rayStartParams"]["num-gpus"] == str(lim["nvidia.com/gpu"]), kind
                    assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
        assert gpu_groups >= 1, kind


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_ray_cluster_has_token_auth_and_every_container_the_mlflow_server():
    created = _created_secrets()
    for kind, spec in _ray_specs().items():
        # KubeRay (>= 1.6) injects RAY_AUTH_MODE/RAY_AUTH_TOKEN everywhere and uses the token itself
        auth = spec["authOptions"]
        assert auth["mode"] == "token" and "auth_token" in created[auth["secretName"]], kind
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for _, c in _containers(g["template"]):
                env = _env(c)
                assert "RAY_AUTH_TOKEN" not in env, kind  # one source of truth: authOptions
                assert env["MLFLOW_TRACKING_URI"]["value"] == "http://betadiff-mlflow.betadiff.svc:5000"
                password_ref = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
                assert password_ref["name"] == "betadiff-mlflow"


def _created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, as platform/k8s/create-secrets creates them."""
    text = (K8S / "create-secrets").read_text()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^make (\S+) (.+)$", line.strip())
        if m:
            out[m.group(1)] = set(re.findall(r'"(\w[\w-]*)=', m.group(2)))
    return out


def test_no_secret_in_plain_text_and_every_secret_ref_is_created():
    created = _created_secrets()
    assert set(created) == {"betadiff-postgres", "betadiff-mlflow", "betadiff-ray-token"}
    refs = 0
    for path, d in _k8s_docs():
        assert d["kind"] != "Secret", f"{path}: Secret objects with values do not belong in the repo"
        for _, c in _containers(d):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "value" not in e, (path, e["name"])
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in created[ref["name"]], (path, ref)
                    refs += 1
            # credentials may only enter a command line through $(VAR) expansion of a secret-backed var
            for arg in c.get("args", []) + c.get("command", []):
                for _user, pw in re.findall(r"://([^:/@\s]+):([^@\s]+)@", str(arg)):
                    assert re.fullmatch(r"\$\((\w+)\)", pw), (path, arg)
                    assert "secretKeyRef" in _env(c)[pw[2:-1]]["valueFrom"]
    assert refs >= 7
    for p in list(PLATFORM.rglob("*.yaml")) + [PLATFORM / "docker" / "Dockerfile"]:
        text = p.read_text()
        assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}", text), p


def test_services_point_at_declared_container_ports():
    docs = [d for _, d in _k8s_docs()]
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        targets = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                   and d["spec"]["selector"]["matchLabels"] == sel]  # fmt: skip
        assert len(targets) == 1, svc["metadata"]["name"]
        ports = {p["containerPort"] for _, c in _containers(targets[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def test_mlflow_server_uses_postgres_proxied_artifacts_and_basic_auth():
    docs = [d for _, d in _k8s_docs()]
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "betadiff-mlflow")
    (_, c), = _containers(dep)
    args = c["args"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert "@betadiff-postgres:5432/" in args[args.index("--backend-store-uri") + 1]
    assert "--serve-artifacts" in args and args[args.index("--app-name") + 1] == "basic-auth"
    cm = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap")
    ini = cm["data"]["basic_auth.ini"]
    assert "admin_username = betadiff" in ini and "admin_password" not in ini


def test_rayjob_runs_an_existing_sweep_through_the_cli():
    job = next(d for _, d in _k8s_docs() if d["kind"] == "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:5] == ["python", "-m", "betadiff.cli", "sweep", "run"]
    assert (REPO / entry[5]).is_file()
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["BETADIFF_SWEEP_STORAGE"] == "/mnt/sweeps"


# ------------------------------------------------------------------------------------------ docker
def test_dockerfile_builds_a_cuda_runtime_image_with_the_package():
    text = (PLATFORM / "docker" / "Dockerfile").read_text()
    args = _dockerfile_args()
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert '"torch==${TORCH_VERSION}"' in text and "--index-url" not in text  # PyPI's CUDA wheel
    assert '"ray[default,tune]==${RAY_VERSION}"' in text
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in text  # the server runs with --app-name basic-auth
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+(?: \S+)*) \S+$", text, re.M):
        for s in src.split():
            assert (REPO / s).exists(), s
    assert re.search(r"^USER ray$", text, re.M)  # not root
    ignore = (PLATFORM / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1:2] == ["**"] or "**" in ignore
    for kept in ("pyproject.toml", "betadiff/**", "configs/**", "sweeps/**"):
        assert f"!{kept}" in ignore


# ------------------------------------------------------------------------------------------ launcher
def test_cluster_launcher_yaml_cpu_head_gpu_workers_and_env_placeholders():
    c = yaml.safe_load((PLATFORM / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker"):
        assert key in c
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu = [t for n, t in types.items() if n != c["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] <= c["max_workers"] for t in gpu)
    assert c["docker"]["image"] == "${BETADIFF_IMAGE}"
    opts = " ".join(c["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI}" in opts and "RAY_AUTH_MODE=token" in opts
    assert "--dashboard-host=127.0.0.1" in " ".join(c["head_start_ray_commands"])


def test_cluster_launch_refuses_missing_env_and_renders_the_values(tmp_path):
    launch = PLATFORM / "cluster" / "launch"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    r = subprocess.run([str(launch)], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "platform/cluster/launch: error: environment MLFLOW_TRACKING_URI is not set " \
                               "(see docs/platform.md)"  # fmt: skip
    env |= {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "BETADIFF_IMAGE": IMAGE}
    r = subprocess.run([str(launch)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no Ray token" in r.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)
    out = tmp_path / "rendered.yaml"
    env |= {"BETADIFF_RENDER_ONLY": "1", "BETADIFF_CLUSTER_YAML": str(out)}
    r = subprocess.run([str(launch)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c = yaml.safe_load(out.read_text())
    assert c["docker"]["image"] == IMAGE
    assert "--env MLFLOW_TRACKING_URI=http://mlflow.internal:5000" in c["docker"]["run_options"]
    assert "x" * 64 not in out.read_text()  # the token is file-mounted, never inlined


def test_k8s_builtin_objects_match_the_kubernetes_openapi_schema():
    """Every built-in object (not the KubeRay CRDs) against Kubernetes' own OpenAPI schema, strict: a misspelled
    or misplaced field fails here, as `kubectl apply` would fail on a cluster (none is reachable from CI)."""
    kv = pytest.importorskip("kubernetes_validate")
    checked = 0
    for path, d in _k8s_docs():
        if d.get("kind") in ("Kustomization", "RayCluster", "RayJob"):
            continue
        kv.validate(d, "1.32", strict=True)
        checked += 1
    assert checked >= 6
    bad = next(d for _, d in _k8s_docs() if d.get("kind") == "Deployment")
    bad = {**bad, "spec": {**bad["spec"], "replica": 1}}  # the validator does catch a misspelling
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.32", strict=True)


def test_cluster_launcher_yaml_matches_rays_own_schema():
    """platform/cluster/ray-cluster.yaml against the JSON schema the installed Ray validates launcher files with."""
    import json

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = yaml.safe_load((PLATFORM / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "max_worker": 3}, schema)  # unknown top-level key
