"""Service test fixtures: a model store with the reference weights, and real uvicorn servers.

Servers run in a thread of the test process on 127.0.0.1 (an ephemeral port) at the small test
scale ``(512, 320)``: a forward pass takes 1-2 s on CPU. They run real multi-image forward passes
(``batched_forward=True``, off by default on CPU), so the batching tests compare true batches
with one-by-one predictor calls; for these images batched passes are bit-exact on CPU (measured
here at this scale and at 1333x800; the predictor docstring says why CPU defaults to one image per
pass). The one full-scale check is in ``test_full_scale.py``. Expected detections come from
:class:`models.Predictor` loaded from the same baked file at the same scale, one image per call.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from models import Predictor
from service import Settings, create_app
from service.server import uvicorn_config
from tests.conftest import FASTER_R50, IMAGES, MASK_R50

SMALL_SCALE = (512, 320)
API_KEY = "test-key"
# 4:3 images (640x480, 640x480 and 320x240): one padded shape at the small scale (320x448), so they batch together.
SAME_SHAPE = ("000000404484.jpg", "000000005001.jpg", "000000025603.jpg")
OTHER_SHAPE = "000000020992.jpg"  # 333x500 -> a different padded shape
READY_TIMEOUT_S = 180


@dataclass
class LiveServer:
    """A uvicorn server running ``app`` in a thread; ``url`` is ``http://127.0.0.1:PORT``."""

    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(app: Any, *, wait_ready: bool = True) -> LiveServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The configuration `gnws serve` runs (connection limits, header deadline, JSON parse errors).
    config = uvicorn_config(app, app.state.gnws.settings, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    live = LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    if wait_ready:
        wait_until_ready(live.url)
    return live


def wait_until_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            r = client.get("/readyz")
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise RuntimeError(f"server failed to load its models: {r.json()}")
            time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready within {timeout_s} s")


class FakePredictor:
    """Stands in for a loaded model; records the warm-up forward pass."""

    name = "fake"
    classes = ("thing",)
    category_ids = (1,)
    has_masks = False
    device = "cpu"
    batched_forward = False

    def __init__(self) -> None:
        self.forward_passes = 0

    def decode(self, image: Any) -> Any:
        return image

    def prepare_decoded(self, rgb: Any) -> Any:
        return rgb

    def prepare(self, image: Any) -> Any:
        return image

    def infer(self, prepared: list[Any]) -> list[Any]:
        self.forward_passes += 1
        return [None for _ in prepared]

    def encode(self, raw: Any) -> list[Any]:
        return []


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, baked_model: Callable[[str], Path]) -> Path:
    """A model store holding the baked reference R-50 Faster and Mask models under their zoo names."""
    store = tmp_path_factory.mktemp("model_store")
    for stem in (FASTER_R50, MASK_R50):
        src = baked_model(stem)
        dst = store / f"{stem}.safetensors"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return store


def small_settings(store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "detect_model": str(store / f"{FASTER_R50}.safetensors"),
        "segment_model": str(store / f"{MASK_R50}.safetensors"),
        "device": "cpu",
        "image_scale": SMALL_SCALE,
        "model_store": store,
        "api_key": API_KEY,
        "warmup": False,
        "max_batch_size": 4,
        "max_batch_delay_ms": 50,
        "batched_forward": True,
        "queue_size": 16,
        "max_upload_bytes": 2 * 1024 * 1024,
        "max_files": 4,
        "max_pixels": 5_000_000,
        "request_timeout_s": 120,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def small_predictor(baked_model: Callable[[str], Path]) -> Callable[[str], Predictor]:
    """``stem -> Predictor`` at the small test scale (what the servers here run)."""
    cache: dict[str, Predictor] = {}

    def make(stem: str) -> Predictor:
        if stem not in cache:
            cache[stem] = Predictor.load(baked_model(stem), device="cpu", image_scale=SMALL_SCALE)
        return cache[stem]

    return make


@pytest.fixture(scope="session")
def expected(small_predictor: Callable[[str], Predictor]) -> Callable[[str, str], list[dict[str, Any]]]:
    """``(stem, image name) -> predictor detections`` at the small scale, one image per call, cached."""
    cache: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def get(stem: str, name: str) -> list[dict[str, Any]]:
        if (stem, name) not in cache:
            cache[stem, name] = [dict(d) for d in small_predictor(stem).predict(image_bytes(name))]
        return cache[stem, name]

    return get


@pytest.fixture(scope="session")
def server(model_store: Path) -> Iterator[LiveServer]:
    """The shared server: both models at the small scale, API key ``test-key``, 2 MiB upload limit."""
    live = start_server(create_app(small_settings(model_store)))
    yield live
    live.stop()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``, from Prometheus text (0 if none)."""
    want = labels or {}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in want.items()):
            total += float(value)
    return total
