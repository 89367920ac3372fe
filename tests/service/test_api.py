"""End to end through a real uvicorn on 127.0.0.1: detections equal the predictor's, batched or not."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from models import ZOO
from tests.conftest import FASTER_R50, MASK_R50
from tests.service.conftest import OTHER_SHAPE, SAME_SHAPE, LiveServer, image_bytes, metric_value

Expected = Callable[[str, str], list[dict[str, Any]]]


def test_detect_raw_body_equals_predictor(server: LiveServer, expected: Expected) -> None:
    name = OTHER_SHAPE
    with server.client() as client:
        r = client.post("/v1/detect", content=image_bytes(name), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == FASTER_R50
    assert body["model"]["arch"] == "faster_rcnn"
    assert body["model"]["provenance"]["source"] == "mmdetection"
    (image,) = body["images"]
    assert (image["width"], image["height"]) == (500, 333)
    assert set(image["timings"]) == {"prepare_ms", "queue_ms", "inference_ms", "encode_ms"}
    assert image["batch_size"] == 1
    assert image["detections"], "the reference weights detect objects in every coco-tiny image"
    assert image["detections"] == expected(FASTER_R50, name)


def test_multi_file_batches_only_equal_padded_shapes(server: LiveServer, expected: Expected) -> None:
    """One request with 4 files: the odd-shaped one runs alone, the three 640x480 ones together."""
    names = [OTHER_SHAPE, *SAME_SHAPE]
    files = [("file", (n, image_bytes(n), "image/jpeg")) for n in names]
    with server.client() as client:
        r = client.post("/v1/detect", files=files)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [im["filename"] for im in images] == names
    assert [im["batch_size"] for im in images] == [1, 3, 3, 3]
    for name, im in zip(names, images, strict=True):
        assert im["detections"] == expected(FASTER_R50, name), name


def test_concurrent_requests_batched_equal_one_by_one(server: LiveServer, expected: Expected) -> None:
    """Single-image requests arriving while a forward pass runs are batched, with unchanged results."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            blocker = asyncio.create_task(client.post("/v1/detect", files={"file": image_bytes(OTHER_SHAPE)}))
            # Wait (bounded) until the blocker's forward pass is running, so the next ones queue up.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = (await client.get("/metrics")).text
                running = metric_value(text, "gnws_in_flight_requests") >= 1
                if running and metric_value(text, "gnws_queue_depth", {"model": FASTER_R50}) == 0:
                    break
                await asyncio.sleep(0.02)
            rest = [client.post("/v1/detect", files={"file": image_bytes(n)}) for n in SAME_SHAPE]
            return list(await asyncio.gather(blocker, *rest))

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for name, r in zip([OTHER_SHAPE, *SAME_SHAPE], responses, strict=True):
        assert r.json()["images"][0]["detections"] == expected(FASTER_R50, name), name
    sizes = [r.json()["images"][0]["batch_size"] for r in responses[1:]]
    assert max(sizes) > 1, f"the three queued same-shape requests were not batched: {sizes}"


