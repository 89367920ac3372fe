"""Baking WS convs into plain convs, and the ``.safetensors`` model format.

Baking replaces every :class:`~models.ws_conv.WSConv2d` by an ``nn.Conv2d`` holding the
standardised kernel (computed once in float32 with mmcv's formula). This is valid for inference
only (WeightStandardization issue #5). A model file is a ``.safetensors`` state dict whose
metadata holds ``gnws_format``, the architecture config (classes and category ids included),
``baked``, the zoo key and the sha256 of the source checkpoint, and free-form provenance JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .config import DetectorConfig, config_from_json, config_to_json
from .detector import GNWSDetector, build_detector
from .errors import CheckpointError
from .files import atomic_write_bytes
from .ws_conv import WSConv2d

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a model file.

    Attributes:
        config: architecture and label space.
        baked: whether WS is already folded into the conv weights.
        zoo_key: zoo key the weights came from (or were fine-tuned from), if any.
        source_sha256: sha256 of the checkpoint the weights were converted from, if any.
        provenance: free-form JSON (training data, schedule, AP, ...).
    """

    config: DetectorConfig
    baked: bool
    zoo_key: str | None = None
    source_sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "gnws_format": FORMAT_VERSION,
            "config": config_to_json(self.config),
            "baked": "true" if self.baked else "false",
            "provenance": json.dumps(self.provenance, sort_keys=True),
        }
        if self.zoo_key:
            meta["zoo_key"] = self.zoo_key
        if self.source_sha256:
            meta["source_sha256"] = self.source_sha256
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, path: Path) -> ModelInfo:
        if not meta or "gnws_format" not in meta:
            raise CheckpointError(
                f"{path} is a safetensors file but not a gnws model (no 'gnws_format' metadata); "
                "make one with `gnws convert` or `gnws export`"
            )
        if meta["gnws_format"] != FORMAT_VERSION:
            raise CheckpointError(f"{path} has gnws_format {meta['gnws_format']}; this gnws reads {FORMAT_VERSION}")
        try:
            config = config_from_json(meta["config"])
            provenance = json.loads(meta.get("provenance", "{}"))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path} has unreadable gnws metadata: {exc}") from None
        return cls(
            config=config,
            baked=meta.get("baked") == "true",
            zoo_key=meta.get("zoo_key"),
            source_sha256=meta.get("source_sha256"),
            provenance=provenance,
        )


def bake(model: GNWSDetector) -> GNWSDetector:
    """Replace every WS conv by a plain conv with the standardised kernel, in place.

    Baking a baked model changes nothing. Returns ``model``.
    """
    _bake_children(model)
    return model


def _bake_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, WSConv2d):
            setattr(module, name, child.to_plain_conv())
        else:
            _bake_children(child)


def baked(model: GNWSDetector, info: ModelInfo) -> tuple[GNWSDetector, ModelInfo]:
    """:func:`bake` ``model`` in place and return it with ``info`` marked baked."""
    return bake(model), replace(info, baked=True)


def save_model(model: GNWSDetector, path: str | Path, info: ModelInfo) -> Path:
    """Write ``model`` to ``path`` (``.safetensors``) atomically with ``info`` as metadata."""
    if info.baked != model.is_baked:
        raise ValueError(f"info.baked={info.baked} but the model is {'baked' if model.is_baked else 'not baked'}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = safetensors.torch.save(tensors, metadata=info.to_metadata())
    path = Path(path)
    atomic_write_bytes(path, data)
    logger.info("wrote %s (%d tensors, %.1f MB)", path, len(tensors), len(data) / 1e6)
    return path


def read_model_info(path: str | Path) -> ModelInfo:
    """Metadata of a model file without loading its tensors."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except FileNotFoundError:
        raise CheckpointError(f"no model file at {path}") from None
    except Exception as exc:  # safetensors raises SafetensorError for malformed headers
        raise CheckpointError(f"{path} is not a readable .safetensors file: {exc}") from None
    return ModelInfo.from_metadata(meta, path)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[GNWSDetector, ModelInfo]:
    """Build the model a ``.safetensors`` file describes and load its weights strictly.

    A baked file builds a model with no WS modules at all.
    """
    path = Path(path)
    info = read_model_info(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read (truncated?): {exc}") from None
    with torch.device("meta"):  # skip random init: every tensor is assigned below
        model = build_detector(info.config, baked=info.baked)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match its own config: missing {missing}, unexpected {unexpected}, wrong shapes {wrong}"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().to(device), info


def bake_file(src: str | Path, dst: str | Path) -> ModelInfo:
    """Bake a gnws ``.safetensors`` model file into ``dst`` (a copy if already baked)."""
    model, info = baked(*load_model(src))
    save_model(model, dst, info)
    return info
