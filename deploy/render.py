"""Render the kustomize overlays of ``deploy/kubernetes`` into plain manifests, without kubectl.

``kubectl kustomize deploy/kubernetes/overlays/NAME`` and this module build the same objects from the same
``kustomization.yaml`` files; the results are committed as ``deploy/kubernetes/rendered/NAME.yaml`` so that
CI, which has no kubectl, can validate exactly what would be applied, and a test fails when a rendered file
no longer matches its sources. Run ``python deploy/render.py`` after editing ``deploy/kubernetes``
(``--check`` only reports stale files).

Only the subset of kustomize that these overlays use is implemented, following kustomize's documented
behaviour (https://kubectl.docs.kubernetes.io/references/kustomize/kustomization/):

- ``resources``: YAML files (one or more documents) and directories holding a ``kustomization.yaml``;
- ``patches``: strategic-merge patches, from a file (``path``) or inline (``patch``), applied to the
  object the patch names or to those its ``target`` selects by ``kind`` and ``name``. Maps merge
  recursively and a ``null`` value removes the field; the lists Kubernetes merges by key (containers,
  init containers, env, volumes, volume mounts, ports, image pull secrets) merge item by item, every
  other list is replaced;
- ``images``: ``name`` with ``newName``, ``newTag`` or ``digest``, applied to the images of
  ``containers`` and ``initContainers`` anywhere in an object.

Anything else (another field, a JSON 6902 patch, ``$patch`` directives, two objects of the same kind
and name) raises :class:`RenderError` rather than rendering something kustomize would not.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("gnws.deploy.render")

DEPLOY = Path(__file__).resolve().parent
KUBERNETES = DEPLOY / "kubernetes"
RENDERED = KUBERNETES / "rendered"
# rendered file stem -> kustomization directory (relative to deploy/kubernetes)
OVERLAYS: dict[str, str] = {
    "cpu": "overlays/cpu",
    "gpu": "overlays/gpu",
    "cpu-offline": "overlays/cpu-offline",
}

KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
PATCH_FIELDS = frozenset({"path", "patch", "target"})
TARGET_FIELDS = frozenset({"kind", "name"})
IMAGE_FIELDS = frozenset({"name", "newName", "newTag", "digest"})

# Lists that Kubernetes' strategic merge patch merges item by item (patchMergeKey of the core/apps types);
# every other list is replaced by the patch's. "ports" depends on the object: containerPort in containers,
# port in Services (see _merge_key).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
DIRECTIVES = ("$patch", "$setElementOrder", "$retainKeys", "$deleteFromPrimitiveList")

# kustomize's default ("legacy") output order: these kinds first, in this order, then every other kind.
KIND_ORDER = (
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap", "Secret",
    "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
)
KIND_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")

Manifest = dict[str, Any]


class RenderError(ValueError):
    """A kustomization this renderer cannot build the way kustomize would."""


def load_documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of ``path``; each must be a Kubernetes object (apiVersion, kind, name)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
            raise RenderError(f"{path}: every document must be an object with apiVersion, kind and metadata")
        if not doc["metadata"].get("name"):
            raise RenderError(f"{path}: a {doc['kind']} has no metadata.name")
    return docs


def object_id(obj: Manifest) -> tuple[str, str]:
    """``(kind, name)``: what identifies an object within one rendering (no namespaces are set here)."""
    return obj["kind"], obj["metadata"]["name"]


def build(directory: Path) -> list[Manifest]:
    """The objects the kustomization in ``directory`` produces, in kustomize's output order.

    Raises:
        RenderError: a field, patch or image entry this renderer does not implement, a patch that
            matches nothing, or two objects with the same kind and name.
    """
    objects = _accumulate(directory.resolve())
    return sorted(objects, key=_sort_key)


def _accumulate(directory: Path) -> list[Manifest]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{path}: fields {sorted(unknown)} are not implemented by deploy/render.py "
                          f"(it knows {sorted(KUSTOMIZATION_FIELDS)}); extend it or drop them")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind {kustomization['kind']!r}, expected Kustomization")

    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        source = (directory / entry).resolve()
        if source.is_dir():
            objects.extend(_accumulate(source))
        elif source.is_file():
            objects.extend(load_documents(source))
        else:
            raise RenderError(f"{path}: resource {entry!r} is neither a file nor a directory")
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        if object_id(obj) in seen:
            raise RenderError(f"{path}: two objects are {object_id(obj)}")
        seen.add(object_id(obj))

    for entry in kustomization.get("patches", []):
        _apply_patch(objects, entry, directory, path)
    for entry in kustomization.get("images", []):
        _apply_image(objects, entry, path)
    return objects


def _apply_patch(objects: list[Manifest], entry: dict[str, Any], directory: Path, where: Path) -> None:
    if not isinstance(entry, dict) or set(entry) - PATCH_FIELDS or ("path" in entry) == ("patch" in entry):
        raise RenderError(f"{where}: a patch needs exactly one of path or patch (and optionally target), got {entry}")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    if not isinstance(patch, dict):
        raise RenderError(f"{where}: {entry}: only strategic-merge patches (one object) are implemented")
    target = entry.get("target")
    if target is not None and set(target) - TARGET_FIELDS:
        raise RenderError(f"{where}: target {target}: only kind and name are implemented")
    kind = target.get("kind") if target else patch.get("kind")
    name = target.get("name") if target else patch.get("metadata", {}).get("name")
    if not kind or not name:
        raise RenderError(f"{where}: {entry}: the patch names no object (kind and metadata.name, or a target)")
    matches = [obj for obj in objects if object_id(obj) == (kind, name)]
    if not matches:
        raise RenderError(f"{where}: patch {entry} matches no object ({kind}/{name})")
    for obj in matches:
        merged = strategic_merge(obj, patch)
        obj.clear()
        obj.update(merged)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into a copy of ``base`` (the strategic-merge subset described in the module docstring)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        directives = [k for k in patch if k in DIRECTIVES]
        if directives:
            raise RenderError(f"{field or 'patch'}: {directives} directives are not implemented")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(merged.get(key), value, key)
        return merged
    if isinstance(patch, list) and isinstance(base, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return _without_nulls(patch)
        merged_list = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"{field}: every item of a patch list must have its merge key {key!r}: {item}")
            index = next((i for i, old in enumerate(merged_list) if old.get(key) == item[key]), None)
            if index is None:
                merged_list.append(_without_nulls(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item, field)
        return merged_list
    return _without_nulls(patch)


def _merge_key(field: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports":
        return "containerPort" if any("containerPort" in i for i in items) else "port"
    return MERGE_KEYS.get(field)


def _without_nulls(value: Any) -> Any:
    """A copy without ``null`` map values: a null adds nothing where the base has no such field."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _apply_image(objects: list[Manifest], entry: dict[str, Any], where: Path) -> None:
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - IMAGE_FIELDS:
        raise RenderError(f"{where}: image entry {entry}: expected name with newName, newTag or digest")
    for obj in objects:
        for container in _containers(obj):
            name, suffix = split_image(container.get("image", ""))
            if name != entry["name"]:
                continue
            if "digest" in entry:
                suffix = "@" + entry["digest"]
            elif "newTag" in entry:
                suffix = ":" + str(entry["newTag"])
            container["image"] = entry.get("newName", name) + suffix


