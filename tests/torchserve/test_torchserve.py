"""End to end: `gnws archive` → a real TorchServe on 127.0.0.1 → the predictor's detections, the service's JSON.

Archives are built with the ``gnws archive`` command from the ``make_weights.py`` reference
checkpoints (baked), with a small test scale so a forward pass takes about a second on CPU; the
reference predictor and the reference HTTP service use the same scale. Images (and one broken
upload) are POSTed concurrently so TorchServe batches them; the two 640x480 images share a padded
shape, so one forward pass runs for both.

Without Java these tests skip, except under CI (``CI`` set), where a missing Java fails them:
``scripts/setup-system.sh`` installs it there.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from gnws.cli import main as gnws_main
from models import Predictor
from tests.conftest import FASTER_R50, IMAGES, MASK_R50
from tests.torchserve.detections import assert_same_detections, assert_same_response, service_client
from tests.torchserve.torchserve_runner import (
    REPO,
    TOKEN_REFUSED,
    TorchServe,
    java_available,
    key_expired,
    read_properties,
    run_torchserve,
)

pytestmark = [pytest.mark.torchserve, pytest.mark.timeout(600)]

SCALE = (512, 320)
BATCH_SIZE = 4
MAX_BATCH_DELAY_MS = 400
IMAGE_IDS = ("000000005001", "000000025603")  # both 640x480: one forward pass when batched
HEALTHCHECK = REPO / "docker" / "torchserve" / "healthcheck.py"
KEYS = REPO / "docker" / "torchserve" / "keys.py"
# Keys of the short-lived server expire this many minutes after they are issued.
SHORT_EXPIRY_MIN = 0.1


@pytest.fixture(scope="module", autouse=True)
def _java() -> None:
    """Skip without Java on a developer machine; fail under CI, where a skip would hide the missing test."""
    if java_available():
        return
    message = "TorchServe needs Java 11+ (`java` on PATH or JAVA_HOME); scripts/setup-system.sh installs it as root"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and Java is missing: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory, baked_model) -> Path:
    """Both archives, built by `gnws archive` (the CLI's argument handling), plus a stale one."""
    store = tmp_path_factory.mktemp("model-store")
    for stem in (FASTER_R50, MASK_R50):
        args = ["archive", str(baked_model(stem)), "--export-path", str(store), "--model-name", stem,
                "--batch-size", str(BATCH_SIZE), "--max-batch-delay", str(MAX_BATCH_DELAY_MS),
                "--image-scale", ",".join(map(str, SCALE)), "--device", "cpu"]
        assert gnws_main(args) == 0, args
    # An archive left over from an earlier configuration: never served (load_models names the models).
    (store / "stale-model.mar").symlink_to(store / f"{FASTER_R50}.mar")
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, archives: Path):
    with run_torchserve(tmp_path_factory.mktemp("torchserve"), archives, [FASTER_R50, MASK_R50]) as ts:
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


@pytest.fixture(scope="module")
def service(baked_model):
    """The HTTP service serving the same baked files at the same scale (the JSON reference)."""
    with service_client(baked_model(FASTER_R50), baked_model(MASK_R50), SCALE) as client:
        yield client


def post_concurrently(server: TorchServe, model: str, bodies: list[bytes], query: str = "") -> list[httpx.Response]:
    """POST every body at once (one thread each) so that TorchServe can batch them."""
    headers = {**server.auth(), "Content-Type": "application/octet-stream"}

    def post(body: bytes) -> httpx.Response:
        return httpx.post(f"{server.inference_url}/predictions/{model}{query}", content=body, timeout=120.0,
                          headers=headers)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, bodies))


@pytest.mark.parametrize("stem", [FASTER_R50, MASK_R50])
def test_batched_predictions_equal_the_predictor_and_the_service(server: TorchServe, expected, service,
                                                                 stem: str) -> None:
    bodies = [(IMAGES / f"{i}.jpg").read_bytes() for i in IMAGE_IDS] + [b"this is not an image"]
    responses = post_concurrently(server, stem, bodies)

    bad = responses[-1]
    assert bad.status_code == 400, server.logs()
    assert bad.headers["content-type"].startswith("application/json")
    assert "is not a recognised image" in bad.json()["detail"], bad.text
    endpoint = "/v1/segment" if stem == MASK_R50 else "/v1/detect"
    for image_id, body, r in zip(IMAGE_IDS, bodies, responses, strict=False):
        assert r.status_code == 200, f"{image_id}: {r.status_code} {r.text[:500]}\n{server.logs()}"
        got = r.json()
        assert got["model"]["name"] == stem
        (image,) = got["images"]
        assert image["detections"], f"{image_id}: the reference weights give detections; got none"
        if stem == MASK_R50:
            assert all("segmentation" in d for d in image["detections"])
        assert_same_detections(image["detections"], expected[stem][image_id])
        want = service.post(endpoint, content=body, headers={"Content-Type": "image/jpeg"})
        assert want.status_code == 200, want.text
        assert_same_response(got, want.json(), compare_batch_size=False)

    batch_sizes = [int(line.split("batch of ")[1].split()[0])
                   for line in (server.root / "logs" / "model_log.log").read_text().splitlines()
                   if "batch of " in line]
    assert max(batch_sizes) >= 2, f"TorchServe never batched requests: {batch_sizes}"


