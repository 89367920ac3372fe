"""Limits applied before any route runs: the body size of routes that take no image.

Image routes (``/v1/detect``, ``/v1/segment``, ``/v2/models/{name}/infer``) read their bodies
under the upload limits (:mod:`service.uploads`). Every other route takes at most a small JSON
body, so :class:`BodyLimitMiddleware` answers 413 to a larger declared ``Content-Length`` before
the route (or its authentication) runs; routes that do read a body (model reloads) read it under
the same limit. A client without the API key cannot make the server hold a large body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

IMAGE_PATHS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^(/v1)?/(detect|segment)/?$"),
    re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$"),
)


def is_image_path(path: str, patterns: Sequence[re.Pattern[str]] = IMAGE_PATHS) -> bool:
    return any(p.match(path) for p in patterns)


class BodyLimitMiddleware:
    """413 for a declared body over ``max_bytes`` on every route that takes no image."""

    def __init__(self, app: ASGIApp, max_bytes: int, image_paths: Sequence[re.Pattern[str]] = IMAGE_PATHS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.image_paths = image_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_image_path(scope.get("path", ""), self.image_paths):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > self.max_bytes:
            path = scope.get("path", "")
            message = f"the request body is larger than this route's {self.max_bytes}-byte limit"
            body = json.dumps({"error" if path == "/v2" or path.startswith("/v2/") else "detail": message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 413, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
