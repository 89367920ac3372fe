"""The served models: loading at startup, lookup by name and role, and atomic hot reloads.

A reload loads and warms the new predictor completely in a loader thread while the old one keeps
serving, then swaps one dictionary entry (a single reference assignment on the event loop). A
checkpoint that fails validation, loading or warm-up is refused with its reason and nothing
changes. Queued images keep the predictor they were prepared for (:mod:`service.batching`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from models import ZOO, CheckpointError, ModelInfo, Predictor, WeightsNotFoundError, get_entry, read_model_info
from models.store import checkpoint_path, missing_weights_message

from .batching import Batcher
from .errors import LoadFailedError, NotReadyError, ReloadFailedError, ReloadSourceError, UnknownModelError
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)

Role = Literal["detect", "segment"]
State = Literal["loading", "ready", "failed", "stopping"]
MODEL_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ServedModel:
    """One loaded model as the service sees it.

    Attributes:
        name: served name (``?model=NAME``, ``/v1/models/NAME/reload``); fixed across reloads.
        predictor: the current predictor.
        source: what it was loaded from (zoo key or file path).
        generation: 0 for the startup load, +1 per successful reload.
        loaded_at: UNIX time of the load.
    """

    name: str
    predictor: Predictor
    source: str
    generation: int = 0
    loaded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ResolvedSource:
    """A model source resolved to what :meth:`Predictor.load` takes, plus the served name."""

    name: str
    load_from: str | Path


def resolve_startup_source(source: str, store: Path) -> ResolvedSource:
    """Resolve a configured model source: a zoo key, a model-store name, or a ``.safetensors`` path.

    Fails fast (no tensors read) with the message ``gnws fetch`` gives when zoo weights are missing.

    Raises:
        WeightsNotFoundError: zoo weights or the file are not on disk.
        CheckpointError: the file is not a gnws model.
        KeyError: an unknown name (with close zoo matches).
    """
    if source in ZOO:
        stored = store / f"{source}{MODEL_SUFFIX}"
        if stored.is_file():
            read_model_info(stored)
            return ResolvedSource(name=source, load_from=stored)
        entry = get_entry(source)
        if not checkpoint_path(entry).is_file():
            raise WeightsNotFoundError(missing_weights_message(entry))
        return ResolvedSource(name=source, load_from=source)  # converted and baked on load
    path = Path(source).expanduser()
    looks_like_path = path.suffix in (MODEL_SUFFIX, ".pth") or "/" in source
    if not looks_like_path:
        stored = store / f"{source}{MODEL_SUFFIX}"
        if stored.is_file():
            read_model_info(stored)
            return ResolvedSource(name=source, load_from=stored)
        get_entry(source)  # raises KeyError naming close zoo keys
    if path.suffix != MODEL_SUFFIX:
        raise CheckpointError(
            f"{source} is not a gnws model file: serve a zoo key or a baked .safetensors "
            "(convert mmdetection checkpoints first with `gnws bake SRC.pth --model NAME`)"
        )
    if not path.is_file():
        raise WeightsNotFoundError(f"no model file at {path}; check the path or run `gnws bake` to make one")
    read_model_info(path)
    return ResolvedSource(name=path.stem, load_from=path)


def warm_up(predictor: Predictor) -> None:
    """One forward pass on a deterministic noise image (allocations, lazy init, and a smoke test)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    predictor.encode(predictor.infer([predictor.prepare(rgb)])[0])


