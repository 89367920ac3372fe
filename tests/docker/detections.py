"""Comparing detections from two serving paths that run the same predictor code."""

from __future__ import annotations

import numpy as np

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
