"""The FastAPI application: :func:`create_app`, its lifespan and the one domain-error handler.

Structure follows FastAPI's "bigger applications" guide: settings passed in, one router per
resource, state built in :func:`create_app` and models loaded in the lifespan. Models load and
warm up in the background after a fast preflight (missing weights fail startup at once with the
``gnws fetch`` message); ``/readyz`` turns 200 when they are ready.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import cv2
import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from models import GnwsError, Predictor

from .deps import ServiceState
from .errors import ServiceError, is_retryable, status_for
from .inference import InferencePipeline
from .metrics import HTTPMetricsMiddleware, Metrics
from .registry import ModelRegistry
from .routers import health, inference, models, web
from .settings import Settings

logger = logging.getLogger(__name__)

API_VERSION = "1"
CPU_WORKERS = 2


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def create_app(
    settings: Settings | None = None, *, loader: Callable[[str | Path], Predictor] | None = None
) -> FastAPI:
    """Build the service.

    Args:
        settings: default to the environment (``GNWS_*``).
        loader: ``(zoo key or file) -> Predictor`` instead of :meth:`Predictor.load` (tests).
    """
    settings = settings or Settings()
    metrics = Metrics(max_batch_size=settings.max_batch_size)
    # One inference thread: forward passes never overlap (they would only fight over the cores).
    infer_executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="gnws-infer", initializer=_set_threads, initargs=(settings.torch_threads,)
    )
    load_executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="gnws-load", initializer=_set_threads, initargs=(settings.torch_threads,)
    )
    cpu_executor = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="gnws-cpu")
    registry = ModelRegistry(
        settings, metrics, infer_executor=infer_executor, load_executor=load_executor, loader=loader
    )
    pipeline = InferencePipeline(settings, registry, metrics, cpu_executor)
    state = ServiceState(settings=settings, metrics=metrics, registry=registry, pipeline=pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _set_threads(settings.torch_threads)
        # Images are decoded and resized on CPU_WORKERS threads already; OpenCV's own thread pool
        # on top would only compete with the forward pass for the cores (results are unchanged).
        cv2.setNumThreads(1)
        resolved = registry.preflight()  # raises at once: missing weights, bad files, unknown names
        loading = asyncio.create_task(registry.load_all(resolved), name="gnws-load-models")
        loading.add_done_callback(_log_load_failure)
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await loading
            await registry.stop(grace_s=min(settings.request_timeout_s, 10.0))
            for executor in (infer_executor, load_executor, cpu_executor):
                executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="gnws detection service",
        version=API_VERSION,
        description="GN+WS Faster/Mask R-CNN detections in COCO format (boxes, RLE masks).",
        lifespan=lifespan,
    )
    app.state.gnws = state
    app.include_router(inference.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(web.router)
    app.add_exception_handler(GnwsError, _domain_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error_handler)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    return app


def _log_load_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the service could not load its models and will not become ready: %s", task.exception())


async def _domain_error_handler(request: Request, exc: GnwsError) -> JSONResponse:
    """The one place domain errors become HTTP statuses (table in :mod:`service.errors`)."""
    status = status_for(exc)
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    headers: dict[str, str] = {}
    state: ServiceState = request.app.state.gnws
    if is_retryable(exc):
        headers["Retry-After"] = str(retry_after(exc, state.settings.retry_after_s))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
    else:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, status, message)
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def retry_after(exc: GnwsError, minimum_s: int) -> int:
    """Whole seconds for ``Retry-After``: the error's own estimate, never below the configured minimum."""
    estimate = exc.retry_after_s if isinstance(exc, ServiceError) else None
    return max(minimum_s, math.ceil(estimate)) if estimate is not None else minimum_s


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: answered as JSON like every other error (Starlette's error middleware
    then re-raises it, so the server logs the traceback)."""
    return JSONResponse({"detail": "internal server error; the request was not completed (see the server log)"},
                        status_code=500)