def test_query_parameters_reach_the_handler(server: TorchServe, service) -> None:
    """score_threshold, max_detections, classes and polygons: as a query string on /models/NAME/invoke, as
    form fields on /predictions/NAME (TorchServe 0.12 drops the query string of /predictions/NAME)."""
    body = (IMAGES / f"{IMAGE_IDS[0]}.jpg").read_bytes()
    plain = service.post("/v1/segment", content=body, headers={"Content-Type": "image/jpeg"}).json()
    detections = plain["images"][0]["detections"]
    other = next(d for d in detections if d["category_id"] != detections[0]["category_id"])
    queries = [
        {"score_threshold": str(round(detections[len(detections) // 2]["score"], 4)), "polygons": "true"},
        {"max_detections": "2"},
        {"classes": f"{detections[0]['category_name']},{other['category_id']}"},
    ]
    headers = {**server.auth(), "Content-Type": "application/octet-stream"}
    for query in queries:
        want = service.post("/v1/segment", params=query, content=body, headers={"Content-Type": "image/jpeg"})
        assert want.status_code == 200, want.text
        invoke = httpx.post(f"{server.inference_url}/models/{MASK_R50}/invoke", params=query, content=body,
                            timeout=120.0, headers=headers)
        form = httpx.post(f"{server.inference_url}/predictions/{MASK_R50}", data=query, timeout=120.0,
                          files={"file": ("image.jpg", body, "image/jpeg")}, headers=server.auth())
        for r in (invoke, form):
            assert r.status_code == 200, r.text
            assert_same_response(r.json(), want.json(), compare_batch_size=False)
            assert 0 < len(r.json()["images"][0]["detections"]) < len(detections), query
    bad = httpx.post(f"{server.inference_url}/models/{MASK_R50}/invoke", params={"classes": "zebraa"}, content=body,
                     timeout=120.0, headers=headers)
    assert bad.status_code == 422, bad.text
    assert "Did you mean zebra?" in bad.json()["detail"]
    # What docs/containers.md warns about: TorchServe parses a body sent with curl --data-binary's default type
    # as a form and fails on it (500, before the handler); /predictions/NAME never passes its query string on.
    as_form = httpx.post(f"{server.inference_url}/predictions/{MASK_R50}", content=body, timeout=120.0,
                         headers={**server.auth(), "Content-Type": "application/x-www-form-urlencoded"})
    assert as_form.status_code == 500, as_form.text
    assert "DecoderException" in as_form.text
    ignored = httpx.post(f"{server.inference_url}/predictions/{MASK_R50}", params={"max_detections": "1"},
                         content=body, timeout=120.0, headers=headers)
    assert len(ignored.json()["images"][0]["detections"]) == len(detections)


def test_archive_settings_reach_torchserve(server: TorchServe) -> None:
    r = httpx.get(f"{server.management_url}/models/{MASK_R50}", headers=server.auth("management"), timeout=30.0)
    assert r.status_code == 200, r.text
    (model,) = r.json()
    assert model["batchSize"] == BATCH_SIZE
    assert model["maxBatchDelay"] == MAX_BATCH_DELAY_MS
    assert [w["status"] for w in model["workers"]] == ["READY"]


def test_serves_exactly_the_configured_models(server: TorchServe, archives: Path) -> None:
    assert (archives / "stale-model.mar").exists()
    r = httpx.get(f"{server.management_url}/models", headers=server.auth("management"), timeout=30.0)
    assert r.status_code == 200, r.text
    assert sorted(m["modelName"] for m in r.json()["models"]) == sorted([FASTER_R50, MASK_R50])


def test_token_auth_is_on(server: TorchServe) -> None:
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException, /ping included."""
    body = (IMAGES / f"{IMAGE_IDS[0]}.jpg").read_bytes()
    url = f"{server.inference_url}/predictions/{FASTER_R50}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, server.auth("management")):
        r = httpx.post(url, content=body, headers=headers, timeout=30.0)
        assert r.status_code in (400, 401), r.text
        assert TOKEN_REFUSED in r.text
    assert TOKEN_REFUSED in httpx.get(f"{server.inference_url}/ping", timeout=30.0).text
    r = httpx.get(f"{server.management_url}/models", headers=server.auth("inference"), timeout=30.0)
    assert TOKEN_REFUSED in r.text


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


def test_listens_on_the_rendered_explicit_addresses_only(server: TorchServe) -> None:
    """The config the entry point's renderer wrote names one interface everywhere (here 127.0.0.1, as tests
    must), and the live TCP listeners (HTTP and gRPC) are exactly there: no wildcard socket.
    Java reports IPv4 listeners IPv4-mapped (::ffff:127.0.0.1)."""
    props = read_properties(server.config)
    configured = {ipaddress.ip_address(props[k].split("//")[1].rsplit(":", 1)[0])
                  for k in ("inference_address", "management_address", "metrics_address")}
    configured |= {ipaddress.ip_address(props[k]) for k in ("grpc_inference_address", "grpc_management_address")}
    assert {str(ip) for ip in configured} == {"127.0.0.1"}, props
    listening = [c.laddr for c in psutil.Process(server.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listening) == 5, listening  # inference, management, metrics, gRPC inference and management
    ips = set()
    for addr in listening:
        ip = ipaddress.ip_address(addr.ip)
        assert not ip.is_unspecified, f"a wildcard listener: {addr}"
        ips.add(str(ip.ipv4_mapped) if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else str(ip))
    assert ips == {"127.0.0.1"}, listening


def run_script(script: Path, server: TorchServe, *args: str, config: Path | None = None,
               key_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A script of the torchserve image (``python /opt/gnws/torchserve/...``), pointed at this server."""
    env = {**os.environ, "GNWS_TS_EFFECTIVE_CONFIG": str(config or server.config),
           "GNWS_TS_KEY_FILE": str(key_file or server.key_file)}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def run_healthcheck(server: TorchServe, **kwargs: Path) -> subprocess.CompletedProcess[str]:
    """The torchserve image's HEALTHCHECK command."""
    return run_script(HEALTHCHECK, server, **kwargs)


def ping(server: TorchServe, key: str) -> httpx.Response:
    return httpx.get(f"{server.inference_url}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=30.0)


def test_keys_script_prints_and_renews_the_inference_key(server: TorchServe) -> None:
    """What docs/containers.md tells clients to run (`docker compose exec torchserve python .../keys.py`)."""
    old = json.loads(server.key_file.read_text())["inference"]["key"]
    current = run_script(KEYS, server, "inference")
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == old, "an unexpired key is printed as it is"
    renewed = run_script(KEYS, server, "inference", "--renew")
    assert renewed.returncode == 0, renewed.stderr
    new = renewed.stdout.strip()
    assert new not in ("", old)
    assert json.loads(server.key_file.read_text())["inference"]["key"] == new
    assert ping(server, new).json()["status"] == "Healthy"
    assert TOKEN_REFUSED in ping(server, old).text


def test_container_healthcheck_script(server: TorchServe, tmp_path: Path) -> None:
    ok = run_healthcheck(server)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "", "no key has expired"
    bad = run_healthcheck(server, key_file=tmp_path / "missing.json")
    assert bad.returncode == 1
    assert "unhealthy" in bad.stderr
    props = read_properties(server.config)
    props["load_models"] += ",never-built=never-built.mar"
    config = tmp_path / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    missing = run_healthcheck(server, config=config)
    assert missing.returncode == 1
    assert "not registered (see TorchServe's log): never-built" in missing.stderr


def test_health_survives_key_expiry_and_stop_is_clean(tmp_path: Path, archives: Path) -> None:
    """A TorchServe of its own whose keys expire after 6 s: once both have expired, the health check still
    passes (it renews the management key with the never-expiring API key and takes the inference listener's
    token refusal as an answer, saying that clients need a renewed key), an expired key is refused, and
    `torchserve --stop` ends the frontend and every worker without a kill."""
    with run_torchserve(tmp_path, archives, [FASTER_R50], {"token_expiration_min": str(SHORT_EXPIRY_MIN)}) as ts:
        keys = json.loads(ts.key_file.read_text())
        deadline = time.monotonic() + 60
        while not (key_expired(keys["inference"]) and key_expired(keys["management"])):
            assert time.monotonic() < deadline, keys
            time.sleep(1)
            keys = json.loads(ts.key_file.read_text())
        old = {"Authorization": f"Bearer {keys['management']['key']}"}
        assert TOKEN_REFUSED in httpx.get(f"{ts.management_url}/models", headers=old, timeout=30.0).text

        health = run_healthcheck(ts)
        assert health.returncode == 0, health.stderr
        assert "inference key expired" in health.stdout
        renewed = json.loads(ts.key_file.read_text())
        assert renewed["management"]["key"] != keys["management"]["key"]
        assert renewed["inference"] == keys["inference"], "the health check never renews the clients' key"
        assert TOKEN_REFUSED in ping(ts, keys["inference"]["key"]).text
        fresh = run_script(KEYS, ts, "inference")  # an expired key is renewed when asked for
        assert fresh.returncode == 0, fresh.stderr
        assert ping(ts, fresh.stdout.strip()).json()["status"] == "Healthy"

        java = psutil.Process(ts.pid)
        workers = java.children(recursive=True)
        assert workers, "expected one Python worker"
        assert ts.stop() == []
        assert not java.is_running()
        assert not any(w.is_running() for w in workers)
