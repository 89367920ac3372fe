"""What a client without the API key, or a careless one, can make a real ``gnws serve`` hold.

One ``gnws serve`` process on 127.0.0.1 (reference weights at a small scale, two processing
places, short upload and header deadlines), probed with raw sockets and ordinary HTTP clients.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import requests
from fastapi.testclient import TestClient

from service import create_app
from tests.conftest import FASTER_R50, MASK_R50
from tests.service.conftest import API_KEY, OTHER_SHAPE, SAME_SHAPE, FakePredictor, image_bytes, small_settings

MAX_IN_FLIGHT = 2
IDLE_S = 2
HEADER_S = 2
MB = 1024 * 1024


@pytest.fixture(scope="module")
def serve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``(url, pid)`` of a ``gnws serve`` subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GNWS_")} | {
        "GNWS_HOME": str(home), "GNWS_MODEL_STORE": str(model_store), "GNWS_OFFLINE": "1",
        "GNWS_DETECT_MODEL": FASTER_R50, "GNWS_SEGMENT_MODEL": MASK_R50, "GNWS_IMAGE_SCALE": "320,192",
        "GNWS_DEVICE": "cpu", "GNWS_TORCH_THREADS": "1", "GNWS_API_KEY": API_KEY, "GNWS_WARMUP": "false",
        "GNWS_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "GNWS_UPLOAD_IDLE_TIMEOUT_S": str(IDLE_S),
        "GNWS_HEADER_TIMEOUT_S": str(HEADER_S), "GNWS_MAX_UPLOAD_BYTES": str(2 * MB), "GNWS_PORT": str(port),
    }
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gnws.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gnws serve exited: {(home / 'serve.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("gnws serve did not get ready")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"null")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_large_unauthenticated_bodies_cost_no_memory(serve: tuple[str, int]) -> None:
    url, pid = serve
    reload = f"{url}/v1/models/{FASTER_R50}/reload"
    before = rss(pid)

    def body(size: int, chunk: bytes = b"{" * MB) -> Iterator[bytes]:  # streamed: no Content-Length
        for _ in range(size // len(chunk)):
            yield chunk

    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # 300 MB without a key, never read: 401
            r = client.post(reload, content=body(300 * MB), headers={"Content-Type": "application/json"})
            assert r.status_code == 401, r.text
        for _ in range(3):  # 100 MB of malformed JSON declared up front: 413 before auth or parsing
            r = client.post(reload, content=b"{" * (100 * MB), headers={"Content-Type": "application/json"})
            assert r.status_code == 413, r.text
            assert "byte limit" in r.json()["detail"]
        # with the key, a body over the small JSON limit is cut off while it is read
        r = client.post(reload, content=body(4 * MB, b" " * 65536), headers={"X-API-Key": API_KEY})
        assert r.status_code == 413, r.text
    time.sleep(1)
    grown = rss(pid) - before
    assert grown < 50 * MB, f"the server grew by {grown / MB:.0f} MB"


def test_slow_and_silent_clients_do_not_lock_out_real_ones(serve: tuple[str, int]) -> None:
    """More stalled uploads than processing places, and connections sending nothing: real
    clients are still answered, and the stalled ones are cut off after the short deadlines."""
    url, _ = serve
    stalled = []
    for _ in range(4 * MAX_IN_FLIGHT):
        sock = raw(url)
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\xff" * 10)
        stalled.append(sock)
    silent = [raw(url) for _ in range(4)]
    time.sleep(0.5)

    def real(name: str) -> int:
        r = httpx.post(f"{url}/v1/detect", content=image_bytes(name), headers={"Content-Type": "image/jpeg"},
                       timeout=120)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:  # as many as there are processing places
        statuses = list(pool.map(real, [SAME_SHAPE[0], OTHER_SHAPE]))
    assert statuses == [200] * MAX_IN_FLIGHT
    for sock in stalled:
        status, body = read_response(sock)
        assert status == 408, body
        assert "stalled" in body["detail"]
        sock.close()
    for sock in silent:
        status, body = read_response(sock)
        assert status == 408, body
        assert "headers did not arrive" in body["detail"]
        sock.close()
    metrics = httpx.get(f"{url}/metrics").text
    assert "gnws_uploads_in_progress 0.0" in metrics
    assert "gnws_in_flight_requests 0.0" in metrics


def test_oversize_uploads_get_their_413_with_ordinary_clients(serve: tuple[str, int], tmp_path: Path) -> None:
    url, _ = serve
    big = b"\xff" * (20 * MB)
    detect = f"{url}/v1/detect"
    headers = {"Content-Type": "image/jpeg"}
    try:
        urllib.request.urlopen(urllib.request.Request(detect, data=big, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        got = {"urllib": (exc.code, json.loads(exc.read()))}
    r = requests.post(detect, data=big, headers=headers, timeout=60)
    got["requests"] = (r.status_code, r.json())
    h = httpx.post(detect, content=big, headers=headers, timeout=60)
    got["httpx"] = (h.status_code, h.json())
    (tmp_path / "big.jpg").write_bytes(big)
    curl = subprocess.run(["curl", "-s", "-H", "Content-Type: image/jpeg", "--data-binary", f"@{tmp_path / 'big.jpg'}",
                           "-w", "\n%{http_code}", detect], capture_output=True, text=True, timeout=60, check=True)
    body, _, code = curl.stdout.rpartition("\n")
    got["curl"] = (int(code), json.loads(body))
    for client, (status, body) in got.items():
        assert status == 413, client
        assert "upload limit" in body["detail"], client


def test_unparseable_and_short_requests_get_json_errors(serve: tuple[str, int]) -> None:
    url, _ = serve
    with raw(url) as sock:
        sock.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = read_response(sock)
    assert status == 400
    assert "malformed request" in body["detail"]
    with raw(url) as sock:  # declares more than it sends: cut off after the idle deadline, not the request timeout
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                     + b"\x89PNG")
        started = time.monotonic()
        status, body = read_response(sock)
        waited = time.monotonic() - started
    assert status == 408, body
    assert "stalled" in body["detail"]
    assert waited < 30, f"the connection was held {waited:.0f} s"  # the request timeout (60 s) did not apply


def test_client_visible_answers_name_no_server_paths(serve: tuple[str, int], model_store: Path) -> None:
    url, _ = serve
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
        models = client.get("/v1/models")
        missing = client.post(f"/v1/models/{FASTER_R50}/reload", json={"source": "nope/3.safetensors"})
        swapped = client.post(f"/v1/models/{FASTER_R50}/reload", json={"source": f"{MASK_R50}.safetensors"})
    assert models.status_code == 200
    for text in (models.text, missing.text, swapped.text):
        assert str(model_store) not in text
    assert {m["source"] for m in models.json()["models"]} == {FASTER_R50, MASK_R50}  # zoo keys, not paths
    assert missing.status_code == 404
    assert swapped.status_code == 409, swapped.text
    assert "replace_architecture" in swapped.json()["detail"]


def test_metrics_and_model_listings_can_require_the_key(model_store: Path) -> None:
    settings = small_settings(model_store, segment_model=None, metrics_need_key=True, models_need_key=True)
    with TestClient(create_app(settings, loader=lambda ref: FakePredictor())) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": API_KEY}).status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get(f"/v2/models/{FASTER_R50}").status_code == 401
        assert client.get("/healthz").status_code == 200  # probes stay open
    with pytest.raises(ValueError, match="need an API key"):
        small_settings(model_store, api_key=None, metrics_need_key=True)
