"""Request parameters: one definition of their limits, parsed alike from every transport."""

from __future__ import annotations

import pytest

from gnws.request import InvalidParameterError, RequestParams, status_for


def test_text_fields_as_torchserve_sends_them() -> None:
    params = RequestParams.from_fields({"score_threshold": b"0.25", "max_detections": b"7", "classes": b"person,3",
                                        "format": b"PNG", "polygons": b"yes", "model": b" m "})
    assert params == RequestParams(model="m", score_threshold=0.25, max_detections=7, classes=("person,3",),
                                   format="png", polygons=True)


def test_json_values_as_the_open_inference_protocol_sends_them() -> None:
    params = RequestParams.from_fields({"score_threshold": 0.5, "max_detections": 3, "classes": ["dog", "cat"],
                                        "polygons": False})
    assert params == RequestParams(score_threshold=0.5, max_detections=3, classes=("dog", "cat"))
    assert RequestParams.from_fields({}) == RequestParams()
    assert RequestParams.from_fields({"score_threshold": "", "model": ""}) == RequestParams()
    assert RequestParams.from_fields({"max_detections": 3.0}).max_detections == 3  # JSON says 3.0 is an integer


@pytest.mark.parametrize(("fields", "message"), [
    ({"score_threshold": b"1.5"}, "between 0 and 1"),
    ({"score_threshold": "nan"}, "between 0 and 1"),
    ({"score_threshold": True}, "expected a number"),
    ({"max_detections": b"1001"}, "between 0 and 1000"),
    ({"max_detections": 2.5}, "an integer"),
    ({"max_detections": b"two"}, "an integer"),
    ({"format": b"gif"}, "json, png, jpeg"),
    ({"polygons": b"maybe"}, "true or false"),
    ({"classes": "a\x00b"}, "control characters"),
    ({"classes": "person,,car"}, "an empty class name"),
    ({"classes": ["dog", " "]}, "an empty class name"),
    ({"classes": "x" * 3000}, "at most 2048"),
    ({"model": b"\xff"}, "UTF-8"),
])
def test_bad_values_are_422s(fields: dict, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message) as exc:
        RequestParams.from_fields(fields)
    assert status_for(exc.value) == 422
