"""Schema validation of every manifest in deploy/, offline.

Plain Kubernetes objects (the rendered overlays and the KServe file's ConfigMap) are validated with
kubernetes-validate, which bundles the Kubernetes OpenAPI schemas, in strict mode (an unknown field fails, as
``kubectl apply``'s strict field validation refuses it), against the oldest Kubernetes release these
manifests target and the newest one the package knows. The InferenceService is validated against KServe's own
CRD schema, stored in deploy/kserve/schema/ (no network in CI), made strict the same way. Each validator is
also shown to reject broken copies, so a pass means something.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.manifests import KSERVE, KSERVE_SCHEMA_FILE, MANIFEST_SETS, RENDERED, broken, kserve_validator, one

# 1.30: the oldest release the manifests target (autoscaling/v2 and policy/v1 are older); 1.37: the newest
# schema set that kubernetes-validate 1.37 bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
PLAIN = [(f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc)
         for name, docs in MANIFEST_SETS.items() for doc in docs if doc["kind"] != "InferenceService"]
# Fields of the predictor that are KServe's, not the Kubernetes PodSpec's (ComponentExtensionSpec).
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}


@pytest.fixture(scope="module")
def isvc_validator() -> jsonschema.Draft7Validator:
    return kserve_validator()


def test_every_rendering_has_the_api_objects() -> None:
    for name, docs in RENDERED.items():
        kinds = sorted(d["kind"] for d in docs)
        expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
        if name.endswith("-offline"):
            expected = sorted([*expected, "PersistentVolumeClaim"])
        assert kinds == expected, name
    assert sorted(d["kind"] for d in KSERVE) == ["ConfigMap", "InferenceService"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), PLAIN, ids=[name for name, _ in PLAIN])
def test_plain_manifests_are_valid_kubernetes(name: str, doc: dict[str, Any], version: str) -> None:
    # SchemaNotFoundError (a kind or apiVersion the release does not have) fails the test too.
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(("path", "value", "strict_only"), [
    ("spec.template.spec.containers.0.imagePullPolicyy", "Always", True),  # unknown field, deep
    ("spec.template.spec.securityContext.fsGroupp", 10001, True),
    ("spec.replicass", 2, True),
    ("spec.template.spec.containers.0.ports.0.containerPort", "8000", False),  # wrong type
    ("spec.template.spec.containers.0.startupProbe.failureThreshold", "90", False),
    ("spec.template.spec.containers.0.env", {"GNWS_PORT": "8000"}, False),  # a map where a list belongs
])
def test_kubernetes_validation_rejects_broken_copies(path: str, value: Any, strict_only: bool) -> None:
    deployment = one(RENDERED["cpu"], "Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    bad = broken(deployment, path, value)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)
    if strict_only:  # without strict mode an unknown field passes: the reason strict mode is used
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=False)


def test_inferenceservice_matches_the_kserve_crd_schema(isvc_validator: jsonschema.Draft7Validator) -> None:
    isvc = one(KSERVE, "InferenceService")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in isvc_validator.iter_errors(isvc)]
    assert not errors, errors


@pytest.mark.parametrize(("path", "value"), [
    # protocolVersion exists on predictor.model and the framework specs, not next to `containers`.
    ("spec.predictor.protocolVersion", "v2"),
    ("spec.predictor.containers.0.imagePullPolicyy", "Always"),
    ("spec.predictor.containers.0.ports.0.containerPort", "8000"),
    ("spec.predictor.minReplicas", "2"),
    ("spec.predictor.scaleMetric", "gpu"),
    ("spec.predictor.containers", {"name": "kserve-container"}),
])
def test_crd_validation_rejects_broken_copies(isvc_validator: jsonschema.Draft7Validator, path: str,
                                              value: Any) -> None:
    bad = broken(one(KSERVE, "InferenceService"), path, value)
    assert list(isvc_validator.iter_errors(bad)), f"{path}={value!r} passed the InferenceService schema"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_inferenceservice_metadata_and_pod_fields_are_valid_kubernetes(version: str) -> None:
    """The CRD schema does not describe metadata, and its PodSpec comes from KServe's Kubernetes version:
    check both against the Kubernetes releases targeted here."""
    isvc = one(KSERVE, "InferenceService")
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]},
                                 version, strict=True)
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    assert set(predictor) - set(pod_spec) <= KSERVE_PREDICTOR_FIELDS
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": pod_spec}
    kubernetes_validate.validate(pod, version, strict=True)


def test_stored_kserve_schema_names_its_source() -> None:
    schema = json.loads(KSERVE_SCHEMA_FILE.read_text())
    source = schema["$comment"]
    assert "github.com/kserve/kserve" in source
    assert "config/crd/full/serving.kserve.io_inferenceservices.yaml" in source
    assert re.search(r"release v\d+\.\d+\.\d+ \(commit [0-9a-f]{40}\)", source), source
    assert schema["properties"]["apiVersion"] == {"type": "string"}
    assert "predictor" in schema["properties"]["spec"]["properties"]
    assert "predictor" in schema["properties"]["spec"]["required"]
