"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP) codec: request bodies in, tensors out.

Requests carry one ``BYTES`` input, ``IMAGE``, shape ``[N]``: the N encoded images (JPEG, PNG, ...).
It may come as JSON (each element the image, base64-encoded, as KServe's examples send images) or,
as Triton and KServe clients send binary data, with the binary tensor data extension: a JSON header
of ``Inference-Header-Content-Length`` bytes, then the raw tensor bytes (each ``BYTES`` element a
4-byte little-endian length and its bytes), the input carrying ``parameters.binary_data_size``.
``Content-Encoding: gzip`` or ``deflate`` bodies are inflated first, never past the upload limit.
Request ``parameters`` carry ``score_threshold``, ``max_detections`` and ``classes`` (a
comma-separated string: protocol parameters are scalars).

Outputs per image, padded to the batch's largest detection count ``K`` (entries past
``num_detections[i]`` are padding: zero boxes and scores, category id -1, empty strings):

========================  ========  ==========  ================================================
name                      datatype  shape       what
========================  ========  ==========  ================================================
``num_detections``        INT32     ``[N]``     detections of each image
``boxes``                 FP32      ``[N,K,4]`` ``x1, y1, x2, y2`` in original image pixels
``scores``                FP32      ``[N,K]``   detection scores, best first
``category_ids``          INT32     ``[N,K]``   COCO category ids (the model's)
``category_names``        BYTES     ``[N,K]``   class names
``image_sizes``           INT32     ``[N,2]``   ``height, width`` after EXIF orientation
``masks_rle``             BYTES     ``[N,K]``   Mask R-CNN only: COCO compressed RLE ``counts``
                                                of each mask (its size is the image's)
========================  ========  ==========  ================================================

Outputs come back in JSON unless asked for in binary: ``parameters.binary_data_output`` for all,
or ``binary_data`` per requested output (which wins), as Triton does; a binary response is the
JSON header (its length in ``Inference-Header-Content-Length``) followed by the tensors' bytes,
with ``Content-Type: application/octet-stream``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gnws.request.errors import BadRequestError, InvalidParameterError, PayloadTooLargeError

from .uploads import Upload

INPUT_NAME = "IMAGE"
HEADER_LENGTH = "inference-header-content-length"
MAX_ID_LENGTH = 256
PARAMETER_NAMES = ("score_threshold", "max_detections", "classes")
# name -> (accepted JSON types, refused subtypes, in words): protocol parameters are typed JSON values
PARAMETER_TYPES: dict[str, tuple[type | tuple[type, ...], type | tuple[type, ...], str]] = {
    "score_threshold": ((int, float), bool, "a number"),
    "max_detections": ((int, float), bool, "an integer"),
    "classes": (str, (), "a comma-separated string of class names or ids"),
}
BOX_OUTPUTS = ("num_detections", "boxes", "scores", "category_ids", "category_names", "image_sizes")
MASK_OUTPUTS = ("masks_rle",)
DATATYPES = {"num_detections": "INT32", "boxes": "FP32", "scores": "FP32", "category_ids": "INT32",
             "category_names": "BYTES", "image_sizes": "INT32", "masks_rle": "BYTES"}
SHAPES = {"num_detections": [-1], "boxes": [-1, -1, 4], "scores": [-1, -1], "category_ids": [-1, -1],
          "category_names": [-1, -1], "image_sizes": [-1, 2], "masks_rle": [-1, -1]}


def output_names(has_masks: bool) -> tuple[str, ...]:
    return BOX_OUTPUTS + (MASK_OUTPUTS if has_masks else ())


def model_metadata(name: str, version: str, has_masks: bool, precision: str = "fp32") -> dict[str, Any]:
    """``GET /v2/models/{name}``: the inputs and outputs with their datatypes and shapes (and, in
    ``parameters``, the precision the model runs in)."""
    return {
        "name": name,
        "versions": [version],
        "platform": "gnws_pytorch",
        "parameters": {"precision": precision},
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": o, "datatype": DATATYPES[o], "shape": SHAPES[o]} for o in output_names(has_masks)],
    }


@dataclass(frozen=True)
class InferRequest:
    """A parsed ``POST .../infer`` request."""

    id: str | None
    images: list[Upload]
    parameters: dict[str, Any]
    outputs: dict[str, bool] | None  # requested output -> binary; None: all, by binary_data_output
    binary_default: bool


def inflate(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body with its ``Content-Encoding`` undone (gzip or deflate), never past ``max_bytes``."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    if kind not in ("gzip", "deflate"):
        raise BadRequestError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if kind == "gzip" else 15)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BadRequestError(f"the {kind} body could not be inflated: {exc}") from None
    if len(data) > max_bytes or inflater.unconsumed_tail:
        raise PayloadTooLargeError(f"the inflated body is larger than the {max_bytes}-byte upload limit")
    return data


def parse_infer_request(body: bytes, header_length: str | None, *, max_images: int) -> InferRequest:
    """Parse an inference request (JSON, or JSON header + binary tensor data).

    Raises:
        BadRequestError: malformed JSON, tensors or binary layout (400).
        InvalidParameterError: a parameter that is not a scalar (422).
    """
    json_len = len(body)
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise BadRequestError(f"Inference-Header-Content-Length must be a whole number, got {header_length!r}") \
                from None
        if not 0 <= json_len <= len(body):
            raise BadRequestError(f"Inference-Header-Content-Length {json_len} is outside the body's {len(body)} bytes")
    try:
        header = json.loads(body[:json_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"the inference request is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequestError("the inference request must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequestError(f"expected exactly one input, {INPUT_NAME!r} (BYTES, shape [N]: the encoded images)")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME or tensor.get("datatype") != "BYTES":
        raise BadRequestError(
            f"expected the input {INPUT_NAME!r} of datatype BYTES, got {tensor.get('name')!r} "
            f"({tensor.get('datatype')!r}); GET /v2/models/NAME lists the inputs"
        )
    count = _element_count(tensor.get("shape"))
    if not 1 <= count <= max_images:
        raise BadRequestError(f"the request has {count} images; send 1 to {max_images}")
    binary = body[json_len:]
    tensor_parameters = tensor.get("parameters", {})
    if not isinstance(tensor_parameters, dict):
        raise BadRequestError("the input's parameters must be a JSON object")
    size = tensor_parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise BadRequestError(
                f"binary_data_size says {size!r} bytes, the body holds {len(binary)} after the JSON header"
            )
        images = _deserialize_bytes(binary, count)
    else:
        if binary:
            raise BadRequestError("binary data follows the JSON header, but the input has no binary_data_size")
        images = _json_images(tensor.get("data"), count)
    parameters = header.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequestError("parameters must be a JSON object")
    for key, value in parameters.items():
        if not isinstance(value, str | int | float | bool):
            raise InvalidParameterError(f"parameter {key!r}: protocol parameters are strings, numbers or booleans")
        expected = PARAMETER_TYPES.get(key)
        if expected is not None and (not isinstance(value, expected[0]) or isinstance(value, expected[1])):
            raise InvalidParameterError(f"parameter {key!r}: expected {expected[2]}, got {value!r}")
    binary_default = _flag(parameters, "binary_data_output", False)
    outputs = None
    if "outputs" in header:
        requested = header["outputs"]
        if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                       for o in requested):
            raise BadRequestError("outputs must be a list of objects with a name")
        outputs = {o["name"]: _flag(o.get("parameters", {}), "binary_data", binary_default) for o in requested}
    request_id = header.get("id")
    if "id" in header and (not isinstance(request_id, str) or len(request_id) > MAX_ID_LENGTH):
        raise BadRequestError(f"id must be a string of at most {MAX_ID_LENGTH} characters")
    return InferRequest(id=str(request_id) if request_id is not None else None,
                        images=[Upload(data=image) for image in images], parameters=parameters,
                        outputs=outputs, binary_default=binary_default)


def _flag(parameters: Any, name: str, default: bool) -> bool:
    if not isinstance(parameters, dict):
        raise BadRequestError("parameters must be a JSON object")
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequestError(f"{name} must be true or false, got {value!r}")
    return value


def _element_count(shape: Any) -> int:
    if (not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int)
            or isinstance(shape[0], bool) or shape[0] < 0):
        raise BadRequestError(f"the input shape must be [N] for N encoded images, got {shape!r}")
    return shape[0]


def _deserialize_bytes(buffer: bytes, count: int) -> list[bytes]:
    """``count`` BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(buffer):
            raise BadRequestError(f"the binary tensor ends after {len(items)} of {count} elements")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise BadRequestError(f"element {len(items)} says {length} bytes, only {len(buffer) - offset} follow")
        items.append(buffer[offset:offset + length])
        offset += length
    if offset != len(buffer):
        raise BadRequestError(f"{len(buffer) - offset} bytes follow the {count} elements of the binary tensor")
    return items


def _json_images(data: Any, count: int) -> list[bytes]:
    flat = _flatten(data)
    if len(flat) != count or not all(isinstance(item, str) for item in flat):
        raise BadRequestError(
            f"in JSON, data must hold {count} strings: the images, base64-encoded (or send them as binary data)"
        )
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except (binascii.Error, ValueError):
        raise BadRequestError("an image in data is not valid base64") from None


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def detection_tensors(images: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The output tensors for the images' documents (``width``, ``height``, ``detections``)."""
    counts = [len(img["detections"]) for img in images]
    n, k = len(images), max(counts, default=0)
    out: dict[str, np.ndarray] = {
        "num_detections": np.asarray(counts, dtype=np.int32),
        "boxes": np.zeros((n, k, 4), dtype=np.float32),
        "scores": np.zeros((n, k), dtype=np.float32),
        "category_ids": np.full((n, k), -1, dtype=np.int32),
        "category_names": np.full((n, k), b"", dtype=object),
        "image_sizes": np.asarray([[img["height"], img["width"]] for img in images], dtype=np.int32).reshape(n, 2),
    }
    if "masks_rle" in names:  # a model without masks answers empty strings, as for padding
        out["masks_rle"] = np.full((n, k), b"", dtype=object)
    for i, img in enumerate(images):
        for j, det in enumerate(img["detections"]):
            out["boxes"][i, j] = det["bbox_xyxy"]
            out["scores"][i, j] = det["score"]
            out["category_ids"][i, j] = det["category_id"]
            out["category_names"][i, j] = det["category_name"].encode()
            if "masks_rle" in out and "segmentation" in det:
                out["masks_rle"][i, j] = det["segmentation"]["counts"].encode()
    return {name: out[name] for name in names}


def _serialize(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


def _json_data(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode() for v in array.reshape(-1)]
    return array.reshape(-1).tolist()  # type: ignore[no-any-return]


def infer_response(
    model_name: str, model_version: str, request: InferRequest, tensors: Mapping[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (``Content-Type``, and the header length for binary data)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in tensors.items():
        datatype = DATATYPES[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        binary = request.outputs[name] if request.outputs is not None else request.binary_default
        if binary:
            blob = _serialize(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array, datatype)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
