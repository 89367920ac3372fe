"""Shared test fixtures: reference weights generated from the rule in ``fixtures/make_weights.py``.

Weights are generated once per session (digest-checked against ``manifests/digests.json``) and
converted/baked with the project's own converter, as a real zoo ``.pth`` would be.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FASTER_R50 = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco"
MASK_R50 = "mask_rcnn_r50_fpn_gn_ws-all_2x_coco"
REFERENCE_IMAGES = ("000000125952", "000000166918", "000000417285", "000000404484", "000000010764", "000000020992")


def _load_make_weights():
    spec = importlib.util.spec_from_file_location("make_weights", FIXTURES / "make_weights.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_weights = _load_make_weights()


def manifest(stem: str) -> list:
    return json.loads((FIXTURES / "manifests" / f"{stem}.json").read_text())


def reference(stem: str, image_id: str) -> dict:
    return json.loads((FIXTURES / "reference" / stem / f"{image_id}.json").read_text())


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mmdet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``stem -> path`` of an mmdetection-style ``.pth`` made by ``make_weights`` (digest-checked)."""
    root = tmp_path_factory.mktemp("mmdet_ckpt")
    digests = json.loads((FIXTURES / "manifests" / "digests.json").read_text())

    def make(stem: str) -> Path:
        path = root / f"{digests[stem][:16]}.pth"  # the 2x and 20-23-24e manifests are identical
        if not path.exists():
            sd = make_weights.make_state_dict(manifest(stem))
            if make_weights.digest(sd) != digests[stem]:
                pytest.fail(f"generated weights for {stem} differ from the reference digest; torch's randn changed?")
            make_weights.save_checkpoint(sd, path)
        return path

    return make


@pytest.fixture(scope="session")
def baked_model(
    tmp_path_factory: pytest.TempPathFactory, mmdet_checkpoint: Callable[[str], Path]
) -> Callable[[str], Path]:
    """``stem -> path`` of a baked gnws ``.safetensors`` converted from the reference weights."""
    from models.bake import baked, save_model
    from models.store import convert_checkpoint

    root = tmp_path_factory.mktemp("baked")

    def make(stem: str) -> Path:
        path = root / f"{stem}.safetensors"
        if not path.exists():
            model, info = baked(*convert_checkpoint(mmdet_checkpoint(stem), stem))
            save_model(model, path, info)
        return path

    return make


@pytest.fixture(scope="session")
def predictor_for(baked_model: Callable[[str], Path]):
    """``stem -> Predictor`` (CPU, baked reference weights), cached per session."""
    from models.predictor import Predictor

    cache: dict[str, Predictor] = {}

    def make(stem: str) -> Predictor:
        if stem not in cache:
            cache[stem] = Predictor.load(baked_model(stem), device="cpu", model_name=stem)
        return cache[stem]

    return make
