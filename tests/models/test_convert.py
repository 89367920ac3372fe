"""Strict conversion of mmdetection checkpoints: all 12 manifests, class layout, clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.bake import ModelInfo, read_model_info, save_model
from models.config import COCO_CATEGORY_IDS, COCO_CLASSES
from models.errors import CheckpointError, ConversionError
from models.mmdet_convert import convert_mmdet_state_dict, map_mmdet_key, read_mmdet_checkpoint
from models.preprocess import PreparedImage
from models.store import convert_checkpoint
from models.zoo import ZOO
from tests.conftest import FASTER_R50, make_weights, manifest


class Evil:
    """Any non-allow-listed class: full unpickling would run arbitrary code."""


def _tiny_batch() -> tuple[torch.Tensor, list[PreparedImage]]:
    torch.manual_seed(0)
    image = torch.randn(3, 96, 128)
    meta = PreparedImage(image_chw=image, ori_shape=(48, 64), img_shape=(96, 128), pad_shape=(96, 128),
                         scale_factor=(2.0, 2.0))
    return image[None], [meta]


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(ZOO))
def test_every_zoo_manifest_converts_strictly_and_runs(stem: str, mmdet_checkpoint) -> None:
    entry = ZOO[stem]
    model, info = convert_checkpoint(mmdet_checkpoint(stem), stem)
    assert info.config == entry.config  # COCO classes/ids carried along
    assert len(model.state_dict()) == len(manifest(stem))
    images, metas = _tiny_batch()
    (out,) = model(images, metas)
    assert out["boxes"].shape[1] == 4
    assert out["scores"].dim() == 1
    assert ("masks" in out) == entry.config.has_mask


def test_class_layout_background_moves_to_index_zero(mmdet_checkpoint) -> None:
    src = torch.load(mmdet_checkpoint(FASTER_R50), weights_only=True)["state_dict"]
    converted = convert_mmdet_state_dict(src, ZOO[FASTER_R50].config)
    cls_w = converted["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls_w[0], src["roi_head.bbox_head.fc_cls.weight"][80])
    assert torch.equal(cls_w[1:], src["roi_head.bbox_head.fc_cls.weight"][:80])
    reg = converted["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.count_nonzero(reg[:4]) == 0
    assert torch.equal(reg[4:], src["roi_head.bbox_head.fc_reg.weight"])
    ckpt = read_mmdet_checkpoint(mmdet_checkpoint(FASTER_R50))
    assert ckpt.classes == COCO_CLASSES
    assert ZOO[FASTER_R50].config.category_ids == COCO_CATEGORY_IDS


def test_every_manifest_key_has_exactly_one_rule() -> None:
    for stem in ZOO:
        targets = [map_mmdet_key(k) for k, _ in manifest(stem)]
        assert None not in targets, stem
        assert len(set(targets)) == len(targets), stem


def test_conversion_error_lists_every_offender() -> None:
    sd = make_weights.make_state_dict(manifest(FASTER_R50))
    sd.pop("neck.fpn_convs.2.gn.bias")
    sd["backbone.layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    sd["roi_head.bbox_head.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as info:
        convert_mmdet_state_dict(sd, ZOO[FASTER_R50].config)
    text = str(info.value)
    assert "3 problems" in text
    assert "backbone.fpn.layer_blocks.2.1.bias" in text
    assert "shape mismatch for backbone.layer1.0.conv2.weight" in text
    assert "unexpected source key roi_head.bbox_head.extra.weight" in text


def test_wrong_architecture_is_refused(mmdet_checkpoint) -> None:
    with pytest.raises(ConversionError, match="problems"):
        convert_checkpoint(mmdet_checkpoint(FASTER_R50), "mask_rcnn_r101_fpn_gn_ws-all_2x_coco")


def test_bad_files_give_clear_errors(tmp_path: Path, mmdet_checkpoint) -> None:
    good = mmdet_checkpoint(FASTER_R50).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 3])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 100)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, foreign)
    plain = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, plain)

    pickled = tmp_path / "pickled.pth"
    torch.save({"meta": {"obj": Evil()}, "state_dict": {}}, pickled)  # a class weights_only refuses

    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_mmdet_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_mmdet_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not an mmdetection checkpoint"):
        read_mmdet_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="unsafe to load"):
        read_mmdet_checkpoint(pickled)
    with pytest.raises(ConversionError, match="0/207 keys filled"):
        convert_checkpoint(plain, FASTER_R50)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_mmdet_checkpoint(tmp_path / "missing.pth")
    mixed = tmp_path / "mixed.pth"
    torch.save({1: "one", "two": 2}, mixed)  # keys that do not sort together
    with pytest.raises(CheckpointError, match="not an mmdetection checkpoint"):
        read_mmdet_checkpoint(mixed)


def test_only_the_named_models_published_file_is_unpickled_fully(tmp_path: Path) -> None:
    """The unsafe-pickle fallback needs the sha256 prefix of the model being converted, not any zoo hash."""
    pickled = tmp_path / "pickled.pth"
    torch.save({"meta": {"obj": Evil()}, "state_dict": {}}, pickled)
    own_prefix = hashlib.sha256(pickled.read_bytes()).hexdigest()[:8]
    with pytest.raises(CheckpointError, match="unsafe to load"):
        read_mmdet_checkpoint(pickled, trusted_sha256_prefix=ZOO[FASTER_R50].sha256_prefix)
    assert read_mmdet_checkpoint(pickled, trusted_sha256_prefix=own_prefix).state_dict == {}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign"])
def test_cli_convert_bad_file_is_one_sentence(tmp_path: Path, kind: str, mmdet_checkpoint) -> None:
    src = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        src.write_bytes(mmdet_checkpoint(FASTER_R50).read_bytes()[:100_000])
    elif kind == "garbage":
        src.write_bytes(b"\x00\x01garbage" * 50)
    else:
        torch.save({"weights": [1, 2, 3]}, src)
    proc = subprocess.run(
        [sys.executable, "-m", "gnws.cli", "convert", str(src), "--model", FASTER_R50, "-o", str(tmp_path / "o.st")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("gnws convert: error:")
    assert not (tmp_path / "o.st").exists()


def test_converted_file_carries_metadata(tmp_path: Path, mmdet_checkpoint) -> None:
    model, info = convert_checkpoint(mmdet_checkpoint(FASTER_R50), FASTER_R50)
    out = save_model(model, tmp_path / "m.safetensors", info)
    read = read_model_info(out)
    assert read == info
    assert read.zoo_key == FASTER_R50
    assert not read.baked
    assert read.source_sha256
    assert len(read.source_sha256) == 64
    assert json.loads(json.dumps(read.provenance))["mmdet_config"].endswith("faster-rcnn_r50_fpn_gn-ws-all_1x_coco.py")
    with pytest.raises(ValueError, match="baked"):
        save_model(model, tmp_path / "x.safetensors", ModelInfo(config=info.config, baked=True))
