"""The Open Inference Protocol v2 routes, driven by Triton's own HTTP client (``tritonclient``).

The client is a real third-party one (it speaks the protocol as Triton and KServe servers
expect); what it gets must equal ``/v1``'s detections for the same images and weights.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import FASTER_R50, MASK_R50
from tests.service.conftest import OTHER_SHAPE, SAME_SHAPE, LiveServer, image_bytes, metric_value

httpclient = pytest.importorskip("tritonclient.http", reason="pip install -e '.[dev]' (tritonclient[http])")
from tritonclient.utils import InferenceServerException  # noqa: E402

IMAGES = (SAME_SHAPE[0], OTHER_SHAPE)


@pytest.fixture(scope="module")
def triton(server: LiveServer):
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


def image_input(names: tuple[str, ...]):
    """The images as a BYTES tensor in binary form (JPEG bytes are not UTF-8, so JSON cannot carry them)."""
    tensor = httpclient.InferInput("IMAGE", [len(names)], "BYTES")
    tensor.set_data_from_numpy(np.array([image_bytes(n) for n in names], dtype=np.object_), binary_data=True)
    return tensor


def v1(server: LiveServer, route: str, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    with server.client() as client:
        r = client.post(f"/v1/{route}", content=image_bytes(name), headers={"Content-Type": "image/jpeg"},
                        params=params)
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def assert_equals_v1(result, i: int, image: dict[str, Any], *, masks: bool) -> None:
    """Image ``i`` of a v2 result holds exactly ``/v1``'s detections of the same image."""
    dets = image["detections"]
    n = int(result.as_numpy("num_detections")[i])
    assert n == len(dets) > 0
    np.testing.assert_allclose(result.as_numpy("boxes")[i, :n], [d["bbox_xyxy"] for d in dets], rtol=0, atol=1e-3)
    np.testing.assert_allclose(result.as_numpy("scores")[i, :n], [d["score"] for d in dets], rtol=0, atol=1e-5)
    assert result.as_numpy("category_ids")[i, :n].tolist() == [d["category_id"] for d in dets]
    names = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("category_names")[i, :n]]
    assert names == [d["category_name"] for d in dets]
    assert result.as_numpy("image_sizes")[i].tolist() == [image["height"], image["width"]]
    if masks:
        rles = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("masks_rle")[i, :n]]
        assert rles == [d["segmentation"]["counts"] for d in dets]


def test_health_and_metadata(triton, server: LiveServer) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(FASTER_R50)
    assert triton.is_model_ready(FASTER_R50, "1")
    assert not triton.is_model_ready("no-such-model")
    assert not triton.is_model_ready(FASTER_R50, "7")
    assert triton.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = triton.get_model_metadata(FASTER_R50)
    assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "num_detections": "INT32", "boxes": "FP32", "scores": "FP32", "category_ids": "INT32",
        "category_names": "BYTES", "image_sizes": "INT32"}
    assert "masks_rle" in {o["name"] for o in triton.get_model_metadata(MASK_R50)["outputs"]}
    with server.client() as client:  # KServe's health bodies (its client reads them)
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("binary_output", [True, False])
def test_batch_of_images_equals_v1(triton, server: LiveServer, binary_output: bool) -> None:
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_output)
               for n in ("num_detections", "boxes", "scores", "category_ids", "category_names", "image_sizes")]
    result = triton.infer(FASTER_R50, [image_input(IMAGES)], outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (FASTER_R50, "1", "r-1")
    for i, name in enumerate(IMAGES):
        assert_equals_v1(result, i, v1(server, "detect", name), masks=False)
    k = result.as_numpy("boxes").shape[1]
    assert k == max(result.as_numpy("num_detections")), "padded to the batch's largest count"


def test_mask_model_returns_the_same_masks_as_segment(triton, server: LiveServer) -> None:
    result = triton.infer(MASK_R50, [image_input((OTHER_SHAPE,))], parameters={"max_detections": 5})
    assert_equals_v1(result, 0, v1(server, "segment", OTHER_SHAPE, {"max_detections": 5}), masks=True)


def test_parameters_filter_as_on_v1(triton, server: LiveServer) -> None:
    params = {"score_threshold": 0.3, "max_detections": 3, "classes": "person,3"}
    result = triton.infer(FASTER_R50, [image_input((OTHER_SHAPE,))], parameters=params)
    want = v1(server, "detect", OTHER_SHAPE, {"score_threshold": 0.3, "max_detections": 3, "classes": "person,3"})
    n = int(result.as_numpy("num_detections")[0])
    assert n == len(want["detections"])
    assert result.as_numpy("category_ids")[0, :n].tolist() == [d["category_id"] for d in want["detections"]]


def test_compressed_requests(server: LiveServer) -> None:
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)
    try:
        result = client.infer(FASTER_R50, [image_input((OTHER_SHAPE,))], request_compression_algorithm="gzip")
    finally:
        client.close()
    assert_equals_v1(result, 0, v1(server, "detect", OTHER_SHAPE), masks=False)


