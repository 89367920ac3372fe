"""schemathesis hooks for the fuzz test: what the schema cannot say, the test supplies.

The API documents image bodies (``image/*``, ``application/octet-stream``, multipart files) and
base64 (``format: byte``) images, but only decodable images are valid there, and a JSON schema
cannot describe "a decodable image" (schemathesis has real samples for some image types only).
This hook puts one of the repository's test images where a case meant to be accepted (positive
mode) carries bytes that are no image; cases meant to be refused are left as generated.
Loaded through ``SCHEMATHESIS_HOOKS=tests.service.schemathesis_hooks``.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import schemathesis
from PIL import Image

IMAGES = [p.read_bytes() for p in sorted((Path(__file__).parents[1] / "fixtures" / "images").glob("*.jpg"))[:3]]


def _decodable(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:
        return False
    return True


def _image_for(data: Any) -> Any:
    if isinstance(data, bytes | bytearray) and not _decodable(bytes(data)):
        return IMAGES[len(data) % len(IMAGES)]
    return data


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_negative:
        return case  # a case meant to be refused stays as generated
    body = case.body
    media_type = case.media_type or ""
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        case.body = _image_for(body)
    elif media_type.startswith("multipart/") and isinstance(body, dict):
        case.body = {key: _image_for(value) for key, value in body.items()}
    elif case.operation.path.endswith("/infer") and isinstance(body, dict) and isinstance(body.get("inputs"), list):
        for tensor in body["inputs"]:
            data = tensor.get("data") if isinstance(tensor, dict) else None
            if isinstance(data, list):
                tensor["data"] = [base64.b64encode(IMAGES[i % len(IMAGES)]).decode() if isinstance(item, str) else item
                                  for i, item in enumerate(data)]
    return case
