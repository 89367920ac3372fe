"""Service settings: environment variables ``GNWS_*``, overridden by ``gnws serve`` flags.

pydantic-settings is used here only: the rest of the service receives a :class:`Settings`
instance through :func:`service.app.create_app` (configuration is read in one place, and tests
pass their own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models import DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL
from models.precision import parse_precision
from models.preprocess import DEFAULT_MAX_PIXELS
from models.store import model_store

from .uploads import UploadLimits

_DISABLED = {"", "none", "off", "-"}


class Settings(BaseSettings):
    """Everything an operator can tune. Every field is also the env var ``GNWS_<FIELD>``.

    Attributes:
        detect_model: model behind ``/v1/detect`` (zoo key or ``.safetensors`` path; ``none`` disables).
        segment_model: model behind ``/v1/segment`` (must have masks; ``none`` disables).
        extra_models: more models selectable with ``?model=NAME`` (comma-separated in the env).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        precision: every model's numeric precision: ``fp32`` (exact, the default), ``bf16`` (CPUs with
            AVX-512 BF16 or AMX, CUDA) or ``fp16`` (CUDA); a mode the device cannot run stops
            startup with the reason (:mod:`models.precision`).
        model_precision: per served model name, overriding ``precision``
            (``name=bf16,other=fp32`` in the env).
        torch_threads: intra-op threads for inference (default: torch's choice).
        max_batch_size: most images one forward pass takes (per model).
        max_batch_delay_ms: how long the batcher waits for more images of the same padded shape.
        batched_forward: run a batch of equal padded shapes as one forward pass. Unset: on CUDA
            only (see :class:`models.Predictor`); where it is off, every image gets its own
            forward pass and its result as soon as that pass ends.
        queue_size: images waiting per model before requests are refused with 429.
        request_timeout_s: per-request limit on receiving the body (then 408), and again on
            decoding, queueing and inference once it has arrived (then 503).
        max_upload_bytes: request-body limit (413 above it), enforced while reading.
        max_files: images per multipart request.
        max_pixels: decompression-bomb guard: decoded pixel count limit (413 above it).
        max_in_flight: inference requests being decoded, waiting for or in a forward pass, or
            encoded, all models together (429 above it). A request takes its place only once its
            body has arrived. Bounds memory: per image, the prepared float32 tensor (about 12 MB
            at 1333x800) plus, for ``format=png|jpeg``, the decoded RGB image (3 bytes × ≤
            ``max_pixels``).
        max_uploads: request bodies being received at once (429 above it); separate from
            ``max_in_flight``, so slow senders cannot take the places of requests whose images
            have arrived. Bounds memory at ``max_uploads × max_upload_bytes``.
        upload_idle_timeout_s: longest pause while a body arrives (then 408).
        upload_min_rate: least average bytes per second of an upload once
            ``upload_idle_timeout_s`` has passed (then 408); 0 disables the check.
        header_timeout_s: time a connection has to send its request line and headers (then a
            JSON 408 and the connection closes); guards against clients that open connections
            and send headers byte by byte.
        max_connections: open connections and running requests uvicorn accepts (503 above it).
        max_json_bytes: body limit of every route that takes no image (413 above it, checked
            before the body is read).
        api_key: required for ``POST /v1/models/{name}/reload``; unset disables reloads.
        metrics_need_key / models_need_key: also require the API key for ``GET /metrics`` /
            for the model listings (``GET /v1/models``, the ``/v2`` model metadata).
        watch_store_s: poll the model store this often and swap in new versions of served
            versioned models (off by default; see :meth:`service.registry.ModelRegistry.watch_store`).
        offline: never download: ``gnws serve`` stops at once, naming the missing file and how
            to provide it, when zoo weights are not on this machine (otherwise it fetches them
            before starting).
        host / port: where ``gnws serve`` listens (loopback unless told otherwise).
        image_scale: ``(max_size, min_size)`` test scale instead of (1333, 800); smoke tests only.
        model_store: folder reloads may read from (default: ``$GNWS_MODEL_STORE`` or the gnws cache).
        warmup: run one forward pass per model before reporting ready.
        retry_after_s: least ``Retry-After`` seconds on 429/503; under load the header is the
            server's estimate of when the queue will have drained (queued images × recent
            forward-pass time per image).
        cors_origins: allowed browser origins for the API (none by default).
    """

    model_config = SettingsConfigDict(env_prefix="GNWS_", extra="ignore", frozen=True)

    detect_model: str | None = DEFAULT_DETECT_MODEL
    segment_model: str | None = DEFAULT_SEGMENT_MODEL
    extra_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    device: str = "auto"
    precision: str = "fp32"
    model_precision: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    torch_threads: int | None = Field(default=None, ge=1)
    max_batch_size: int = Field(default=4, ge=1, le=64)
    max_batch_delay_ms: float = Field(default=5.0, ge=0, le=10_000)
    batched_forward: bool | None = None
    queue_size: int = Field(default=16, ge=1)
    request_timeout_s: float = Field(default=60.0, gt=0)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_files: int = Field(default=8, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_in_flight: int = Field(default=32, ge=1)
    max_uploads: int = Field(default=64, ge=1)
    upload_idle_timeout_s: float = Field(default=5.0, gt=0)
    upload_min_rate: int = Field(default=16 * 1024, ge=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=1024, ge=1)
    max_json_bytes: int = Field(default=64 * 1024, ge=1024)
    api_key: SecretStr | None = None
    metrics_need_key: bool = False
    models_need_key: bool = False
    offline: bool = False
    watch_store_s: float | None = Field(default=None, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    image_scale: Annotated[tuple[int, int] | None, NoDecode] = None
    model_store: Path = Field(default_factory=model_store)
    warmup: bool = True
    retry_after_s: int = Field(default=1, ge=0)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("detect_model", "segment_model", mode="before")
    @classmethod
    def _none_disables(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _DISABLED:
            return None
        return value

    @field_validator("extra_models", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> Any:
        return parse_precision(value) if isinstance(value, str) else value

    @field_validator("model_precision", mode="before")
    @classmethod
    def _model_precision(cls, value: Any) -> Any:
        """``name=bf16,other=fp32`` (or a mapping) → ``{name: precision}``."""
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"model_precision must be NAME=PRECISION[,NAME=PRECISION...], got {value!r}")
            value = {name.strip(): mode for name, mode in pairs}
        if isinstance(value, dict):
            return {str(name): parse_precision(str(mode)) for name, mode in value.items()}
        return value

    def precision_for(self, name: str) -> str:
        """The precision model ``name`` is served in."""
        return self.model_precision.get(name, self.precision)

    @field_validator("image_scale", mode="before")
    @classmethod
    def _parse_scale(cls, value: Any) -> Any:
        """Accept ``"512,320"``, ``"512x320"`` or a pair; ``none`` means mmdetection's (1333, 800)."""
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _DISABLED:
                return None
            parts = text.replace("x", ",").split(",")
            if len(parts) != 2:
                raise ValueError(f"image_scale must be 'MAX,MIN' such as '512,320', got {value!r}")
            return tuple(int(p) for p in parts)
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.image_scale is not None and (min(self.image_scale) < 32 or self.image_scale[0] < self.image_scale[1]):
            raise ValueError(f"image_scale is (max_size, min_size) with max ≥ min ≥ 32, got {self.image_scale}")
        if self.max_files > self.queue_size:
            raise ValueError(f"max_files ({self.max_files}) cannot exceed queue_size ({self.queue_size})")
        if (self.metrics_need_key or self.models_need_key) and self.api_key is None:
            raise ValueError("metrics_need_key and models_need_key need an API key (GNWS_API_KEY)")
        if not self.model_sources():
            raise ValueError("no model to serve: set GNWS_DETECT_MODEL, GNWS_SEGMENT_MODEL or GNWS_EXTRA_MODELS")
        return self

    def upload_limits(self) -> UploadLimits:
        """What an image upload may be (size, stalls, rate)."""
        return UploadLimits(max_bytes=self.max_upload_bytes, idle_timeout_s=self.upload_idle_timeout_s,
                            min_rate=self.upload_min_rate)

    def json_limits(self) -> UploadLimits:
        """What a JSON body (reload requests) may be."""
        return UploadLimits(max_bytes=self.max_json_bytes, idle_timeout_s=self.upload_idle_timeout_s)

    def model_sources(self) -> list[str]:
        """Every model source to load, without duplicates, in a stable order."""
        sources = [s for s in (self.detect_model, self.segment_model, *self.extra_models) if s]
        return list(dict.fromkeys(sources))
