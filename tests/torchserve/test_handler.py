"""The TorchServe handler in-process, with a stand-in for TorchServe's ``Context``.

The end-to-end test (``test_torchserve.py``) runs it inside real TorchServe workers; these cover
the per-request error paths, the query parameters and the whole response shape quickly, at a small
test scale, against the HTTP service itself (in-process) serving the same baked files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FASTER_R50, IMAGES, MASK_R50
from tests.torchserve.detections import assert_same_detections, assert_same_response, service_client

SCALE = (320, 192)
SAME_SHAPE = ("000000005001", "000000025603")  # both 640x480: one padded shape, one forward pass
OTHER_SHAPE = "000000125952"  # 358x640


class FakeContext:
    """The parts of ``ts.context.Context`` the handler uses, recording per-request statuses."""

    def __init__(self, model_dir: Path, serialized: str, handler_settings: dict[str, Any]) -> None:
        self.model_name = "served-name"
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"modelName": self.model_name, "serializedFile": serialized}}
        self.model_yaml_config = {"batchSize": 8, "handler": handler_settings}
        self.statuses: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


def load_handler(handler_module: ModuleType, weights: Path, model_dir: Path, stem: str, **settings: Any):
    """A handler initialised from a folder laid out like an unpacked archive."""
    (model_dir / "weights.safetensors").symlink_to(weights)
    context = FakeContext(model_dir, "weights.safetensors",
                          {"device": "cpu", "image_scale": list(SCALE), "model_name": stem, **settings})
    handler = handler_module.GnwsHandler()
    handler.initialize(context)
    return handler, context


@pytest.fixture(scope="module")
def loaded(handler_module: ModuleType, baked_model, tmp_path_factory: pytest.TempPathFactory):
    return load_handler(handler_module, baked_model(FASTER_R50), tmp_path_factory.mktemp("unpacked-mar"),
                        FASTER_R50, max_pixels=500_000)


@pytest.fixture(scope="module")
def loaded_mask(handler_module: ModuleType, baked_model, tmp_path_factory: pytest.TempPathFactory):
    return load_handler(handler_module, baked_model(MASK_R50), tmp_path_factory.mktemp("unpacked-mar"), MASK_R50)


@pytest.fixture(scope="module")
def service(baked_model):
    """The HTTP service serving the same baked files at the same scale."""
    with service_client(baked_model(FASTER_R50), baked_model(MASK_R50), SCALE) as client:
        yield client


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_module_has_exactly_one_class(handler_module: ModuleType) -> None:
    """TorchServe refuses a handler module defining more than one class."""
    from ts.utils.util import list_classes_from_module

    assert [c.__name__ for c in list_classes_from_module(handler_module)] == ["GnwsHandler"]


def test_batch_with_bad_requests(loaded) -> None:
    handler, context = loaded
    good = [(IMAGES / f"{i}.jpg").read_bytes() for i in (*SAME_SHAPE, OTHER_SHAPE)]
    data = [
        {"body": good[0]},
        {"data": bytearray(b"\x89PNG\r\n\x1a\n truncated")},
        {"data": bytearray(good[1])},
        {"body": {"image": "base64..."}},  # a JSON body, decoded by TorchServe
        {"file": good[2]},  # a multipart field
        {"body": png_bytes(1000, 1000)},  # 1e6 pixels > max_pixels
        {},
        {"body": good[0], "score_threshold": b"1.5"},  # query parameters arrive as UTF-8 bytes
        {"body": good[0], "classes": b"person,zebraa"},
        {"body": good[0], "model": b"another-model"},
    ]
    context.statuses.clear()
    responses = handler.handle(data, context)

    assert len(responses) == len(data)
    assert context.content_types == dict.fromkeys(range(len(data)), "application/json")
    assert {i: code for i, (code, _) in context.statuses.items()} == {
        1: 400, 3: 400, 5: 413, 6: 400, 7: 422, 8: 422, 9: 404}
    for i in (1, 3, 5, 6, 7, 8, 9):
        assert json.loads(responses[i])["detail"] == context.statuses[i][1]
    assert "not image bytes" in context.statuses[3][1]
    assert "between 0 and 1" in context.statuses[7][1]
    assert "Did you mean zebra?" in context.statuses[8][1]
    assert "/predictions/another-model" in context.statuses[9][1]

    # The handler's own predictor, called the plain way: one predict() over the good images.
    reference = handler.predictor
    assert (reference.info.config.max_size, reference.info.config.min_size) == SCALE
    assert reference.max_pixels == 500_000
    want = reference.predict(good)
    for i, image_bytes, expected, forward in zip((0, 2, 4), good, want, (2, 2, 1), strict=True):
        body = json.loads(responses[i])
        assert body["model"]["name"] == FASTER_R50
        assert body["model"]["arch"] == "faster_rcnn"
        assert None not in body["model"].values(), "null fields are left out, as the service does"
        (image,) = body["images"]
        width, height = Image.open(io.BytesIO(image_bytes)).size
        assert (image["width"], image["height"]) == (width, height)
        assert image["batch_size"] == forward
        assert set(image["timings"]) == {"prepare_ms", "queue_ms", "inference_ms", "encode_ms"}
        assert expected, "the reference weights give detections"
        assert_same_detections(image["detections"], expected)


def test_all_bad_batch_runs_no_inference(loaded) -> None:
    handler, context = loaded
    context.statuses.clear()
    responses = handler.handle([{"body": b""}, {"body": b"nope"}], context)
    assert [context.statuses[i][0] for i in range(2)] == [400, 400]
    assert "empty" in json.loads(responses[0])["detail"]


def test_settings_parsing() -> None:
    from gnws.torchserve import handler

    assert handler.parse_image_scale(None) is None
    assert handler.parse_image_scale([640, 384]) == (640, 384)
    with pytest.raises(ValueError, match="max_size, min_size"):
        handler.parse_image_scale("640,384")
    assert handler.resolve_device("auto", None) == "cpu"
    assert handler.resolve_device("cuda:1", None) == "cuda:1"


def test_archive_without_serialized_file_is_refused(handler_module: ModuleType, tmp_path: Path) -> None:
    from models import GnwsError

    context = FakeContext(tmp_path, "", {})
    context.manifest = {"model": {"modelName": "x"}}
    with pytest.raises(GnwsError, match="gnws archive"):
        handler_module.GnwsHandler().initialize(context)


def handler_answer(handler, context, image: bytes, query: dict[str, str]) -> tuple[int, str, Any]:
    """``(status, content type, body)`` of one request, with the query parameters as TorchServe passes them."""
    context.statuses.clear()
    (body,) = handler.handle([{"body": image, **{k: v.encode() for k, v in query.items()}}], context)
    status = context.statuses.get(0, (200, ""))[0]
    media_type = context.content_types[0]
    return status, media_type, json.loads(body) if media_type == "application/json" else body


@pytest.mark.parametrize("image_id", [OTHER_SHAPE, SAME_SHAPE[0]])
@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_responses_equal_the_service(loaded, loaded_mask, service, kind: str, image_id: str) -> None:
    """The whole JSON body, field for field, with and without each query parameter."""
    handler, context = loaded if kind == "detect" else loaded_mask
    image = (IMAGES / f"{image_id}.jpg").read_bytes()

    def both(query: dict[str, str]) -> tuple[dict, dict]:
        want = service.post(f"/v1/{kind}", params=query, content=image, headers={"Content-Type": "image/jpeg"})
        assert want.status_code == 200, want.text
        status, media_type, got = handler_answer(handler, context, image, query)
        assert (status, media_type) == (200, "application/json"), got
        assert_same_response(got, want.json())
        return got, want.json()

    plain, _ = both({})
    detections = plain["images"][0]["detections"]
    assert len(detections) >= 3, "the reference weights give enough detections to filter"
    assert {"zoo_key", "source_sha256"} <= plain["model"].keys(), plain["model"]
    assert plain["model"]["provenance"], "provenance from the baked file's metadata"
    assert "filename" not in plain["images"][0]
    assert all(("segmentation" in d) == (kind == "segment") for d in detections)

    scores = sorted(d["score"] for d in detections)
    threshold = round(scores[len(scores) // 2], 4)
    got, _ = both({"score_threshold": str(threshold)})
    assert 0 < len(got["images"][0]["detections"]) < len(detections)
    got, _ = both({"max_detections": "2"})
    assert len(got["images"][0]["detections"]) == 2
    first, other = detections[0], next(d for d in detections if d["category_id"] != detections[0]["category_id"])
    classes = f"{first['category_name'].upper()},{other['category_id']}"  # names (any case) and COCO ids
    got, _ = both({"classes": classes, "score_threshold": "0", "max_detections": "1000"})
    assert {d["category_id"] for d in got["images"][0]["detections"]} == {first["category_id"], other["category_id"]}
    if kind == "segment":
        got, _ = both({"polygons": "true", "max_detections": "3"})
        assert all(d["polygons"] for d in got["images"][0]["detections"])


@pytest.mark.parametrize(("query", "status"), [
    ({"score_threshold": "-0.1"}, 422),
    ({"max_detections": "1001"}, 422),
    ({"max_detections": "two"}, 422),
    ({"classes": "no-such-class"}, 422),
    ({"format": "gif"}, 422),
    ({"polygons": "maybe"}, 422),
    ({"model": "no-such-model"}, 404),
])
def test_bad_parameters_get_the_services_status(loaded_mask, service, query: dict[str, str], status: int) -> None:
    handler, context = loaded_mask
    image = (IMAGES / f"{OTHER_SHAPE}.jpg").read_bytes()
    want = service.post("/v1/segment", params=query, content=image, headers={"Content-Type": "image/jpeg"})
    got_status, media_type, body = handler_answer(handler, context, image, query)
    assert (got_status, want.status_code) == (status, status), (body, want.text)
    assert media_type == "application/json"
    assert isinstance(body["detail"], str)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_drawn_image_formats(loaded_mask, service, fmt: str) -> None:
    handler, context = loaded_mask
    image = (IMAGES / f"{OTHER_SHAPE}.jpg").read_bytes()
    want = service.post("/v1/segment", params={"format": fmt}, content=image, headers={"Content-Type": "image/jpeg"})
    status, media_type, body = handler_answer(handler, context, image, {"format": fmt})
    assert (status, media_type) == (200, want.headers["content-type"]) == (200, f"image/{fmt}")
    drawn, reference = Image.open(io.BytesIO(body)), Image.open(io.BytesIO(want.content))
    assert (drawn.format, drawn.size) == (reference.format, reference.size) == (fmt.upper(), (358, 640))
    if fmt == "png":  # lossless: the same detections drawn the same way
        assert np.array_equal(np.asarray(drawn), np.asarray(reference))
