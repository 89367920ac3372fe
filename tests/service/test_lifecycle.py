"""Startup and readiness: /readyz turns 200 only after load and warm-up; failures are reported."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models import WeightsNotFoundError
from service import create_app
from tests.conftest import FASTER_R50
from tests.service.conftest import FakePredictor, small_settings


def _wait(check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.02)


def test_ready_only_after_load_and_warm_up(model_store: Path) -> None:
    gate = threading.Event()
    fake = FakePredictor()

    def loader(source: Any) -> FakePredictor:
        gate.wait(30)
        return fake

    app = create_app(small_settings(model_store, segment_model=None, warmup=True, retry_after_s=3), loader=loader)
    with TestClient(app) as client:
        loading = client.get("/readyz")
        assert loading.status_code == 503
        assert loading.headers["Retry-After"] == "3"
        assert loading.json()["status"] == "loading"
        assert client.get("/healthz").status_code == 200
        busy = client.post("/v1/detect", content=b"x", headers={"Content-Type": "image/jpeg"})
        assert busy.status_code == 503
        assert busy.headers["Retry-After"] == "3"
        assert "loading" in busy.json()["detail"]
        assert client.get("/v1/models").status_code == 503
        gate.set()
        _wait(lambda: client.get("/readyz").status_code == 200)
        assert fake.forward_passes == 1  # warmed before ready
        assert "gnws_ready 1.0" in client.get("/metrics").text


def test_a_failed_load_is_reported_by_both_probes(model_store: Path) -> None:
    def loader(source: Any) -> FakePredictor:
        raise RuntimeError("out of memory")

    app = create_app(small_settings(model_store, segment_model=None), loader=loader)
    with TestClient(app) as client:
        _wait(lambda: client.get("/readyz").json()["status"] == "failed")
        health = client.get("/healthz")
        assert health.status_code == 503
        assert "out of memory" in health.json()["detail"]
        # nothing will change by waiting: no Retry-After on the probe or on requests
        assert "Retry-After" not in client.get("/readyz").headers
        refused = client.post("/v1/detect", content=b"x", headers={"Content-Type": "image/jpeg"})
        assert refused.status_code == 503
        assert "out of memory" in refused.json()["detail"]
        assert "Retry-After" not in refused.headers
        text = client.get("/metrics").text
    assert f'gnws_model_loads_total{{model="{FASTER_R50}",result="failure"}} 1.0' in text


def test_missing_weights_stop_startup_with_the_fetch_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNWS_HOME", str(tmp_path))
    app = create_app(small_settings(tmp_path, detect_model=FASTER_R50, segment_model=None))
    with pytest.raises(WeightsNotFoundError, match=f"gnws fetch {FASTER_R50}"), TestClient(app):
        pass