def split_image(image: str) -> tuple[str, str]:
    """``registry/repo:tag@digest`` -> (``registry/repo``, ``:tag@digest``); the name is what ``images`` matches."""
    at = image.find("@")
    name, digest = (image[:at], image[at:]) if at >= 0 else (image, "")
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon:] + digest
    return name, digest


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every item of a ``containers`` or ``initContainers`` list, anywhere in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def _sort_key(obj: Manifest) -> tuple[int, str, str]:
    kind, name = object_id(obj)
    if kind in KIND_ORDER:
        rank = KIND_ORDER.index(kind)
    elif kind in KIND_LAST:
        rank = len(KIND_ORDER) + 1 + KIND_LAST.index(kind)
    else:
        rank = len(KIND_ORDER)
    return rank, f"{obj['apiVersion']}/{kind}", name


def render_text(stem: str) -> str:
    """The text of ``rendered/<stem>.yaml``: a header, then one YAML document per object."""
    if stem not in OVERLAYS:
        raise RenderError(f"unknown rendering {stem!r}; known: {sorted(OVERLAYS)}")
    source = OVERLAYS[stem]
    header = (f"# Rendered by deploy/render.py from deploy/kubernetes/{source}: do not edit.\n"
              f"# Regenerate with `python deploy/render.py`; `kubectl apply -k deploy/kubernetes/{source}` "
              "applies the same objects.\n")
    body = yaml.safe_dump_all(build(KUBERNETES / source), sort_keys=False, default_flow_style=False,
                              explicit_start=True, width=1000, allow_unicode=True)
    return header + body


def main(argv: list[str] | None = None) -> int:
    """Write every ``rendered/*.yaml`` (or, with ``--check``, exit 1 when one is missing or stale)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report rendered files that differ")
    args = parser.parse_args(argv)
    stale = []
    for stem in OVERLAYS:
        path = RENDERED / f"{stem}.yaml"
        text = render_text(stem)
        if path.is_file() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            logger.info("wrote %s", path.relative_to(DEPLOY.parent))
    for path in stale:
        logger.error("%s is stale: run python deploy/render.py", path.relative_to(DEPLOY.parent))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
