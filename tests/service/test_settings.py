"""Settings from ``GNWS_*`` env vars and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gnws.request.errors import STATUS_BY_ERROR, OverloadedError, ReloadFailedError, status_for
from models import DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL
from service import Settings


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GNWS_HOST", "GNWS_API_KEY", "GNWS_DETECT_MODEL", "GNWS_SEGMENT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.api_key is None
    assert s.model_sources() == [DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL]


def test_env_parsing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GNWS_IMAGE_SCALE", "512x320")
    monkeypatch.setenv("GNWS_SEGMENT_MODEL", "none")
    monkeypatch.setenv("GNWS_EXTRA_MODELS", "a.safetensors, b.safetensors")
    monkeypatch.setenv("GNWS_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("GNWS_API_KEY", "s3cret-value")
    monkeypatch.setenv("GNWS_MODEL_STORE", str(tmp_path))
    s = Settings()
    assert s.image_scale == (512, 320)
    assert s.segment_model is None
    assert s.extra_models == ["a.safetensors", "b.safetensors"]
    assert s.max_batch_size == 8
    assert s.api_key is not None
    assert s.api_key.get_secret_value() == "s3cret-value"
    assert "s3cret" not in repr(s)
    assert s.model_store == tmp_path
    assert s.model_sources() == [DEFAULT_DETECT_MODEL, "a.safetensors", "b.safetensors"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_scale": "12"},
        {"image_scale": "100,400"},
        {"max_batch_size": 0},
        {"queue_size": 2, "max_files": 4},
        {"detect_model": "none", "segment_model": "none"},
        {"request_timeout_s": 0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_status_table() -> None:
    assert status_for(OverloadedError("x")) == 429
    assert status_for(ReloadFailedError("x")) == 422  # a CheckpointError
    assert all(400 <= code < 600 for code in STATUS_BY_ERROR.values())
