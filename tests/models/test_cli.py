"""The models commands end to end: zoo, convert, bake, predict (JSON + drawing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bake import read_model_info
from tests.conftest import FASTER_R50, IMAGES, MASK_R50, reference
from tests.models.matching import match_detections


def gnws(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GNWS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "gnws.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_zoo_lists_all_twelve_models(tmp_path: Path) -> None:
    proc = gnws("zoo", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 12
    assert {r["name"]: r["box_ap"] for r in rows}[MASK_R50] == 40.6
    assert not any(r["cached"] for r in rows)
    table = gnws("zoo", home=tmp_path).stdout
    assert "mask_rcnn_x101_32x4d_fpn_gn_ws-all_20_23_24e_coco" in table


@pytest.mark.slow
def test_convert_bake_predict_draw(tmp_path: Path, mmdet_checkpoint) -> None:
    home = tmp_path / "home"
    converted = tmp_path / "mask.safetensors"
    proc = gnws("convert", str(mmdet_checkpoint(MASK_R50)), "--model", MASK_R50, "-o", str(converted), home=home)
    assert proc.returncode == 0, proc.stderr
    assert not read_model_info(converted).baked

    proc = gnws("bake", str(converted), home=home)  # default output: the model store
    assert proc.returncode == 0, proc.stderr
    stored = home / "models" / f"{MASK_R50}.safetensors"
    assert read_model_info(stored).baked

    zoo = json.loads(gnws("zoo", "--json", home=home).stdout)
    assert {r["name"]: r["cached"] for r in zoo}[MASK_R50]

    image = IMAGES / "000000020992.jpg"
    out, drawn = tmp_path / "results.json", tmp_path / "drawn.png"
    proc = gnws("predict", str(image), "--model", MASK_R50, "-o", str(out), "--draw", str(drawn), home=home)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == {0}
    assert match_detections(reference(MASK_R50, "000000020992"), results).passes()
    with Image.open(drawn) as im:
        assert im.size == (500, 333)
        original = np.asarray(Image.open(image).convert("RGB"))
        assert (np.asarray(im.convert("RGB")) != original).any(axis=2).mean() > 0.05  # masks/boxes drawn


def test_predict_with_mmdet_checkpoint(tmp_path: Path, mmdet_checkpoint) -> None:
    out = tmp_path / "r.json"
    proc = gnws("predict", str(IMAGES / "000000404484.jpg"), "--model", FASTER_R50,
                "--checkpoint", str(mmdet_checkpoint(FASTER_R50)), "-o", str(out), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert match_detections(reference(FASTER_R50, "000000404484"), results).passes()
    assert all("segmentation" not in r for r in results)


def test_predict_bad_image_is_one_sentence(tmp_path: Path, baked_model) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    proc = gnws("predict", str(bad), "--checkpoint", str(baked_model(FASTER_R50)), home=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a recognised image" in proc.stderr


def test_predict_refuses_unusable_outputs_before_loading(tmp_path: Path) -> None:
    image = str(IMAGES / "000000404484.jpg")
    cases = {
        ("--draw", str(tmp_path / "out.gif")): "name a .png or .jpg file",
        ("-o", str(tmp_path / "no" / "such" / "dir" / "r.json")): "does not exist",
        ("--draw", str(tmp_path / "missing" / "d.png")): "does not exist",
    }
    for extra, message in cases.items():
        # no weights under this GNWS_HOME: the output check must come first
        proc = gnws("predict", image, *extra, home=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = gnws("predict", str(tmp_path / "nope.jpg"), home=tmp_path)
    assert proc.returncode == 2
    assert "no image file at" in proc.stderr
