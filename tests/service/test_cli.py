"""``gnws serve``: fails fast (offline: naming the missing files), and serves from a real process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FASTER_R50, IMAGES, MASK_R50, REFERENCE_IMAGES

GNWS = [sys.executable, "-m", "gnws.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GNWS_")}
    env.update({"GNWS_HOME": str(tmp_path / "home"), **extra})
    return env


def test_offline_missing_weights_fail_fast_naming_the_files(tmp_path: Path) -> None:
    """GNWS_OFFLINE: nothing is downloaded; one sentence names where the weights may be put."""
    result = subprocess.run([*GNWS, "serve", "--port", "0"], env={**_env(tmp_path), "GNWS_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert f"{FASTER_R50} is not on this machine and offline mode" in result.stderr
    assert str(tmp_path / "home" / "checkpoints") in result.stderr
    assert "Traceback" not in result.stderr
    assert "Uvicorn running" not in result.stderr  # refused before the server started


def test_invalid_settings_are_one_sentence(tmp_path: Path) -> None:
    result = subprocess.run([*GNWS, "serve", "--image-scale", "12"], env=_env(tmp_path), capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "image_scale" in result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_runs_uvicorn_on_loopback_and_stops_gracefully(tmp_path: Path, model_store: Path,
                                                              stop: signal.Signals) -> None:
    """A real process: zoo keys resolved through the model store; Ctrl+C or ``docker stop``'s SIGTERM
    arriving while a request is being answered lets it finish, then the command exits with status 0."""
    port = _free_port()
    env = _env(tmp_path, GNWS_MODEL_STORE=str(model_store), GNWS_IMAGE_SCALE="512,320", GNWS_DEVICE="cpu",
               GNWS_TORCH_THREADS="1")
    cmd = [*GNWS, "serve", "--port", str(port), "--detect-model", FASTER_R50, "--segment-model", MASK_R50,
           "--no-warmup"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    in_flight: concurrent.futures.Future[httpx.Response] | None = None
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        ready = False
        with httpx.Client(base_url=url, timeout=5) as client:
            while time.monotonic() < deadline and proc.poll() is None and not ready:
                with contextlib.suppress(httpx.TransportError):
                    ready = client.get("/readyz").status_code == 200
                if not ready:
                    time.sleep(0.25)
            assert ready, "gnws serve never became ready"
            models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
            assert set(models) == {FASTER_R50, MASK_R50}  # zoo keys resolved through the model store
            assert models[FASTER_R50]["image_scale"] == [512, 320]
            pool = concurrent.futures.ThreadPoolExecutor(1)
            image = (IMAGES / f"{REFERENCE_IMAGES[0]}.jpg").read_bytes()
            in_flight = pool.submit(client.post, "/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")},
                                    timeout=120)
            busy_by = time.monotonic() + 30  # the signal goes in while the forward pass runs
            busy = False
            while time.monotonic() < busy_by and not in_flight.done() and not busy:
                metrics = client.get("/metrics").text
                busy = re.search(r"^gnws_in_flight_requests [1-9]", metrics, re.MULTILINE) is not None
                if not busy:
                    time.sleep(0.05)
            assert busy, "the request never showed as in flight"
            proc.send_signal(stop)
            answer = in_flight.result(timeout=120)
            pool.shutdown()
    finally:
        if proc.poll() is None and in_flight is None:
            proc.send_signal(stop)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out
    assert answer.status_code == 200, answer.text
    assert answer.json()["images"][0]["detections"], "the request in flight was answered in full"
    assert proc.returncode == 0, out[-3000:]
    assert f"stopped by {stop.name}" in out
