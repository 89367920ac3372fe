"""Baking: WS folded into plain convs gives the same detections; idempotent; no WS modules left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.bake import bake, bake_file, load_model, read_model_info, save_model
from models.predictor import Predictor
from models.store import convert_checkpoint
from models.ws_conv import WSConv2d, has_ws, standardize_weight
from tests.conftest import FASTER_R50, IMAGES, MASK_R50


def test_standardize_matches_mmcv_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 1
    flat = w.view(8, -1)
    n = flat.size(1)
    mean = flat.mean(1, keepdim=True)
    unbiased_std = ((flat - mean).pow(2).sum(1, keepdim=True) / (n - 1)).sqrt()
    expected = ((flat - mean) / (unbiased_std + 1e-5)).view_as(w)
    assert torch.allclose(standardize_weight(w), expected, atol=1e-12)
    # timm's StdConv2d (biased var, eps inside sqrt) is a different function
    timm_like = ((flat - mean) / ((flat - mean).pow(2).mean(1, keepdim=True) + 1e-5).sqrt()).view_as(w)
    assert not torch.allclose(standardize_weight(w), timm_like, atol=1e-3)


def test_ws_conv_forward_and_plain_conv_agree() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(8, 16, 3, padding=1, groups=2, bias=True)
    x = torch.randn(2, 8, 9, 11)
    plain = conv.to_plain_conv()
    assert type(plain) is nn.Conv2d
    expected = nn.functional.conv2d(x, standardize_weight(conv.weight), conv.bias, padding=1, groups=2)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    assert torch.allclose(plain(x), conv(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stem", [FASTER_R50, MASK_R50])
def test_baked_equals_unbaked(stem: str, mmdet_checkpoint, tmp_path: Path) -> None:
    model, info = convert_checkpoint(mmdet_checkpoint(stem), stem)
    unbaked = Predictor(model=model, info=info, name=stem)
    prepared = unbaked.prepare(IMAGES / "000000020992.jpg")
    before = unbaked.infer([prepared])[0]
    assert has_ws(model)

    path = save_model(model, tmp_path / "unbaked.safetensors", info)
    out = tmp_path / "baked.safetensors"
    baked_info = bake_file(path, out)
    assert baked_info.baked
    baked_model, read_info = load_model(out)
    assert read_info == baked_info
    assert not any(isinstance(m, WSConv2d) for m in baked_model.modules())
    after = Predictor(model=baked_model, info=read_info, name=stem).infer([prepared])[0]

    assert torch.equal(before.labels, after.labels)
    assert (before.boxes - after.boxes).abs().max().item() <= 1e-4
    assert (before.scores - after.scores).abs().max().item() <= 1e-5
    if before.masks is not None and after.masks is not None:
        assert (before.masks ^ after.masks).sum().item() <= 2 * len(before.masks)


def test_baking_twice_is_a_no_op(baked_model, tmp_path: Path) -> None:
    src = baked_model(FASTER_R50)
    model, info = load_model(src)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bake(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = tmp_path / "again.safetensors"
    bake_file(src, again)
    assert read_model_info(again) == info
    model2, _ = load_model(again)
    assert all(torch.equal(state[k], v) for k, v in model2.state_dict().items())
