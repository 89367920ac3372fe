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

from gnws.request.document import public_text
from gnws.request.errors import (
    ArchitectureMismatchError,
    ConflictError,
    LoadFailedError,
    NotReadyError,
    ReloadFailedError,
    UnknownModelError,
)
from gnws.request.params import Role
from models import CheckpointError, ModelInfo, Predictor
from models.precision import check_precision, resolve_device
from models.resolve import BAKED_KINDS, ModelRef, resolve_model
from models.store import latest_version, list_versions, version_path

from .batching import Batcher
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "stopping"]


@dataclass(frozen=True)
class ServedModel:
    """One loaded model as the service sees it.

    Attributes:
        name: served name (``?model=NAME``, ``/v1/models/NAME/reload``); fixed across reloads.
        predictor: the current predictor.
        ref: the resolved reference its weights came from.
        generation: 0 for the startup load, +1 per successful reload.
        pinned: a reload asked for this version: the store watcher leaves the model alone.
        loaded_at: UNIX time of the load.
    """

    name: str
    predictor: Predictor
    ref: ModelRef
    generation: int = 0
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)

    @property
    def source(self) -> str:
        """What clients are told the model was loaded from (never a server path)."""
        return source_label(self.ref)

    @property
    def version(self) -> int | None:
        """The model-store version of its weights (versioned models)."""
        return self.ref.version


def resolve_startup_source(source: str, store: Path) -> ModelRef:
    """Resolve a configured model source: a zoo key, a model-store name, or a ``.safetensors`` path.

    Fails fast (no tensors read) with the message ``gnws fetch`` gives when zoo weights are missing.

    Raises:
        WeightsNotFoundError: zoo weights or the file are not on disk.
        CheckpointError: the file is not a gnws model.
        ModelReferenceError: an mmdetection checkpoint (convert it first).
        UnknownModelNameError: an unknown name (with close zoo matches; also a ``KeyError``).
    """
    ref = resolve_model(source, accept=BAKED_KINDS, store=store)
    ref.read_info()
    return ref