@pytest.mark.parametrize(("call", "status", "text"), [
    (lambda t: t.infer("no-such-model", [image_input((OTHER_SHAPE,))]), "404", "no-such-model"),
    (lambda t: t.get_model_metadata("no-such-model"), "404", "no-such-model"),
    (lambda t: t.infer(FASTER_R50, [image_input((OTHER_SHAPE,))], parameters={"score_threshold": 2.0}), "422",
     "between 0 and 1"),
    (lambda t: t.infer(FASTER_R50, [image_input((OTHER_SHAPE,))], parameters={"classes": "zebraa"}), "422",
     "zebra"),
    (lambda t: t.infer(FASTER_R50, [image_input((OTHER_SHAPE,))], model_version="3"), "404", "version 3"),
    (lambda t: t.infer(FASTER_R50, [image_input((OTHER_SHAPE,))],
                       outputs=[httpclient.InferRequestedOutput("nope")]), "400", "unknown outputs"),
    (lambda t: t.get_model_config(FASTER_R50), "404", "Not Found"),
])
def test_errors_reach_the_client_as_protocol_errors(triton, call, status: str, text: str) -> None:
    with pytest.raises(InferenceServerException) as exc:
        call(triton)
    assert exc.value.status() == status
    assert text in exc.value.message()


def raw_infer(server: LiveServer, body: bytes, headers: dict[str, str]) -> httpx.Response:
    with server.client() as client:
        return client.post(f"/v2/models/{FASTER_R50}/infer", content=body, headers=headers)


def test_json_requests_and_malformed_bodies(server: LiveServer) -> None:
    image = base64.b64encode(image_bytes(OTHER_SHAPE)).decode()
    ok = raw_infer(server, json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                                   "data": [image]}]}).encode(), {})
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in ok.json()["outputs"]}
    assert outputs["num_detections"]["data"] == [len(v1(server, "detect", OTHER_SHAPE)["detections"])]

    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    blob = struct.pack("<I", 96) + b"\x00" * 96
    cases = {
        "not json": (b"{nope", {}),
        "no inputs": (b"{}", {}),
        "wrong input": (json.dumps({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [1]}]})
                        .encode(), {}),
        "bad base64": (json.dumps({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                               "data": ["%%%"]}]}).encode(), {}),
        "header past the body": (header, {"Inference-Header-Content-Length": "99999"}),
        "short binary": (header + blob[:50], {"Inference-Header-Content-Length": str(len(header))}),
        "not an image": (header + blob, {"Inference-Header-Content-Length": str(len(header))}),
        "bad gzip": (b"\x1f\x8b nope", {"Content-Encoding": "gzip"}),
        "zip bomb": (gzip.compress(b"\x00" * (3 * 1024 * 1024)), {"Content-Encoding": "gzip"}),
    }
    for case, (body, headers) in cases.items():
        r = raw_infer(server, body, headers)
        assert r.status_code in (400, 413), (case, r.status_code, r.text)
        assert set(r.json()) == {"error"}, (case, r.text)
    with server.client() as client:
        assert set(client.get("/v2/nowhere").json()) == {"error"}
        assert client.delete(f"/v2/models/{FASTER_R50}/infer").status_code == 405
        text = client.get("/metrics").text
    assert metric_value(text, "gnws_http_requests_total", {"route": "/v2/models/{name}/infer", "status": "200"}) >= 1
