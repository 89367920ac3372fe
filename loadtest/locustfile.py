"""Locust load test of the gnws API: POST real coco-tiny images to /v1/detect and /v1/segment.

Headless through ``gnws loadtest --url URL`` (bounded run, CSV + HTML + summary) or by hand:
``locust -f loadtest/locustfile.py --headless -u 4 -r 1 -t 2m --host http://127.0.0.1:8000``.
``GNWS_LOADTEST_IMAGES`` is the folder of JPEG/PNG images to send (default: the test images);
``GNWS_LOADTEST_SEGMENT_WEIGHT`` the share of /segment requests (0 disables them, default 1 in 4).
Failures are labelled ``HTTP <status>`` so the summary can split overload answers (429/503)
from server errors (5xx).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import HttpUser, between, task

_DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "images"
IMAGE_DIR = Path(os.environ.get("GNWS_LOADTEST_IMAGES", _DEFAULT_IMAGES))
IMAGES = sorted(
    (p.name, p.read_bytes()) for p in IMAGE_DIR.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
) if IMAGE_DIR.is_dir() else []
if not IMAGES:
    raise SystemExit(f"no .jpg/.png images in {IMAGE_DIR} (set GNWS_LOADTEST_IMAGES)")
SEGMENT_WEIGHT = float(os.environ.get("GNWS_LOADTEST_SEGMENT_WEIGHT", "0.25"))
SEGMENT_EVERY = round(1 / SEGMENT_WEIGHT) if SEGMENT_WEIGHT > 0 else 0
API_KEY = os.environ.get("GNWS_LOADTEST_API_KEY", "")


class DetectionUser(HttpUser):
    """One client sending one image per request; /segment for ``SEGMENT_WEIGHT`` of them."""

    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        self.images = itertools.cycle(IMAGES)
        self.counter = itertools.count()

    def _post(self, path: str) -> None:
        name, data = next(self.images)
        headers = {"X-API-Key": API_KEY} if API_KEY else {}
        content_type = "image/png" if name.lower().endswith(".png") else "image/jpeg"
        with self.client.post(path, files={"file": (name, data, content_type)}, headers=headers, name=path,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif not isinstance(response.json().get("images"), list):
                response.failure("HTTP 200 without an 'images' list")

    @task
    def detect_or_segment(self) -> None:
        n = next(self.counter)
        if SEGMENT_EVERY and n % SEGMENT_EVERY == SEGMENT_EVERY - 1:
            self._post("/v1/segment")
        else:
            self._post("/v1/detect")