def source_label(ref: ModelRef) -> str:
    """What clients are told a model was loaded from, never a server path: the zoo key, the file
    name inside the model store (``coco-ft/3.safetensors`` for a version), or the file's name."""
    if ref.kind == "zoo":
        return ref.name
    if ref.kind == "store":
        return f"{ref.name}/{ref.version}.safetensors" if ref.version is not None else f"{ref.name}.safetensors"
    return ref.path.name


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
        loader: ``(resolved reference) -> Predictor``; overridable in tests.
        forward_workers: forward passes in flight per model (see :class:`~service.batching.Batcher`).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        infer_executor: Executor,
        load_executor: Executor,
        loader: Callable[[ModelRef], Predictor] | None = None,
        forward_workers: int = 1,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._infer_executor = infer_executor
        self._load_executor = load_executor
        self._loader = loader or self._default_loader
        self._forward_workers = forward_workers
        self._models: dict[str, ServedModel] = {}
        self._batchers: dict[str, Batcher] = {}
        self._roles: dict[Role, str] = {}
        self._reload_lock = asyncio.Lock()
        self.state: State = "loading"
        self.failure: str | None = None

    # -- loading -------------------------------------------------------------------------------

    def _default_loader(self, ref: ModelRef) -> Predictor:
        s = self.settings
        predictor = Predictor.load(ref, device=s.device, max_pixels=s.max_pixels, image_scale=s.image_scale,
                                   precision=s.precision_for(ref.name))
        if s.batched_forward is not None:
            predictor.batched_forward = s.batched_forward
        return predictor

    def preflight(self) -> dict[str, ModelRef]:
        """Resolve every configured source without loading tensors; raises on the first problem."""
        resolved = {source: resolve_startup_source(source, self.settings.model_store)
                    for source in self.settings.model_sources()}
        for ref in resolved.values():  # a precision the device cannot run stops startup here, not at loading
            check_precision(self.settings.precision_for(ref.name), resolve_device(self.settings.device))
        return resolved

    def _load_and_warm(self, name: str, ref: ModelRef, *, warm: bool) -> Predictor:
        start = time.perf_counter()
        predictor = self._loader(ref)
        if warm:
            warm_up(predictor)
        logger.info("loaded %s from %s on %s in %.1f s", name, ref.path, predictor.device, time.perf_counter() - start)
        return predictor

    async def load_all(self, resolved: dict[str, ModelRef]) -> None:
        """Load and warm every model (off the event loop), then mark the registry ready."""
        loop = asyncio.get_running_loop()
        s = self.settings
        for source, res in resolved.items():
            try:
                predictor = await loop.run_in_executor(
                    self._load_executor, partial(self._load_and_warm, res.name, res, warm=s.warmup)
                )
            except Exception as exc:
                self.metrics.model_loads.labels(res.name, "failure").inc()
                self.state = "failed"
                self.failure = f"loading {source_label(res)} failed: {public_text(str(exc))}"
                logger.exception("loading %s failed", source)
                raise
            self.metrics.model_loads.labels(res.name, "success").inc()
            self._models[res.name] = ServedModel(name=res.name, predictor=predictor, ref=res)
            batcher = Batcher(
                res.name,
                executor=self._infer_executor,
                metrics=self.metrics,
                max_batch_size=s.max_batch_size,
                max_delay_s=s.max_batch_delay_ms / 1000,
                queue_size=s.queue_size,
                workers=self._forward_workers,
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

    def versions_of(self, served: ServedModel) -> list[int]:
        """The versions in the store of a versioned model (empty for others)."""
        if served.ref.kind != "store" or served.ref.version is None:
            return []
        return list_versions(served.ref.name, self.settings.model_store)

    def resolve_reload_source(self, served: ServedModel, source: str | None, version: int | None) -> ModelRef:
        """A file inside the model store for a reload.

        Default: the served model's own entry in the store (its newest version, for a versioned model).

        Raises:
            ModelReferenceError: the source is outside the store or not a usable file name.
            WeightsNotFoundError: no such file in the store.
            ConflictError: ``version`` of a model that has no versions.
        """
        default = served.ref.name if served.ref.kind in ("zoo", "store") else served.name
        if version is None:
            return resolve_model(source or default, store=self.settings.model_store, within_store=True)
        base = source or served.ref.name
        if not list_versions(base, self.settings.model_store):
            raise ConflictError(f"{base} is not a versioned model in the model store, so it has no version {version}")
        return resolve_model(f"{base}/{version}", store=self.settings.model_store, within_store=True)

    async def reload(
        self, name: str, source: str | None = None, *, version: int | None = None, replace_architecture: bool = False
    ) -> tuple[ServedModel, ServedModel]:
        """Swap ``name`` to a file from the model store; on any failure the old model stays.

        Args:
            source: a model-store name or file name (default: the served model's own entry).
            version: a version of the served versioned model, or of ``source`` (a rollback): pins it.
            replace_architecture: allow a file of another architecture.

        Returns:
            ``(replaced, new)``: the model that served until the swap, and its successor.

        Raises:
            UnknownModelError, ModelReferenceError, WeightsNotFoundError, ArchitectureMismatchError,
            CheckpointError (incl. :class:`~gnws.request.errors.ReloadFailedError`).
        """
        self.get(name, "detect")
        async with self._reload_lock:
            old = self._models[name]
            try:
                ref = self.resolve_reload_source(old, source, version)
                predictor = await self._load_checked(old, ref, replace_architecture=replace_architecture)
            except Exception:
                self.metrics.model_reloads.labels(name, "failure").inc()
                raise
            return old, self._swap(old, predictor, ref, pinned=version is not None)

    async def _load_checked(self, old: ServedModel, ref: ModelRef, *, replace_architecture: bool) -> Predictor:
        """Load and warm ``ref`` for ``old``'s place, after checking it may take that place."""
        info = ref.read_info()
        if info is None:  # pragma: no cover - store files always exist here
            raise CheckpointError(f"{ref.name} is not in the model store")
        self._check_compatible(old, info, ref, replace_architecture=replace_architecture)
        try:
            # Always warmed, whatever ``warmup`` says for startup: a checkpoint that loads but
            # cannot run a forward pass must be refused before it replaces a working model.
            return await asyncio.get_running_loop().run_in_executor(
                self._load_executor, partial(self._load_and_warm, old.name, ref, warm=True)
            )
        except CheckpointError:
            raise
        except Exception as exc:
            logger.exception("reloading %s from %s failed", old.name, ref.path)
            raise ReloadFailedError(f"{source_label(ref)} could not be loaded and warmed up: {exc}") from None

    def _swap(self, old: ServedModel, predictor: Predictor, ref: ModelRef, *, pinned: bool) -> ServedModel:
        new = ServedModel(name=old.name, predictor=predictor, ref=ref, generation=old.generation + 1, pinned=pinned)
        self._models[old.name] = new  # the atomic swap
        self.metrics.model_reloads.labels(old.name, "success").inc()
        logger.info("reloaded %s from %s (generation %d%s)", old.name, source_label(ref), new.generation,
                    ", pinned" if pinned else "")
        return new

    def _check_compatible(
        self, old: ServedModel, info: ModelInfo, ref: ModelRef, *, replace_architecture: bool
    ) -> None:
        if "segment" in self.roles_of(old.name) and not info.config.has_mask:
            raise ArchitectureMismatchError(
                f"{source_label(ref)} has no mask head but {old.name} serves /v1/segment; "
                "reload it with a Mask R-CNN model"
            )
        was, new = architecture(old.predictor.info), architecture(info)
        if was != new and not replace_architecture:
            raise ArchitectureMismatchError(
                f"{source_label(ref)} is a {new} but {old.name} serves a {was}; send "
                '"replace_architecture": true to replace the architecture behind this name'
            )

    # -- the store watcher -----------------------------------------------------------------------

    async def watch_store(self, interval_s: float) -> None:
        """Poll the model store every ``interval_s`` seconds and swap in new versions (runs until cancelled).

        For each served versioned model that no reload pinned, a newer version than the one
        serving is loaded, warmed up and swapped in, as Triton's POLL mode does; a file that
        fails is refused (the old model keeps serving) and not tried again until it changes.
        """
        refused: dict[tuple[str, int], float] = {}  # (name, version) -> mtime of the refused file
        while True:
            await asyncio.sleep(interval_s)
            if not self.ready:
                continue
            for served in list(self._models.values()):
                try:
                    await self._follow_newest(served, refused)
                except Exception:  # one model's trouble must not stop watching the others
                    logger.exception("watching the model store for %s failed", served.name)

    async def _follow_newest(self, served: ServedModel, refused: dict[tuple[str, int], float]) -> None:
        if served.pinned or served.ref.kind != "store" or served.ref.version is None:
            return
        newest = latest_version(served.ref.name, self.settings.model_store)
        if newest is None or newest <= served.ref.version:
            return
        path = version_path(served.ref.name, newest, self.settings.model_store)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return  # removed meanwhile
        if refused.get((served.name, newest)) == mtime:
            return
        async with self._reload_lock:
            current = self._models[served.name]
            if current is not served:  # a reload got there first
                return
            try:
                ref = resolve_model(f"{served.ref.name}/{newest}", store=self.settings.model_store, within_store=True)
                predictor = await self._load_checked(current, ref, replace_architecture=False)
            except Exception as exc:
                refused[(served.name, newest)] = mtime
                self.metrics.model_reloads.labels(served.name, "failure").inc()
                logger.error("version %d of %s was refused, version %d keeps serving: %s",
                             newest, served.name, served.ref.version, exc)
                return
            self._swap(current, predictor, ref, pinned=False)


def architecture(info: ModelInfo) -> str:
    """``mask_rcnn R-50``, ``faster_rcnn X-101-32x4d``, ...: what a reload may not change unasked."""
    cfg = info.config
    backbone = f"X-{cfg.depth}-{cfg.groups}x{cfg.width_per_group}d" if cfg.groups > 1 else f"R-{cfg.depth}"
    return f"{cfg.arch} {backbone}"