class ModelRegistry:
    """Loaded models by name, the detect/segment defaults, and each model's batcher.

    Args:
        settings: service settings.
        metrics: the app's metrics.
        infer_executor: where forward passes run.
        load_executor: where models load and warm up (not the inference thread, so serving goes on).
        loader: ``(load_from) -> Predictor``; overridable in tests.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        infer_executor: Executor,
        load_executor: Executor,
        loader: Callable[[str | Path], Predictor] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._infer_executor = infer_executor
        self._load_executor = load_executor
        self._loader = loader or self._default_loader
        self._models: dict[str, ServedModel] = {}
        self._batchers: dict[str, Batcher] = {}
        self._roles: dict[Role, str] = {}
        self._reload_lock = asyncio.Lock()
        self.state: State = "loading"
        self.failure: str | None = None

    # -- loading -------------------------------------------------------------------------------

    def _default_loader(self, load_from: str | Path) -> Predictor:
        s = self.settings
        predictor = Predictor.load(load_from, device=s.device, max_pixels=s.max_pixels, image_scale=s.image_scale)
        if s.batched_forward is not None:
            predictor.batched_forward = s.batched_forward
        return predictor

    def preflight(self) -> dict[str, ResolvedSource]:
        """Resolve every configured source without loading tensors; raises on the first problem."""
        return {source: resolve_startup_source(source, self.settings.model_store)
                for source in self.settings.model_sources()}

    def _load_and_warm(self, name: str, load_from: str | Path, *, warm: bool) -> Predictor:
        start = time.perf_counter()
        predictor = self._loader(load_from)
        if warm:
            warm_up(predictor)
        logger.info("loaded %s from %s on %s in %.1f s", name, load_from, predictor.device, time.perf_counter() - start)
        return predictor

    async def load_all(self, resolved: dict[str, ResolvedSource]) -> None:
        """Load and warm every model (off the event loop), then mark the registry ready."""
        loop = asyncio.get_running_loop()
        s = self.settings
        for source, res in resolved.items():
            try:
                predictor = await loop.run_in_executor(
                    self._load_executor, partial(self._load_and_warm, res.name, res.load_from, warm=s.warmup)
                )
            except Exception as exc:
                self.metrics.model_loads.labels(res.name, "failure").inc()
                self.state = "failed"
                self.failure = f"loading {source} failed: {exc}"
                logger.exception("loading %s failed", source)
                raise
            self.metrics.model_loads.labels(res.name, "success").inc()
            self._models[res.name] = ServedModel(name=res.name, predictor=predictor, source=str(res.load_from))
            batcher = Batcher(
                res.name,
                executor=self._infer_executor,
                metrics=self.metrics,
                max_batch_size=s.max_batch_size,
                max_delay_s=s.max_batch_delay_ms / 1000,
                queue_size=s.queue_size,
            )
            batcher.start()
            self._batchers[res.name] = batcher
        roles: tuple[tuple[Role, str | None], ...] = (("detect", s.detect_model), ("segment", s.segment_model))
        for role, role_source in roles:
            if role_source is not None:
                name = resolved[role_source].name
                if role == "segment" and not self._models[name].predictor.has_masks:
                    self.state = "failed"
                    self.failure = f"the segment model {role_source} has no mask head; serve a Mask R-CNN model"
                    raise CheckpointError(self.failure)
                self._roles[role] = name
        self.state = "ready"
        self.metrics.ready.set(1)
        logger.info("ready: %s", ", ".join(self._models))

    async def stop(self, grace_s: float) -> None:
        self.state = "stopping"
        self.metrics.ready.set(0)
        await asyncio.gather(*(b.stop(grace_s) for b in self._batchers.values()))

    # -- lookup --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def roles_of(self, name: str) -> list[Role]:
        return [role for role, n in self._roles.items() if n == name]

    def require_ready(self) -> None:
        if self.state == "loading":
            raise NotReadyError("models are still loading; retry after Retry-After seconds")
        if self.state == "stopping":
            raise NotReadyError("the server is shutting down; retry on another instance")
        if self.state == "failed":
            raise LoadFailedError(f"the server could not load its models: {self.failure}")

    def get(self, name: str | None, role: Role) -> ServedModel:
        """The model named ``name``, or the default model for ``role``."""
        self.require_ready()
        if name is None:
            default = self._roles.get(role)
            if default is None:
                raise UnknownModelError(f"no {role} model is served here; pass ?model=NAME (GET /v1/models lists them)")
            name = default
        served = self._models.get(name)
        if served is None:
            loaded = ", ".join(sorted(self._models)) or "none"
            raise UnknownModelError(f"no model named {name!r} is loaded; loaded models: {loaded}")
        return served

    def batcher(self, name: str) -> Batcher:
        return self._batchers[name]

    # -- reload --------------------------------------------------------------------------------

    def resolve_reload_source(self, name: str, source: str | None) -> Path:
        """A file inside the model store for a reload (default: ``<store>/<name>.safetensors``).

        Raises:
            ReloadSourceError: the source is outside the store or not a ``.safetensors`` name.
            WeightsNotFoundError: no such file in the store.
        """
        store = self.settings.model_store.expanduser().resolve()
        text = (source or name).strip()
        if not text:
            raise ReloadSourceError("source is empty; give a zoo key or a file name inside the model store")
        try:
            candidate = Path(text)
            if candidate.suffix != MODEL_SUFFIX:
                candidate = candidate.with_name(candidate.name + MODEL_SUFFIX)
            path = (candidate if candidate.is_absolute() else store / candidate).resolve()
            if not path.is_relative_to(store):
                raise ReloadSourceError(
                    f"{text!r} is outside the model store {store}; reloads only read from the store"
                )
            exists = path.is_file()
        except (ValueError, OSError) as exc:  # ".", "/", an embedded NUL byte, a name too long, ...
            raise ReloadSourceError(f"{text[:200]!r} is not a usable file name in the model store ({exc})") from None
        if not exists:
            raise WeightsNotFoundError(
                f"no model file {path.relative_to(store)} in the model store {store}; "
                "export or bake one there first (`gnws bake`, training export)"
            )
        return path

    async def reload(self, name: str, source: str | None = None) -> tuple[ServedModel, ServedModel]:
        """Swap ``name`` to a checkpoint from the model store; on any failure the old model stays.

        Returns:
            ``(replaced, new)``: the model that served until the swap, and its successor.

        Raises:
            UnknownModelError, ReloadSourceError, WeightsNotFoundError, CheckpointError (incl.
            :class:`~service.errors.ReloadFailedError`).
        """
        old = self.get(name, "detect")
        async with self._reload_lock:
            old = self._models[name]
            try:
                path = self.resolve_reload_source(name, source)
                info = read_model_info(path)
                self._check_compatible(old, info, path)
                try:
                    # Always warmed, whatever ``warmup`` says for startup: a checkpoint that loads but
                    # cannot run a forward pass must be refused before it replaces a working model.
                    predictor = await asyncio.get_running_loop().run_in_executor(
                        self._load_executor, partial(self._load_and_warm, name, path, warm=True)
                    )
                except CheckpointError:
                    raise
                except Exception as exc:
                    logger.exception("reloading %s from %s failed", name, path)
                    raise ReloadFailedError(f"{path.name} could not be loaded and warmed up: {exc}") from None
            except Exception:
                self.metrics.model_reloads.labels(name, "failure").inc()
                raise
            new = ServedModel(name=name, predictor=predictor, source=str(path), generation=old.generation + 1)
            self._models[name] = new  # the atomic swap
            self.metrics.model_reloads.labels(name, "success").inc()
            logger.info("reloaded %s from %s (generation %d)", name, path, new.generation)
            return old, new

    def _check_compatible(self, old: ServedModel, info: ModelInfo, path: Path) -> None:
        if "segment" in self.roles_of(old.name) and not info.config.has_mask:
            raise CheckpointError(
                f"{path.name} has no mask head but {old.name} serves /v1/segment; reload it with a Mask R-CNN model"
            )
