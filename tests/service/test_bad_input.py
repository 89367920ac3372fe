"""Bad input gets a 4xx with a message, never a 5xx, and the server keeps answering."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service import create_app
from tests.conftest import FASTER_R50
from tests.service.conftest import (
    SAME_SHAPE,
    FakePredictor,
    LiveServer,
    image_bytes,
    metric_value,
    small_settings,
    start_server,
)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


JPEG = image_bytes(SAME_SHAPE[0])
CASES: list[tuple[str, dict, int]] = [
    ("empty body, no type", {"content": b""}, 415),
    ("empty image body", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400),
    ("text as text/plain", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415),
    ("json body", {"json": {"image": "x"}}, 415),
    ("form-urlencoded", {"data": {"file": "abc"}}, 415),
    ("text as image/png", {"content": b"not an image at all", "headers": {"Content-Type": "image/png"}}, 400),
    ("random bytes upload", {"files": {"file": ("x.jpg", os.urandom(4096), "image/jpeg")}}, 400),
    ("truncated JPEG", {"files": {"file": ("t.jpg", JPEG[: len(JPEG) // 3], "image/jpeg")}}, 400),
    ("JPEG header only", {"content": JPEG[:200], "headers": {"Content-Type": "image/jpeg"}}, 400),
    ("form without a file", {"data": {"note": "hi"}, "files": {"other": ("", b"", "text/plain")}}, 400),
    ("malformed multipart", {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}}, 400),
    ("too many files", {"files": [("file", ("a.jpg", JPEG, "image/jpeg"))] * 5}, 400),
    ("oversize upload", {"content": os.urandom(3 * 1024 * 1024), "headers": {"Content-Type": "image/jpeg"}}, 413),
    ("oversize multipart", {"files": {"file": ("big.jpg", os.urandom(3 * 1024 * 1024), "image/jpeg")}}, 413),
    ("pixel bomb PNG", {"files": {"file": ("bomb.png", _png(4000, 4000), "image/png")}}, 413),
    ("1100x1 PNG (resizes to zero height)", {"files": {"file": ("thin.png", _png(1100, 1), "image/png")}}, 400),
    ("1x3000 PNG (resizes to zero width)", {"content": _png(1, 3000), "headers": {"Content-Type": "image/png"}}, 400),
    ("EPS (not a raster format we open)", {"content": _eps(), "headers": {"Content-Type": "image/png"}}, 400),
    ("score_threshold > 1", {"params": {"score_threshold": "2"}, "files": {"file": JPEG}}, 422),
    ("score_threshold NaN", {"params": {"score_threshold": "nan"}, "files": {"file": JPEG}}, 422),
    ("score_threshold text", {"params": {"score_threshold": "high"}, "files": {"file": JPEG}}, 422),
    ("negative max_detections", {"params": {"max_detections": "-1"}, "files": {"file": JPEG}}, 422),
    ("unknown format", {"params": {"format": "gif"}, "files": {"file": JPEG}}, 422),
    ("unknown class", {"params": {"classes": "persn"}, "files": {"file": JPEG}}, 422),
    ("unknown model", {"params": {"model": "nope"}, "files": {"file": JPEG}}, 404),
    ("png format, two images", {"params": {"format": "png"}, "files": [("f", JPEG), ("g", JPEG)]}, 422),
]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(timeout=60) as c:
        yield c


@pytest.mark.parametrize(("label", "request_kwargs", "status"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_with_a_message(client: httpx.Client, label: str, request_kwargs: dict, status: int) -> None:
    r = client.post("/v1/detect", **request_kwargs)
    assert r.status_code == status, f"{label}: {r.status_code} {r.text[:300]}"
    detail = r.json()["detail"]
    assert detail, label
    if status == 413:
        assert "limit" in detail


def test_segment_with_a_model_without_masks(client: httpx.Client) -> None:
    r = client.post("/v1/segment", params={"model": FASTER_R50}, files={"file": JPEG})
    assert r.status_code == 422
    assert "mask" in r.json()["detail"]


def test_chunked_oversize_body_is_cut_off_while_reading(server: LiveServer) -> None:
    """No Content-Length: the limit is enforced on the streamed bytes, not by reading everything."""

    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 MiB offered, 2 MiB allowed
            yield os.urandom(1024 * 1024)

    with server.client(timeout=60) as client:
        try:
            r = client.post("/v1/detect", content=chunks(), headers={"Content-Type": "image/jpeg"})
        except httpx.TransportError:
            pytest.fail("the server should answer 413, not drop the connection")
    assert r.status_code == 413


def test_server_survives_the_whole_suite(server: LiveServer) -> None:
    """Run last in this module: still live, still ready, no 5xx counted for the inference routes."""
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
    # (/readyz answered 503 while the models loaded: that is its job, so only the API routes count)
    server_errors = sum(
        metric_value(text, "gnws_http_requests_total", {"route": route, "status": str(code)})
        for code in range(500, 600)
        for route in ("/v1/detect", "/v1/segment")
    )
    assert server_errors == 0
    assert metric_value(text, "gnws_http_requests_total", {"route": "/v1/detect", "status": "413"}) >= 3


def test_grey_and_alpha_images_are_accepted_formats(client: httpx.Client) -> None:
    """Not bad input: a tiny RGBA PNG decodes (alpha dropped); tiny images are upscaled, no crash."""
    rgba = np.zeros((1, 1, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    r = client.post("/v1/detect", content=buf.getvalue(), headers={"Content-Type": "image/png"},
                    params={"max_detections": 0})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["detections"] == []
    assert (r.json()["images"][0]["width"], r.json()["images"][0]["height"]) == (1, 1)


def test_a_slow_upload_is_cut_off_at_the_request_timeout(model_store: Path) -> None:
    """A client drip-feeding its body cannot hold an in-flight place past the request timeout: 408."""
    settings = small_settings(model_store, segment_model=None, request_timeout_s=1.0, warmup=False)
    live = start_server(create_app(settings, loader=lambda source: FakePredictor()))

    def drip() -> Iterator[bytes]:
        for _ in range(20):  # 10 s if the server let it
            time.sleep(0.5)
            yield b"\xff" * 16

    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with live.client(timeout=30) as slow:
            result["r"] = slow.post("/v1/detect", content=drip(), headers={"Content-Type": "image/jpeg"})

    sender = threading.Thread(target=send)
    try:
        sender.start()
        time.sleep(3.0)  # the client is still sending (10 s in all); its 1 s budget is spent
        with live.client(timeout=30) as client:
            text = client.get("/metrics").text
            assert client.get("/healthz").status_code == 200
        assert metric_value(text, "gnws_in_flight_requests") == 0, "the slow upload still holds its place"
        assert metric_value(text, "gnws_rejected_requests_total", {"reason": "timeout"}) == 1
        sender.join(60)
        assert result["r"].status_code == 408, result["r"].text
        assert "upload" in result["r"].json()["detail"]
    finally:
        sender.join(60)
        live.stop()
