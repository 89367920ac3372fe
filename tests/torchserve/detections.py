"""Comparing answers from two serving paths that run the same predictor code (the HTTP service is the reference)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from tests.models.matching import decode_rle

SCORE_TOL = 1e-5
BOX_TOL_PX = 1e-3
MASK_XOR_PX = 2


def assert_same_detections(got: list[dict], want: list[dict]) -> None:
    """Same detections in the same order: equal categories, scores within 1e-5, boxes within 1e-3 px,
    masks identical up to 2 differing pixels."""
    assert len(got) == len(want), f"{len(got)} detections, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["category_id"] == w["category_id"], f"#{i}: category {g['category_id']} != {w['category_id']}"
        assert g["category_name"] == w["category_name"]
        assert abs(g["score"] - w["score"]) <= SCORE_TOL, f"#{i}: score {g['score']} != {w['score']}"
        for key in ("bbox", "bbox_xyxy"):
            np.testing.assert_allclose(g[key], w[key], atol=BOX_TOL_PX, rtol=0, err_msg=f"#{i} {key}")
        assert ("segmentation" in g) == ("segmentation" in w), f"#{i}: masks present in one result only"
        if "segmentation" in w:
            assert g["segmentation"]["size"] == w["segmentation"]["size"]
            if g["segmentation"]["counts"] != w["segmentation"]["counts"]:
                a, b = decode_rle(g["segmentation"]).astype(bool), decode_rle(w["segmentation"]).astype(bool)
                xor = int((a ^ b).sum())
                assert xor <= MASK_XOR_PX, f"#{i}: masks differ in {xor} pixels"


# Fields whose values depend on timing or on how requests were grouped, not on the model.
VOLATILE_IMAGE_FIELDS = ("timings", "batch_size")


def assert_same_response(got: dict, want: dict, *, compare_batch_size: bool = True) -> None:
    """The whole ``DetectResponse`` of one image: the same keys everywhere, the same model summary
    (provenance included), the same image fields, timings keys and detections (with the same keys)."""
    assert got.keys() == want.keys(), f"top-level keys {sorted(got)} != {sorted(want)}"
    assert got["model"] == want["model"]
    (g,), (w,) = got["images"], want["images"]
    assert g.keys() == w.keys(), f"image keys {sorted(g)} != {sorted(w)}"
    assert g["timings"].keys() == w["timings"].keys()
    skip = {"detections", *(VOLATILE_IMAGE_FIELDS if not compare_batch_size else ("timings",))}
    assert {k: v for k, v in g.items() if k not in skip} == {k: v for k, v in w.items() if k not in skip}
    got_keys, want_keys = [sorted(d) for d in g["detections"]], [sorted(d) for d in w["detections"]]
    assert got_keys == want_keys, f"detection keys {got_keys[:3]}... != {want_keys[:3]}... ({len(g['detections'])} vs "\
        f"{len(w['detections'])} detections)"
    assert_same_detections(g["detections"], w["detections"])
    for i, (gd, wd) in enumerate(zip(g["detections"], w["detections"], strict=True)):
        if "polygons" in wd and gd["segmentation"] == wd["segmentation"]:
            assert gd["polygons"] == wd["polygons"], f"#{i}: polygons differ for the same mask"


@contextmanager
def service_client(detect_model: Path, segment_model: Path, image_scale: tuple[int, int]) -> Iterator[TestClient]:
    """The HTTP service (``service.app``) in-process with these baked files at this scale, once ready:
    the reference the TorchServe handler's answers are compared with."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(detect_model=str(detect_model), segment_model=str(segment_model), extra_models=[],
                        device="cpu", image_scale=image_scale, model_store=detect_model.parent, warmup=False,
                        api_key=None, max_batch_delay_ms=0)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service did not get ready: {client.get('/readyz').text}")
            time.sleep(0.2)
        yield client
