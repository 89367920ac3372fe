"""schemathesis over the live OpenAPI spec: no 5xx, responses match their declared schemas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import create_app
from tests.service.conftest import API_KEY, LiveServer, small_settings, start_server

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
])


@pytest.fixture(scope="module")
def fuzz_server(model_store: Path) -> Iterator[LiveServer]:
    """Both models at a tiny test scale: the fuzzer does send valid images, and only the contract matters."""
    live = start_server(create_app(small_settings(model_store, image_scale=(128, 64))))
    yield live
    live.stop()


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_or_schema_violations(fuzz_server: LiveServer, tmp_path: Path) -> None:
    server = fuzz_server
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    cmd = [
        exe, "run", f"{server.url}/openapi.json",
        "--checks", CHECKS,
        "--max-examples", "12",
        "--seed", "20260101",
        "--workers", "1",
        "--request-timeout", "60",
        "--generation-database", "none",
        "--phases", "examples,coverage,fuzzing",
        "--no-color",
        # with the API key, reloads get past authentication and their sources are fuzzed too
        "--header", f"X-API-Key: {API_KEY}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
