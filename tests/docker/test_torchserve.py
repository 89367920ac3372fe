"""End to end: `gnws archive` → a real TorchServe on 127.0.0.1 → the predictor's detections.

Archives are built from the ``make_weights.py`` reference checkpoints (baked), with a small test
scale so a forward pass takes about a second on CPU; the reference predictor uses the same scale.
Images (and one broken upload) are POSTed concurrently so TorchServe batches them; the two 640x480
images share a padded shape, so one forward pass runs for both.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from models import Predictor
from tests.conftest import FASTER_R50, IMAGES, MASK_R50
from tests.docker.detections import assert_same_detections
from tests.docker.torchserve_runner import REPO, TorchServe, java_available, run_torchserve

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.skipif(not java_available(), reason="TorchServe needs Java 11+ (`java` on PATH or JAVA_HOME)"),
    pytest.mark.timeout(600),
]

SCALE = (512, 320)
BATCH_SIZE = 4
MAX_BATCH_DELAY_MS = 400
IMAGE_IDS = ("000000404484", "000000025603")  # 640x480 both: one forward pass when batched


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory, baked_model, archive_module) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    settings = archive_module.ArchiveSettings(batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS,
                                              image_scale=SCALE)
    for stem in (FASTER_R50, MASK_R50):
        archive_module.build_archive(str(baked_model(stem)), store, model_name=stem, settings=settings)
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, archives: Path):
    with run_torchserve(tmp_path_factory.mktemp("torchserve"), archives) as ts:
        yield ts


@pytest.fixture(scope="module")
def expected(baked_model) -> dict[str, dict[str, list[dict]]]:
    """The predictor's detections at the test scale: ``stem -> image id -> detections``."""
    out = {}
    for stem in (FASTER_R50, MASK_R50):
        predictor = Predictor.load(baked_model(stem), device="cpu", model_name=stem, image_scale=SCALE)
        dets = predictor.predict([(IMAGES / f"{i}.jpg").read_bytes() for i in IMAGE_IDS])
        out[stem] = dict(zip(IMAGE_IDS, dets, strict=True))
    return out


def post_concurrently(server: TorchServe, model: str, bodies: list[bytes]) -> list[httpx.Response]:
    """POST every body at once (one thread each) so that TorchServe can batch them."""
    def post(body: bytes) -> httpx.Response:
        return httpx.post(f"{server.inference_url}/predictions/{model}", content=body, timeout=120.0,
                          headers={**server.auth(), "Content-Type": "application/octet-stream"})

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, bodies))


@pytest.mark.parametrize("stem", [FASTER_R50, MASK_R50])
def test_batched_predictions_equal_the_predictor(server: TorchServe, expected, stem: str) -> None:
    bodies = [(IMAGES / f"{i}.jpg").read_bytes() for i in IMAGE_IDS] + [b"this is not an image"]
    responses = post_concurrently(server, stem, bodies)

    bad = responses[-1]
    assert bad.status_code == 400, server.logs()
    assert bad.headers["content-type"].startswith("application/json")
    assert "is not a recognised image" in bad.json()["detail"], bad.text
    for image_id, r in zip(IMAGE_IDS, responses, strict=False):
        assert r.status_code == 200, f"{image_id}: {r.status_code} {r.text[:500]}\n{server.logs()}"
        body = r.json()
        assert body["model"]["name"] == stem
        (image,) = body["images"]
        assert image["detections"], f"{image_id}: the reference weights give detections; got none"
        if stem == MASK_R50:
            assert all("segmentation" in d for d in image["detections"])
        assert_same_detections(image["detections"], expected[stem][image_id])

    batch_sizes = [int(line.split("batch of ")[1].split()[0])
                   for line in (server.root / "logs" / "model_log.log").read_text().splitlines()
                   if "batch of " in line]
    assert max(batch_sizes) >= 2, f"TorchServe never batched requests: {batch_sizes}"


def test_archive_settings_reach_torchserve(server: TorchServe) -> None:
    r = httpx.get(f"{server.management_url}/models/{MASK_R50}", headers=server.auth("management"), timeout=30.0)
    assert r.status_code == 200, r.text
    (model,) = r.json()
    assert model["batchSize"] == BATCH_SIZE
    assert model["maxBatchDelay"] == MAX_BATCH_DELAY_MS
    assert [w["status"] for w in model["workers"]] == ["READY"]


def test_token_auth_is_on(server: TorchServe) -> None:
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException."""
    body = (IMAGES / f"{IMAGE_IDS[0]}.jpg").read_bytes()
    url = f"{server.inference_url}/predictions/{FASTER_R50}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, server.auth("management")):
        r = httpx.post(url, content=body, headers=headers, timeout=30.0)
        assert r.status_code in (400, 401), r.text
        assert "Token Authorization failed" in r.text
    r = httpx.get(f"{server.management_url}/models", headers=server.auth("inference"), timeout=30.0)
    assert "Token Authorization failed" in r.text


def test_model_api_is_off(server: TorchServe) -> None:
    r = httpx.post(f"{server.management_url}/models", params={"url": f"{FASTER_R50}.mar", "model_name": "again"},
                   headers=server.auth("management"), timeout=30.0)
    assert r.status_code == 405, r.text
    r = httpx.delete(f"{server.management_url}/models/{FASTER_R50}", headers=server.auth("management"), timeout=30.0)
    assert r.status_code == 405, r.text


def test_prometheus_metrics(server: TorchServe) -> None:
    r = httpx.get(f"{server.metrics_url}/metrics", timeout=30.0)
    assert r.status_code == 200, r.text
    assert "ts_inference_requests_total" in r.text


def test_listens_on_loopback_only(server: TorchServe) -> None:
    """Every TCP listener (HTTP and gRPC) is on 127.0.0.1; Java reports it IPv4-mapped (::ffff:127.0.0.1)."""
    listening = [c.laddr for c in psutil.Process(server.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listening) == 5, listening  # inference, management, metrics, gRPC inference and management
    ips = set()
    for addr in listening:
        ip = ipaddress.ip_address(addr.ip)
        ips.add(str(ip.ipv4_mapped) if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else str(ip))
    assert ips == {"127.0.0.1"}, listening


def test_container_healthcheck_script(server: TorchServe) -> None:
    """The torchserve image's HEALTHCHECK command, pointed at this server."""
    env = {**os.environ, "GNWS_TS_KEY_FILE": str(server.root / "key_file.json"),
           "GNWS_TS_INFERENCE_URL": server.inference_url, "GNWS_TS_MANAGEMENT_URL": server.management_url}
    script = REPO / "docker" / "torchserve" / "healthcheck.py"
    ok = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env["GNWS_TS_KEY_FILE"] = str(server.root / "missing.json")
    bad = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "unhealthy" in bad.stderr


def test_stops_cleanly(server: TorchServe) -> None:
    """Runs last: `torchserve --stop` ends the frontend and every worker without a kill."""
    java = psutil.Process(server.pid)
    workers = java.children(recursive=True)
    assert workers, "expected one Python worker per model"
    assert server.stop() == []
    assert not java.is_running()
    assert not any(w.is_running() for w in workers)
