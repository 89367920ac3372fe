"""``gnws serve``: fails fast (offline: naming the missing files), and serves from a real process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FASTER_R50, MASK_R50

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
def test_serve_runs_uvicorn_on_loopback(tmp_path: Path, model_store: Path) -> None:
    port = _free_port()
    env = _env(tmp_path, GNWS_MODEL_STORE=str(model_store), GNWS_IMAGE_SCALE="512,320", GNWS_DEVICE="cpu",
               GNWS_TORCH_THREADS="1")
    cmd = [*GNWS, "serve", "--port", str(port), "--detect-model", FASTER_R50, "--segment-model", MASK_R50,
           "--no-warmup"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out
    assert proc.returncode == 0, out[-3000:]
