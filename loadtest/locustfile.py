"""Locust load test of the gnws API: POST coco-tiny images to /v1/detect and /v1/segment.

Used headless by the compose profile ``loadtest`` (reports in ./out/loadtest); by hand:
``locust -f bench/locustfile.py --headless -u 4 -r 1 -t 2m --host http://127.0.0.1:8000``.
``GNWS_LOADTEST_IMAGES`` is the folder of JPEG/PNG images to send (default: the test images).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import HttpUser, between, task

IMAGE_DIR = Path(os.environ.get("GNWS_LOADTEST_IMAGES", Path(__file__).resolve().parents[1] / "tests/fixtures/images"))
IMAGES = sorted((p.name, p.read_bytes()) for p in IMAGE_DIR.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
if not IMAGES:
    raise SystemExit(f"no .jpg/.png images in {IMAGE_DIR} (set GNWS_LOADTEST_IMAGES)")


class DetectionUser(HttpUser):
    """One client sending one image per request, detection three times as often as segmentation."""

    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        self.images = itertools.cycle(IMAGES)

    def _post(self, path: str) -> None:
        name, data = next(self.images)
        with self.client.post(path, files={"file": (name, data, "image/jpeg")}, name=path,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200] or response.error}")
            elif not isinstance(response.json().get("images"), list):
                response.failure("no 'images' list in the answer")

    @task(3)
    def detect(self) -> None:
        self._post("/v1/detect")

    @task(1)
    def segment(self) -> None:
        self._post("/v1/segment")
