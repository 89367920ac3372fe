"""GN+WS Faster/Mask R-CNN: architectures, zoo, fetch/convert/bake and the predictor.

Imports only torch, torchvision, numpy, pillow, opencv, safetensors, pycocotools, tqdm and the
standard library; the service, the transports and ``training/`` import this package, never the
reverse. How each part reproduces mmdetection: docs/mmdetection-fidelity.md.
"""

from .bake import ModelInfo, bake, bake_file, load_model, read_model_info, save_model
from .config import COCO_CATEGORY_IDS, COCO_CLASSES, DetectorConfig
from .detector import GNWSDetector, build_detector
from .errors import (
    CheckpointError,
    ConversionError,
    DownloadError,
    GnwsError,
    ImageDecodeError,
    ImageTooLargeError,
    PrecisionError,
    UnsupportedPrecisionError,
    WeightsNotFoundError,
)
from .precision import PRECISIONS, Precision, check_precision, supported_precisions
from .predictor import Detection, Predictor, RawDetections, resolve_device
from .preprocess import PreparedImage, decode_image, prepare_image
from .zoo import DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL, ZOO, ZooEntry, get_entry

__all__ = [
    "COCO_CATEGORY_IDS", "COCO_CLASSES", "DEFAULT_DETECT_MODEL", "DEFAULT_SEGMENT_MODEL", "PRECISIONS", "ZOO",
    "CheckpointError", "ConversionError", "Detection", "DetectorConfig", "DownloadError", "GNWSDetector",
    "GnwsError", "ImageDecodeError", "ImageTooLargeError", "ModelInfo", "Precision", "PrecisionError", "Predictor",
    "PreparedImage", "RawDetections", "UnsupportedPrecisionError", "WeightsNotFoundError", "ZooEntry", "bake",
    "bake_file", "build_detector", "check_precision", "decode_image", "get_entry", "load_model", "prepare_image",
    "read_model_info", "resolve_device", "save_model", "supported_precisions",
]  # fmt: skip
