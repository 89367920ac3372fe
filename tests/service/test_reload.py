"""Hot reloads: atomic swap under traffic with zero failed requests; bad checkpoints are refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import FASTER_R50, MASK_R50
from tests.service.conftest import API_KEY, OTHER_SHAPE, LiveServer, image_bytes, metric_value

AUTH = {"X-API-Key": API_KEY}
RELOAD = f"/v1/models/{FASTER_R50}/reload"


def test_reload_needs_the_api_key(server: LiveServer) -> None:
    with server.client() as client:
        missing = client.post(RELOAD)
        wrong = client.post(RELOAD, headers={"X-API-Key": "nope"})
        unknown = client.post("/v1/models/nope/reload", headers=AUTH)
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert unknown.status_code == 404


def before_generation(models: dict[str, Any]) -> int:
    return next(m["generation"] for m in models["models"] if m["name"] == FASTER_R50)


def test_bad_checkpoints_are_refused_and_the_old_model_serves(
    server: LiveServer, model_store: Path, expected: Callable[[str, str], list[dict[str, Any]]]
) -> None:
    (model_store / "garbage.safetensors").write_bytes(b"\x00" * 1000)
    good = (model_store / f"{FASTER_R50}.safetensors").read_bytes()
    (model_store / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    with server.client() as client:
        before = client.get("/v1/models").json()
        cases = {
            "garbage.safetensors": 422,  # not a model file
            "truncated": 422,
            "missing.safetensors": 404,
            "x" * 199: 404,  # within the schema: no such file
            # outside the schema's pattern and length: refused before any lookup (422)
            "../outside.safetensors": 422,
            "/etc/passwd": 422,
            ".": 422,
            "/": 422,
            "": 422,
            "   ": 422,
            "bad\x00name": 422,
            "x" * 300: 422,
        }
        for source, status in cases.items():
            r = client.post(RELOAD, headers=AUTH, json={"source": source})
            assert r.status_code == status, (source, r.text)
            assert r.json()["detail"]
            assert str(model_store) not in r.text, "no server path in what the client sees"
        # A Faster R-CNN checkpoint cannot replace the model behind /v1/segment.
        r = client.post(f"/v1/models/{MASK_R50}/reload", headers=AUTH, json={"source": f"{FASTER_R50}.safetensors",
                                                                          "replace_architecture": True})
        assert r.status_code == 409
        assert "mask" in r.json()["detail"]
        after = client.get("/v1/models").json()
        text = client.get("/metrics").text
    assert after == before  # nothing changed
    assert metric_value(text, "gnws_model_reloads_total", {"model": FASTER_R50, "result": "failure"}) >= 4
    with server.client() as client:  # and the old model still answers
        r = client.post("/v1/detect", content=image_bytes(OTHER_SHAPE), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["generation"] == before_generation(before)
    assert r.json()["images"][0]["detections"] == expected(FASTER_R50, OTHER_SHAPE)


def test_reload_during_traffic_has_zero_failed_requests(
    server: LiveServer, expected: Callable[[str, str], list[dict[str, Any]]]
) -> None:
    """Two clients keep sending while the model is swapped twice (to the Mask R-CNN file and back)."""
    body = image_bytes(OTHER_SHAPE)
    jpeg = {"Content-Type": "image/jpeg"}
    # R-50 Faster and Mask share their box weights; their boxes differ by float rounding only (Mask R-CNN
    # divides by the scale factor where Faster R-CNN multiplies by its inverse), so each response is
    # compared with the predictor of the architecture that answered it.
    want = {
        "faster_rcnn": expected(FASTER_R50, OTHER_SHAPE),
        "mask_rcnn": [{k: v for k, v in d.items() if k != "segmentation"} for d in expected(MASK_R50, OTHER_SHAPE)],
    }

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        responses: list[httpx.Response] = []
        reloads: list[httpx.Response] = []
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def traffic() -> None:
                deadline = time.monotonic() + 240
                sent = 0
                while not done.is_set() and sent < 10 and time.monotonic() < deadline:
                    responses.append(await client.post("/v1/detect", content=body, headers=jpeg))
                    sent += 1
                # one more after both swaps: it must be served by the final model
                responses.append(await client.post("/v1/detect", content=body, headers=jpeg))

            async def swap() -> None:
                await asyncio.sleep(0.3)
                for source in (f"{MASK_R50}.safetensors", f"{FASTER_R50}.safetensors"):
                    reloads.append(await client.post(RELOAD, headers=AUTH,
                                                     json={"source": source, "replace_architecture": True}))
                    assert (await client.get("/healthz")).status_code == 200
                done.set()

            await asyncio.wait_for(asyncio.gather(traffic(), traffic(), swap()), 300)
        return responses, reloads

    responses, reloads = asyncio.run(run())
    assert [r.status_code for r in reloads] == [200, 200], [r.text for r in reloads]
    assert reloads[0].json()["model"]["arch"] == "mask_rcnn"
    assert reloads[1].json()["model"]["arch"] == "faster_rcnn"
    assert reloads[1].json()["previous_generation"] == reloads[0].json()["model"]["generation"]
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text[:200] for r in responses]
    for r in responses:
        assert r.json()["images"][0]["detections"] == want[r.json()["model"]["arch"]]
    assert responses[-1].json()["model"]["arch"] == "faster_rcnn"
    generations = [r.json()["model"]["generation"] for r in responses]
    assert generations[0] == 0
    assert generations[-1] == reloads[1].json()["model"]["generation"], generations
    with server.client() as client:
        final = {m["name"]: m for m in client.get("/v1/models").json()["models"]}[FASTER_R50]
    assert final["arch"] == "faster_rcnn"
    assert final["source"].endswith(f"{FASTER_R50}.safetensors")
