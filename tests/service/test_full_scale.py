"""One request at mmdetection's full test scale (1333x800): exactly the predictor's detections."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from models import Predictor
from service import create_app
from tests.conftest import FASTER_R50
from tests.service.conftest import OTHER_SHAPE, image_bytes, small_settings, start_server


@pytest.mark.slow
def test_full_scale_detect_equals_predictor(model_store: Path, predictor_for: Callable[[str], Predictor]) -> None:
    live = start_server(create_app(small_settings(model_store, image_scale=None, segment_model=None)))
    try:
        with live.client() as client:
            r = client.post("/v1/detect", files={"file": (OTHER_SHAPE, image_bytes(OTHER_SHAPE), "image/jpeg")})
            listed = client.get("/v1/models").json()["models"][0]
    finally:
        live.stop()
    assert r.status_code == 200, r.text
    assert listed["image_scale"] == [1333, 800]
    want = predictor_for(FASTER_R50).predict(image_bytes(OTHER_SHAPE))
    assert want
    assert r.json()["images"][0]["detections"] == want
