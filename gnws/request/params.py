"""The parameters of a detection request and their limits, defined once for every transport.

FastAPI declares them from these constants (so the OpenAPI schema states the real limits); the
TorchServe handler and the Open Inference Protocol routes, which receive them as text or JSON
values, parse them with :meth:`RequestParams.from_fields`. Either way :class:`RequestParams`
checks them again, so no transport can let an out-of-range value through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import InvalidParameterError

Role = Literal["detect", "segment"]
ImageFormat = Literal["json", "png", "jpeg"]
IMAGE_FORMATS: tuple[ImageFormat, ...] = get_args(ImageFormat)
MEDIA_TYPES: dict[ImageFormat, str] = {"json": "application/json", "png": "image/png", "jpeg": "image/jpeg"}

SCORE_THRESHOLD_MIN = 0.0
SCORE_THRESHOLD_MAX = 1.0
MAX_DETECTIONS_LIMIT = 1000
MODEL_NAME_MAX_LENGTH = 256
# Class names or COCO category ids, comma-separated: printable text without control characters.
CLASSES_MAX_LENGTH = 2048
CLASSES_PATTERN = r"^[^\x00-\x1f\x7f]*$"
TRUE_WORDS = frozenset({"1", "true", "on", "yes"})
FALSE_WORDS = frozenset({"0", "false", "off", "no"})

DESCRIPTIONS = {
    "model": "served model name (default: the endpoint's)",
    "score_threshold": "drop detections scoring below this",
    "max_detections": "keep at most this many (the best scoring)",
    "classes": "only these classes: names (any case) or COCO category ids, repeated or comma-separated",
    "format": "json, or png/jpeg for the image with detections drawn",
    "polygons": "also return mask outlines as polygons",
}


@dataclass(frozen=True, kw_only=True)
class RequestParams:
    """What a client may ask of one detection request.

    Attributes:
        model: served model name; ``None`` for the endpoint's default model.
        score_threshold: drop detections scoring below this (0-1).
        max_detections: keep at most this many, the best scoring (0-1000).
        classes: class names (any case) or COCO category ids; each item may hold several,
            comma-separated. Empty: all classes.
        format: ``json``, or ``png``/``jpeg`` for the image with the detections drawn.
        polygons: also return mask outlines as polygons (masks only).

    Raises:
        InvalidParameterError: a value outside its limits.
    """

    model: str | None = None
    score_threshold: float | None = None
    max_detections: int | None = None
    classes: tuple[str, ...] = ()
    format: ImageFormat = "json"
    polygons: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and not 0 < len(self.model) <= MODEL_NAME_MAX_LENGTH:
            raise InvalidParameterError(f"model: a served model name of 1 to {MODEL_NAME_MAX_LENGTH} characters")
        if self.score_threshold is not None and not (
            math.isfinite(self.score_threshold) and SCORE_THRESHOLD_MIN <= self.score_threshold <= SCORE_THRESHOLD_MAX
        ):
            raise InvalidParameterError(
                f"score_threshold: must be between {SCORE_THRESHOLD_MIN:g} and {SCORE_THRESHOLD_MAX:g}, "
                f"got {self.score_threshold}"
            )
        if self.max_detections is not None and not 0 <= self.max_detections <= MAX_DETECTIONS_LIMIT:
            raise InvalidParameterError(
                f"max_detections: must be between 0 and {MAX_DETECTIONS_LIMIT}, got {self.max_detections}"
            )
        if sum(len(c) for c in self.classes) > CLASSES_MAX_LENGTH or any(
            ord(ch) < 0x20 or ord(ch) == 0x7F for c in self.classes for ch in c
        ):
            raise InvalidParameterError(
                f"classes: at most {CLASSES_MAX_LENGTH} characters of class names or ids, without control characters"
            )
        if any(not token.strip() for item in self.classes for token in item.split(",")):
            raise InvalidParameterError(
                "classes: an empty class name; give names or COCO ids, e.g. classes=person,car (omit it for all)"
            )
        if self.format not in IMAGE_FORMATS:
            raise InvalidParameterError(f"format: expected one of {', '.join(IMAGE_FORMATS)}, got {self.format!r}")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> RequestParams:
        """Parameters from loosely typed fields: text (TorchServe's UTF-8 bytes, form fields) or
        JSON values (Open Inference Protocol ``parameters``). Missing, ``None`` and empty values
        mean the default; unknown names are ignored.

        Raises:
            InvalidParameterError: a value of the wrong kind or outside its limits.
        """
        fmt = (_text(fields, "format") or "json").lower()
        if fmt not in IMAGE_FORMATS:
            raise InvalidParameterError(f"format: expected one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
        classes = fields.get("classes")
        if isinstance(classes, list | tuple):
            class_items = tuple(str(c) for c in classes)
        else:
            text = _text(fields, "classes")
            class_items = (text,) if text else ()
        return cls(
            model=_text(fields, "model") or None,
            score_threshold=_number(fields, "score_threshold", float),
            max_detections=_number(fields, "max_detections", int),
            classes=class_items,
            format=fmt,  # type: ignore[arg-type]  # checked above
            polygons=_flag(fields, "polygons"),
        )


def _text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidParameterError(f"{name}: not UTF-8 text") from None
    return str(value).strip()


def _number(fields: Mapping[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    value = fields.get(name)
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name}: expected a number, got {value}")
    if kind is float and isinstance(value, int | float):
        return float(value)
    if kind is int and isinstance(value, int):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():  # JSON's 3.0 is the integer 3
        return int(value)
    text = _text(fields, name)
    if text is None or text == "":
        return None
    try:
        return kind(text)
    except ValueError:
        raise InvalidParameterError(
            f"{name}: expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name)
    if isinstance(value, bool):
        return value
    text = (_text(fields, name) or "false").lower()
    if text not in TRUE_WORDS | FALSE_WORDS:
        raise InvalidParameterError(f"{name}: expected true or false, got {text!r}")
    return text in TRUE_WORDS
