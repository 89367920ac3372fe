"""gnws: serve and refresh GN+WS (Group Normalization + Weight Standardization) object detectors.

The public Python API::

    from gnws import Predictor, ZOO
    predictor = Predictor.load("mask_rcnn_r50_fpn_gn_ws-all_2x_coco")   # zoo key, store name or file
    detections = predictor.predict("image.jpg")   # COCO-format dicts: bbox, score, category_id, ...

plus the zoo table (:data:`ZOO`, :func:`get_entry`), downloads (:func:`fetch`), conversion of
mmdetection checkpoints (:func:`convert_checkpoint`), baking weight standardisation into plain
convolutions (:func:`bake`, :func:`bake_file`), model files (:func:`load_model`,
:func:`save_model`, :func:`read_model_info`) and the model-reference resolver
(:func:`resolve_model`). Everything is loaded on first use, so ``import gnws`` is cheap; the
``gnws`` command lives in :mod:`gnws.cli`, the request layer shared by every transport in
:mod:`gnws.request` and the TorchServe handler in :mod:`gnws.torchserve`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module it lives in
_EXPORTS = {
    "Predictor": "models.predictor",
    "Detection": "models.predictor",
    "RawDetections": "models.predictor",
    "ZOO": "models.zoo",
    "ZooEntry": "models.zoo",
    "get_entry": "models.zoo",
    "DEFAULT_DETECT_MODEL": "models.zoo",
    "DEFAULT_SEGMENT_MODEL": "models.zoo",
    "fetch": "models.fetch",
    "convert_checkpoint": "models.store",
    "bake": "models.bake",
    "bake_file": "models.bake",
    "load_model": "models.bake",
    "save_model": "models.bake",
    "read_model_info": "models.bake",
    "ModelInfo": "models.bake",
    "resolve_model": "models.resolve",
    "ModelRef": "models.resolve",
    "RefKind": "models.resolve",
    "GnwsError": "models.errors",
    "CheckpointError": "models.errors",
    "WeightsNotFoundError": "models.errors",
    "ImageDecodeError": "models.errors",
}
__all__ = [
    "DEFAULT_DETECT_MODEL", "DEFAULT_SEGMENT_MODEL", "ZOO", "CheckpointError", "Detection", "GnwsError",
    "ImageDecodeError", "ModelInfo", "ModelRef", "Predictor", "RawDetections", "RefKind", "WeightsNotFoundError",
    "ZooEntry", "__version__", "bake", "bake_file", "convert_checkpoint", "fetch", "get_entry", "load_model",
    "read_model_info", "resolve_model", "save_model",
]  # fmt: skip

if TYPE_CHECKING:
    from models.bake import ModelInfo, bake, bake_file, load_model, read_model_info, save_model
    from models.errors import CheckpointError, GnwsError, ImageDecodeError, WeightsNotFoundError
    from models.fetch import fetch
    from models.predictor import Detection, Predictor, RawDetections
    from models.resolve import ModelRef, RefKind, resolve_model
    from models.store import convert_checkpoint
    from models.zoo import DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL, ZOO, ZooEntry, get_entry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gnws' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
