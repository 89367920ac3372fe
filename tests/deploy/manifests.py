"""The deployment manifests as the tests see them: rendered overlays, the KServe file, and lookups into them.

``deploy/render.py`` is not part of an installed package; it is loaded from its file, as ``python
deploy/render.py`` runs it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KSERVE_FILE = DEPLOY / "kserve" / "inferenceservice.yaml"
KSERVE_SCHEMA_FILE = DEPLOY / "kserve" / "schema" / "inferenceservice-v1beta1.json"

Manifest = dict[str, Any]


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gnws_deploy_render", DEPLOY / "render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_render()


def load_all(path: Path) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


RENDERED: dict[str, list[Manifest]] = {
    stem: load_all(render.RENDERED / f"{stem}.yaml") for stem in render.OVERLAYS
}
KSERVE: list[Manifest] = load_all(KSERVE_FILE)
# Every manifest set that is applied as one unit: its objects refer to each other (ConfigMaps, Secrets).
MANIFEST_SETS: dict[str, list[Manifest]] = {**RENDERED, "kserve": KSERVE}


def find(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Manifest], kind: str) -> Manifest:
    (doc,) = find(docs, kind)
    return doc


def pod_template(doc: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(pod labels, pod spec)`` of a Deployment, or of an InferenceService's predictor (labels are KServe's)."""
    if doc["kind"] == "Deployment":
        template = doc["spec"]["template"]
        return template["metadata"].get("labels", {}), template["spec"]
    if doc["kind"] == "InferenceService":
        return {}, doc["spec"]["predictor"]
    raise ValueError(f"no pod template in a {doc['kind']}")


def workloads() -> Iterator[tuple[str, list[Manifest], Manifest]]:
    """``(set name, its documents, workload)`` for every Deployment and InferenceService."""
    for name, docs in MANIFEST_SETS.items():
        for doc in docs:
            if doc["kind"] in ("Deployment", "InferenceService"):
                yield name, docs, doc


def config_env(docs: list[Manifest], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets from its ConfigMaps (envFrom) and plain ``env`` values, in that order."""
    env: dict[str, str] = {}
    config_maps = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(config_maps[name].get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def env_names(docs: list[Manifest], container: dict[str, Any]) -> set[str]:
    """Every variable name the container gets: from ConfigMaps, values and secret references."""
    return set(config_env(docs, container)) | {var["name"] for var in container.get("env", [])}


def strict_crd_schema(schema: Any) -> Any:
    """A copy of a CRD's OpenAPI v3 schema in which unknown fields fail, as ``kubectl apply`` (strict field
    validation) refuses them: ``additionalProperties: false`` on every object schema that lists its
    properties, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict_crd_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_crd_schema(v) if k not in ("properties", "patternProperties") else
           {name: strict_crd_schema(sub) for name, sub in v.items()} for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def kserve_validator() -> jsonschema.Draft7Validator:
    """A validator of the stored InferenceService schema in strict mode. CRD schemas are OpenAPI v3.0 schema
    objects; the keywords they use (type, properties, items, required, enum, anyOf, pattern, min/max...) mean
    the same in JSON Schema draft 7."""
    schema = json.loads(KSERVE_SCHEMA_FILE.read_text())
    strict = strict_crd_schema({k: v for k, v in schema.items() if k != "$comment"})
    jsonschema.Draft7Validator.check_schema(strict)
    return jsonschema.Draft7Validator(strict)


def broken(doc: Manifest, path: str, value: Any) -> Manifest:
    """A deep copy of ``doc`` with ``value`` set at ``path`` (``a.b.0.c``; a missing last key is added)."""
    copy_ = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = copy_
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return copy_
