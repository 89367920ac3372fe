"""The FastAPI application: :func:`create_app`, its lifespan and the one domain-error handler.

Structure follows FastAPI's "bigger applications" guide: settings passed in, one router per
resource, state built in :func:`create_app` and models loaded in the lifespan. Models load and
warm up in the background after a fast preflight (missing weights fail startup at once with the
``gnws fetch`` message); ``/readyz`` turns 200 when they are ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

import cv2
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gnws.request import error_document, is_retryable, retry_after, status_for
from gnws.request.errors import message_of
from models import GnwsError, Predictor
from models.resolve import ModelRef

from . import openapi
from .deps import ServiceState, require_api_key
from .inference import InferencePipeline
from .limits import IMAGE_PATHS, BodyLimitMiddleware
from .metrics import HTTPMetricsMiddleware, Metrics
from .registry import ModelRegistry
from .routers import health, inference, models, v2, web
from .settings import Settings

logger = logging.getLogger(__name__)

API_VERSION = "1"
CPU_WORKERS = 2


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def create_app(
    settings: Settings | None = None,
    *,
    loader: Callable[[ModelRef], Predictor] | None = None,
    forward_workers: int = 1,
) -> FastAPI:
    """Build the service.

    Args:
        settings: default to the environment (``GNWS_*``).
        loader: ``(resolved model reference) -> Predictor`` instead of :meth:`Predictor.load` (tests,
            and remote predictors: :mod:`service.ray_serve`).
        forward_workers: forward passes in flight at once per model: 1 for local models (the
            default: passes would only fight over the cores), the replica count for remote ones.
    """
    settings = settings or Settings()
    metrics = Metrics(max_batch_size=settings.max_batch_size)
    # One inference thread per forward pass in flight: local passes never overlap (they would only fight
    # over the cores); remote ones (Ray replicas) wait in as many threads as there are replicas.
    infer_executor = ThreadPoolExecutor(
        max_workers=forward_workers, thread_name_prefix="gnws-infer", initializer=_set_threads,
        initargs=(settings.torch_threads,),
    )
    load_executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="gnws-load", initializer=_set_threads, initargs=(settings.torch_threads,)
    )
    cpu_executor = ThreadPoolExecutor(max_workers=CPU_WORKERS, thread_name_prefix="gnws-cpu")
    registry = ModelRegistry(
        settings, metrics, infer_executor=infer_executor, load_executor=load_executor, loader=loader,
        forward_workers=forward_workers,
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
        tasks = [loading]
        if settings.watch_store_s:
            tasks.append(asyncio.create_task(registry.watch_store(settings.watch_store_s), name="gnws-watch-store"))
        try:
            yield
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    with suppress(asyncio.CancelledError, Exception):
                        await task
            await registry.stop(grace_s=min(settings.request_timeout_s, 10.0))
            for executor in (infer_executor, load_executor, cpu_executor):
                executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="gnws detection service",
        version=API_VERSION,
        description="GN+WS Faster/Mask R-CNN detections in COCO format (boxes, RLE masks), and the same "
        "detections over the Open Inference Protocol v2 (KServe v2 / Triton HTTP) under /v2.",
        lifespan=lifespan,
    )
    app.state.gnws = state
    key = [Depends(require_api_key)]
    app.include_router(inference.router)
    app.include_router(models.router)
    app.include_router(models.listing_router, dependencies=key if settings.models_need_key else [])
    app.include_router(v2.router)
    app.include_router(v2.metadata_router, dependencies=key if settings.models_need_key else [])
    app.include_router(health.router)
    app.include_router(health.metrics_router, dependencies=key if settings.metrics_need_key else [])
    app.include_router(web.router)
    app.add_exception_handler(GnwsError, _domain_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error_handler)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    openapi.install(app, registry)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_json_bytes, image_paths=IMAGE_PATHS)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    return app


def _log_load_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the service could not load its models and will not become ready: %s", task.exception())


async def _domain_error_handler(request: Request, exc: GnwsError) -> JSONResponse:
    """The one place domain errors become HTTP statuses (table in :mod:`gnws.request.errors`)."""
    status = status_for(exc)
    message = message_of(exc)
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
    return error_response(request, message, status, headers)


def error_response(request: Request, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body of the route's protocol: ``{"error": ...}`` under ``/v2`` (Open Inference
    Protocol), ``{"detail": ...}`` everywhere else."""
    body = error_document(message, key="error" if is_oip_path(request.url.path) else "detail")
    return JSONResponse(body, status_code=status, headers=headers)


def is_oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    """Routing errors (404 no route, 405 wrong method) in the route's protocol's error shape."""
    if not is_oip_path(request.url.path):
        return await http_exception_handler(request, exc)
    return error_response(request, str(exc.detail), exc.status_code, dict(exc.headers or {}))


async def _validation_error_handler(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's 422 for invalid path or query parameters; one sentence under ``/v2``."""
    if not is_oip_path(request.url.path):
        return await request_validation_exception_handler(request, exc)
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(request, f"invalid request: {problems}", 422)


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: answered as JSON like every other error (Starlette's error middleware
    then re-raises it, so the server logs the traceback)."""
    return error_response(request, "internal server error; the request was not completed (see the server log)", 500)
