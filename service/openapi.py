"""The OpenAPI schema with the served models' real constraints.

FastAPI's schema says what the routes accept in general; which model names and classes a request
may name depends on the models this server loaded. Once they are ready, :func:`install` fills
them in: ``model`` and ``{name}`` list the served names (``/v1/segment``: Mask R-CNN models only),
and ``classes`` lists their class names and COCO category ids. The server also accepts class
names in any case and comma-separated lists (``classes=person,car``); the schema lists the
canonical spellings. Before the models are ready the general schema is served, uncached.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .registry import ModelRegistry, ServedModel


def install(app: FastAPI, registry: ModelRegistry) -> None:
    """Replace ``app.openapi`` with one that documents the served models once they are loaded."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if registry.ready:
            document_models(schema, registry.models())
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_null(parameter: dict[str, Any]) -> None:
    """``Optional[int]`` is ``anyOf: [integer, null]`` in FastAPI's schema; a query or path value is
    never JSON null (an absent parameter is how a client leaves it out), so keep the other branch."""
    schema = parameter.get("schema", {})
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if "anyOf" in schema and len(branches) == 1:
        parameter["schema"] = {**{k: v for k, v in schema.items() if k != "anyOf"}, **branches[0]}


def _tokens(models: Iterable[ServedModel]) -> list[str]:
    seen: dict[str, None] = {}
    for served in models:
        seen.update(dict.fromkeys(served.predictor.classes))
        seen.update(dict.fromkeys(str(cid) for cid in served.predictor.category_ids))
    return list(seen)


def document_models(schema: dict[str, Any], models: list[ServedModel]) -> None:
    """Fill in model names and class names/ids (see the module docstring)."""
    masks = [m for m in models if m.predictor.has_masks]
    for path, operations in schema.get("paths", {}).items():
        served = masks if path.endswith("/segment") else models
        constraints: dict[str, dict[str, Any]] = {
            "model": {"type": "string", "enum": [m.name for m in served]},
            "name": {"type": "string", "enum": [m.name for m in models]},
            # one value or several (classes=person or classes=person&classes=car): a query string cannot tell
            # a one-item array from a string, so the schema says either
            "classes": {"anyOf": [{"type": "array", "items": {"type": "string", "enum": _tokens(served)}},
                                  {"type": "string", "enum": _tokens(served)}]},
        }
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                _drop_null(parameter)
                constraint = constraints.get(parameter.get("name"))
                if constraint is not None:
                    kept = {k: v for k, v in parameter.get("schema", {}).items() if k in ("title", "description")}
                    parameter["schema"] = constraint | kept
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            classes = body.get("properties", {}).get("parameters", {}).get("properties", {}).get("classes")
            if classes is not None:
                classes["enum"] = _tokens(models)
