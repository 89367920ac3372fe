"""Precision per served model: chosen in the settings, shown to clients, refused when the device cannot run it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.errors import UnsupportedPrecisionError
from models.precision import supported_precisions
from service import Settings, create_app
from tests.conftest import FASTER_R50, MASK_R50
from tests.service.conftest import OTHER_SHAPE, image_bytes, small_settings


def test_settings_parse_precisions(model_store: Path) -> None:
    settings = small_settings(model_store, precision="BF16", model_precision=f"{MASK_R50}=fp32")
    assert settings.precision_for(FASTER_R50) == "bf16"
    assert settings.precision_for(MASK_R50) == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        small_settings(model_store, precision="int8")
    with pytest.raises(ValueError, match="NAME=PRECISION"):
        Settings(model_precision="bf16")


@pytest.mark.skipif("bf16" not in supported_precisions("cpu"), reason="this CPU has neither AVX-512 BF16 nor AMX")
def test_models_serve_in_their_precision_and_say_so(model_store: Path) -> None:
    settings = small_settings(model_store, model_precision=f"{FASTER_R50}=bf16", warmup=True)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 180
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.2)
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert (models[FASTER_R50]["precision"], models[MASK_R50]["precision"]) == ("bf16", "fp32")
        assert client.get(f"/v2/models/{FASTER_R50}").json()["parameters"] == {"precision": "bf16"}
        r = client.post("/v1/detect", content=image_bytes(OTHER_SHAPE), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["precision"] == "bf16"


def test_a_precision_the_device_cannot_run_stops_startup(model_store: Path) -> None:
    if "fp16" in supported_precisions("cpu"):
        pytest.skip("this CPU runs fp16")
    app = create_app(small_settings(model_store, segment_model=None, precision="fp16", warmup=False))
    with pytest.raises(UnsupportedPrecisionError, match="fp16"), TestClient(app):
        pass  # refused at startup, before any model is loaded
