"""The TorchServe handler in-process, with a stand-in for TorchServe's ``Context``.

The end-to-end test (``test_torchserve.py``) runs it inside real TorchServe workers; these cover
the per-request error paths and the response shape quickly, at a small test scale.
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

from tests.conftest import FASTER_R50, IMAGES
from tests.docker.detections import assert_same_detections

SCALE = (320, 192)
SAME_SHAPE = ("000000404484", "000000005001")  # 640x480: one forward pass
OTHER_SHAPE = "000000125952"


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


@pytest.fixture(scope="module")
def loaded(handler_module: ModuleType, baked_model, tmp_path_factory: pytest.TempPathFactory):
    """A handler initialised from a folder laid out like an unpacked archive."""
    model_dir = tmp_path_factory.mktemp("unpacked-mar")
    (model_dir / "weights.safetensors").symlink_to(baked_model(FASTER_R50))
    settings = {"device": "cpu", "image_scale": list(SCALE), "max_pixels": 500_000, "model_name": FASTER_R50}
    context = FakeContext(model_dir, "weights.safetensors", settings)
    handler = handler_module.GnwsHandler()
    handler.initialize(context)
    return handler, context


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
    ]
    context.statuses.clear()
    responses = handler.handle(data, context)

    assert len(responses) == len(data)
    assert context.content_types == dict.fromkeys(range(len(data)), "application/json")
    assert {i: code for i, (code, _) in context.statuses.items()} == {1: 400, 3: 400, 5: 413, 6: 400}
    for i in (1, 3, 5, 6):
        assert json.loads(responses[i])["detail"] == context.statuses[i][1]
    assert "not image bytes" in context.statuses[3][1]

    # The handler's own predictor, called the plain way: one predict() over the good images.
    reference = handler.predictor
    assert (reference.info.config.max_size, reference.info.config.min_size) == SCALE
    assert reference.max_pixels == 500_000
    want = reference.predict(good)
    for i, image_bytes, expected, forward in zip((0, 2, 4), good, want, (2, 2, 1), strict=True):
        body = json.loads(responses[i])
        assert body["model"]["name"] == FASTER_R50
        assert body["model"]["arch"] == "faster_rcnn"
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


def test_settings_parsing(handler_module: ModuleType) -> None:
    assert handler_module.parse_image_scale(None) is None
    assert handler_module.parse_image_scale([640, 384]) == (640, 384)
    with pytest.raises(ValueError, match="max_size, min_size"):
        handler_module.parse_image_scale("640,384")
    assert handler_module.resolve_device("auto", None) == "cpu"
    assert handler_module.resolve_device("cuda:1", None) == "cuda:1"


def test_archive_without_serialized_file_is_refused(handler_module: ModuleType, tmp_path: Path) -> None:
    from models import GnwsError

    context = FakeContext(tmp_path, "", {})
    context.manifest = {"model": {"modelName": "x"}}
    with pytest.raises(GnwsError, match="gnws archive"):
        handler_module.GnwsHandler().initialize(context)