def test_segment_equals_predictor_and_masks_decode(server: LiveServer, expected: Expected) -> None:
    name = SAME_SHAPE[0]
    with server.client() as client:
        r = client.post("/v1/segment", files={"file": (name, image_bytes(name), "image/jpeg")},
                        params={"polygons": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == MASK_R50
    dets = body["images"][0]["detections"]
    want = expected(MASK_R50, name)
    assert [{k: v for k, v in d.items() if k != "polygons"} for d in dets] == want
    size = [body["images"][0]["height"], body["images"][0]["width"]]
    assert size == [240, 320]
    assert all(d["segmentation"]["size"] == size for d in dets)
    mask = mask_utils.decode({"size": size, "counts": dets[0]["segmentation"]["counts"].encode()})
    assert mask.shape == (240, 320)
    with_pixels = [d for d in dets if mask_utils.area({"size": size, "counts": d["segmentation"]["counts"]})]
    assert with_pixels
    assert all(d["polygons"] for d in with_pixels)
    assert all(len(poly) >= 6 and len(poly) % 2 == 0 for d in with_pixels for poly in d["polygons"])


def test_png_and_jpeg_responses_decode(server: LiveServer) -> None:
    name = SAME_SHAPE[1]  # 640x480
    with server.client() as client:
        png = client.post("/v1/segment", files={"file": image_bytes(name)}, params={"format": "png"})
        assert png.status_code == 200, png.text
        assert png.headers["content-type"] == "image/png"
        drawn = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
        assert drawn.shape == (480, 640, 3)
        original = np.asarray(Image.open(io.BytesIO(image_bytes(name))).convert("RGB"))
        assert (drawn != original).any(axis=2).mean() > 0.01, "nothing was drawn"
        jpeg = client.post("/detect", content=image_bytes(name), headers={"Content-Type": "image/jpeg"},
                           params={"format": "jpeg", "max_detections": 3})
        assert jpeg.status_code == 200, jpeg.text
        assert jpeg.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (640, 480)


def test_filters_match_filtered_predictor_output(server: LiveServer, expected: Expected) -> None:
    name = SAME_SHAPE[2]
    full = expected(FASTER_R50, name)
    names = sorted({d["category_name"] for d in full})[:2]
    chosen_ids = {d["category_id"] for d in full if d["category_name"] in names}
    params = {"score_threshold": 0.1, "max_detections": 3, "classes": [names[0], str(min(chosen_ids))]}
    with server.client() as client:
        r = client.post("/v1/detect", files={"file": image_bytes(name)}, params=params)
    assert r.status_code == 200, r.text
    got = r.json()["images"][0]["detections"]
    wanted_ids = {next(d["category_id"] for d in full if d["category_name"] == names[0]), min(chosen_ids)}
    passing = [d for d in full if d["score"] >= 0.1 and d["category_id"] in wanted_ids]
    best = sorted(passing, key=lambda d: -d["score"])[:3]
    assert got == [d for d in passing if d in best]
    assert got, "the filter should keep some detections of the image's own classes"


def test_models_listing(server: LiveServer) -> None:
    with server.client() as client:
        r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {FASTER_R50, MASK_R50}
    faster, mask = models[FASTER_R50], models[MASK_R50]
    assert faster["roles"] == ["detect"]
    assert mask["roles"] == ["segment"]
    assert faster["published"] == {"box_ap": ZOO[FASTER_R50].box_ap, "mask_ap": None}
    assert mask["published"] == {"box_ap": ZOO[MASK_R50].box_ap, "mask_ap": ZOO[MASK_R50].mask_ap}
    assert len(faster["classes"]) == 80
    assert faster["category_ids"][-1] == 90
    assert mask["has_masks"]
    assert not faster["has_masks"]
    assert faster["image_scale"] == [512, 320]
    assert faster["baked"] is True
    assert faster["zoo_key"] == FASTER_R50


def test_health_metrics_and_docs(server: LiveServer) -> None:
    with server.client() as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
        assert client.get("/docs").status_code == 200
        spec = client.get("/openapi.json").json()
        page = client.get("/")
    for path in ("/v1/detect", "/v1/segment", "/v1/models", "/v1/models/{name}/reload", "/healthz", "/readyz"):
        assert path in spec["paths"], path
    assert metric_value(text, "gnws_http_requests_total", {"route": "/v1/detect", "status": "200"}) >= 1
    assert metric_value(text, "gnws_http_requests_total", {"route": "/v1/detect", "method": "POST"}) >= 1
    for stage in ("prepare", "queue", "inference", "encode"):
        assert metric_value(text, "gnws_inference_stage_seconds_count", {"model": FASTER_R50, "stage": stage}) >= 1
    assert metric_value(text, "gnws_batch_size_count", {"model": FASTER_R50}) >= 1
    assert metric_value(text, "gnws_batch_size_bucket", {"model": FASTER_R50, "le": "1.0"}) >= 1
    assert "gnws_queue_depth" in text
    assert metric_value(text, "gnws_model_loads_total", {"model": FASTER_R50, "result": "success"}) == 1
    assert metric_value(text, "gnws_ready") == 1
    assert page.status_code == 200
    assert "<canvas" in page.text
    assert "/v1/" in page.text


def test_exif_orientation_applied(server: LiveServer, expected: Expected) -> None:
    """A lossless PNG stored rotated with EXIF orientation 6 gives the upright image's exact detections."""
    name = SAME_SHAPE[1]  # 640x480
    upright = np.asarray(Image.open(io.BytesIO(image_bytes(name))).convert("RGB"))
    stored = np.rot90(upright, k=1)  # orientation 6: shown after a 90° clockwise turn
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="PNG", exif=exif.tobytes())
    with server.client() as client:
        r = client.post("/v1/detect", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert (image["width"], image["height"]) == (640, 480)
    assert image["detections"] == expected(FASTER_R50, name)
