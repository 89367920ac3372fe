"""The manifests agree with the app and the image: probe paths are routes, ports line up, every GNWS_* variable is
read by gnws, the ConfigMaps are valid settings, and the pods keep the image's security posture.

The app is built with ``create_app`` and asked over ASGI without its lifespan, so no model is loaded: that is
also the state a pod is in while its models load, when /healthz must answer 200 and /readyz 503.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from models.store import is_zoo_name
from service.app import create_app
from service.settings import Settings
from tests.deploy.manifests import (
    KSERVE,
    MANIFEST_SETS,
    RENDERED,
    REPO,
    config_env,
    env_names,
    find,
    one,
    pod_template,
    workloads,
)

WORKLOADS = list(workloads())
WORKLOAD_IDS = [f"{name}:{doc['kind']}" for name, _, doc in WORKLOADS]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
# GNWS_* variables that are not Settings fields, each with the file that reads it (checked below).
CONTAINER_ONLY = {
    "GNWS_HOME": "models/store.py",
    "GNWS_MODEL_STORE": "models/store.py",  # also Settings.model_store
    "GNWS_OFFLINE": "docker/prepare_models.py",
    "GNWS_ZOO_MIRROR": "models/fetch.py",
    "GNWS_SKIP_PREPARE": "docker/entrypoint.sh",
}
# Variables of other software that the manifests set on purpose.
OTHER_ENV = {
    "PROTOCOL",  # KServe: protocol of a custom predictor container
    "NVIDIA_VISIBLE_DEVICES",  # NVIDIA container runtime: no GPU for the GPU overlay's init container
}
STARTUP_BUDGET_S = 15 * 60


def load_prepare_models() -> ModuleType:
    """docker/prepare_models.py, the init containers' command, loaded from its file."""
    spec = importlib.util.spec_from_file_location("gnws_prepare_models", REPO / "docker" / "prepare_models.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_status(paths: list[str]) -> dict[str, int]:
    """``path -> status`` of GET requests to a freshly created app whose models are not loaded."""
    app = create_app(Settings())

    async def get_all() -> dict[str, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gnws") as client:
            return {path: (await client.get(path)).status_code for path in paths}

    return asyncio.run(get_all())


def init_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_template(doc)[1].get("initContainers", []))


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers and containers."""
    return init_containers(doc) + pod_template(doc)[1]["containers"]


def serving_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_template(doc)[1]["containers"]
    return container


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_probes_are_app_routes_on_the_served_port(name: str, docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    container = serving_container(doc)
    settings_port = int(config_env(docs, container)["GNWS_PORT"])
    (port,) = container["ports"]
    assert port["containerPort"] == settings_port
    found = probes(container)
    assert {kind: p["httpGet"]["path"] for kind, p in found.items()} == {
        "startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for kind, probe in found.items():
        assert resolve_port(container, probe["httpGet"]["port"]) == settings_port, kind
        assert probe.get("scheme", "HTTP") == "HTTP"
    startup = found["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_BUDGET_S
    # Every probe path is a route, and a pod whose models are still loading is alive but not ready.
    statuses = probe_status(sorted({p["httpGet"]["path"] for p in found.values()}))
    assert statuses == {"/healthz": 200, "/readyz": 503}
    annotations = doc["spec"]["template"]["metadata"].get("annotations", {}) if doc["kind"] == "Deployment" else {}
    if "prometheus.io/path" in annotations:
        assert int(annotations["prometheus.io/port"]) == settings_port
        assert probe_status([annotations["prometheus.io/path"]]) == {"/metrics": 200}


def test_unknown_paths_are_404_so_the_route_check_can_fail() -> None:
    assert probe_status(["/healthzz", "/v2/health/nothing"]) == {"/healthzz": 404, "/v2/health/nothing": 404}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_service_pdb_and_hpa_point_at_the_deployment(name: str) -> None:
    docs = RENDERED[name]
    deployment = one(docs, "Deployment")
    labels, _ = pod_template(deployment)
    container = serving_container(deployment)
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert resolve_port(container, port["targetPort"]) == int(config_env(docs, container)["GNWS_PORT"])
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert low >= 1, f"minReplicas {low}: at least one pod must serve"
    assert high >= low, f"maxReplicas {high} below minReplicas {low}"


def test_kserve_port_and_protocol() -> None:
    """KServe reaches a custom container on its first declared port (8080 when none is declared) and reads
    its protocol from PROTOCOL; Knative mode also requires the port name to be "", "http1" or "h2c"."""
    isvc = one(KSERVE, "InferenceService")
    container = serving_container(isvc)
    assert container["name"] == "kserve-container"
    assert container["ports"][0]["name"] in ("", "http1", "h2c")
    assert container["ports"][0]["containerPort"] == int(config_env(KSERVE, container)["GNWS_PORT"])
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    assert isvc["spec"]["predictor"]["scaleMetric"] == "cpu"


def test_container_only_variables_are_read_where_documented() -> None:
    for name, path in CONTAINER_ONLY.items():
        assert name in (REPO / path).read_text(), f"{name} is no longer read by {path}"


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_env_names_are_read_by_gnws(name: str, docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    fields = {f"GNWS_{field.upper()}" for field in Settings.model_fields}
    for container in containers(doc):
        names = env_names(docs, container)
        gnws = {n for n in names if n.startswith("GNWS_")}
        unknown = gnws - fields - set(CONTAINER_ONLY)
        assert not unknown, f"{container['name']} sets variables gnws does not read: {sorted(unknown)}"
        assert names - gnws <= OTHER_ENV, container["name"]


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_config_is_valid_settings(name: str, docs: list[dict[str, Any]], doc: dict[str, Any],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """What the serving container's environment amounts to, parsed by gnws's own Settings."""
    for key in [k for k in os.environ if k.startswith("GNWS_")]:
        monkeypatch.delenv(key)
    container = serving_container(doc)
    env = config_env(docs, container)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert settings.api_key is None  # only from the Secret, never from a ConfigMap
    assert str(settings.model_store) == f"{env['GNWS_HOME']}/models"
    gpu = "nvidia.com/gpu" in container["resources"]["limits"]
    assert settings.device == ("cuda" if gpu else "cpu")
    # The init container prepares exactly the models the server will load, and can fetch them: zoo keys
    # (or names already in a pre-filled store, offline).
    assert load_prepare_models().configured_models() == settings.model_sources()
    for source in settings.model_sources():
        assert is_zoo_name(source) or env.get("GNWS_OFFLINE") == "1", source
    assert int(env["GNWS_TORCH_THREADS"]) <= int(container["resources"]["requests"]["cpu"])


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_api_key_comes_only_from_an_optional_secret(name: str, docs: list[dict[str, Any]],
                                                     doc: dict[str, Any]) -> None:
    for container in containers(doc):
        for var in container.get("env", []):
            if var["name"] == "GNWS_API_KEY":
                assert "value" not in var
                assert var["valueFrom"]["secretKeyRef"]["optional"] is True
        for source in container.get("envFrom", []):
            assert "secretRef" not in source
    for config_map in find(docs, "ConfigMap"):
        assert "GNWS_API_KEY" not in config_map["data"]


def dockerfile_facts(path: Path) -> tuple[str, str, bool]:
    """``(GNWS_HOME, last USER, whether docker/prepare_models.py is copied into /opt/gnws/)``."""
    text = path.read_text()
    (home,) = re.findall(r"GNWS_HOME=(\S+)", text)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    copies = re.search(r"^COPY [^\n]*docker/prepare_models\.py[^\n]* /opt/gnws/$", text, re.MULTILINE)
    return home, users[-1], copies is not None


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_pods_match_the_image(name: str, docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    """Image tag per overlay, the uid/gid of the image's USER, GNWS_HOME as the weights mount, the init script."""
    _, spec = pod_template(doc)
    flavour = "cuda" if name.startswith("gpu") else "cpu"
    home, user, copies_script = dockerfile_facts(DOCKERFILES[flavour])
    uid, gid = (int(x) for x in user.split(":"))
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (uid, gid)
    assert spec["securityContext"]["fsGroup"] == gid
    for container in containers(doc):
        assert container["image"] == f"gnws:{flavour}", container["name"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["weights"] == home == config_env(docs, container)["GNWS_HOME"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["python", "/opt/gnws/prepare_models.py"]
    assert copies_script
    assert serving_container(doc)["args"] == ["gnws", "serve"]
    assert {"name": "GNWS_SKIP_PREPARE", "value": "1"} in serving_container(doc)["env"]


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_security_context(name: str, docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    """docker-compose.yml's hardening (uid 10001, cap_drop ALL, no-new-privileges), plus a read-only root."""
    _, spec = pod_template(doc)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["enableServiceLinks"] is False, "service links would inject GNWS_*_PORT=tcp://... variables"
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in containers(doc):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert "privileged" not in context
        assert "runAsUser" not in context  # the pod's uid applies
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert set(mounts.values()) <= set(volumes), "a mount names no volume"


@pytest.mark.parametrize(("name", "docs", "doc"), WORKLOADS, ids=WORKLOAD_IDS)
def test_resources(name: str, docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    for container in containers(doc):
        resources = container["resources"]
        for key in ("cpu", "memory"):
            assert key in resources["requests"], (container["name"], key)
            assert key in resources["limits"], (container["name"], key)
    limits = serving_container(doc)["resources"]["limits"]
    requests = serving_container(doc)["resources"]["requests"]
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
        (init,) = init_containers(doc)
        assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in init["env"]
    else:
        assert "nvidia.com/gpu" not in limits
    for container in init_containers(doc):
        assert "nvidia.com/gpu" not in container["resources"]["limits"], "init containers need no GPU"


@pytest.mark.parametrize("name", sorted(MANIFEST_SETS))
def test_model_store_volume(name: str) -> None:
    """An emptyDir filled by the init container, or (offline) a pre-filled read-only claim and GNWS_OFFLINE=1."""
    docs = MANIFEST_SETS[name]
    (doc,) = [d for d in docs if d["kind"] in ("Deployment", "InferenceService")]
    _, spec = pod_template(doc)
    weights = next(v for v in spec["volumes"] if v["name"] == "weights")
    offline = config_env(docs, serving_container(doc))["GNWS_OFFLINE"]
    if name.endswith("-offline"):
        assert offline == "1"
        claim = weights["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        pvc = one(docs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim["claimName"]
        assert set(weights) == {"name", "persistentVolumeClaim"}
    else:
        assert offline == "0"
        assert set(weights) == {"name", "emptyDir"}
    for source in (s for c in containers(doc) for s in c.get("envFrom", [])):
        assert source["configMapRef"]["name"] in {c["metadata"]["name"] for c in find(docs, "ConfigMap")}
