"""Prometheus metrics, one :class:`~prometheus_client.CollectorRegistry` per app.

A per-app registry (instead of the process-global default) lets tests create several apps in
one process and read each one's numbers. HTTP requests are counted by a small ASGI middleware
using the matched route template as the label, so label cardinality stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """The service's metrics.

    Attributes:
        requests: ``gnws_http_requests_total{route, method, status}``.
        request_latency: ``gnws_http_request_duration_seconds{route}``.
        stage_latency: ``gnws_inference_stage_seconds{model, stage}``, stage one of
            ``prepare`` (decode + resize), ``queue``, ``inference``, ``encode``.
        batch_size: ``gnws_batch_size{model}``: images per forward pass.
        queue_depth: ``gnws_queue_depth{model}``: images waiting for a forward pass.
        in_flight: ``gnws_in_flight_requests``: inference requests being processed (bodies received).
        uploads: ``gnws_uploads_in_progress``: request bodies being received.
        rejected: ``gnws_rejected_requests_total{reason}`` (queue_full, in_flight, uploads, and timeout:
            an upload too slow, or no result within the request timeout).
        model_loads: ``gnws_model_loads_total{model, result}`` (startup loads).
        model_reloads: ``gnws_model_reloads_total{model, result}`` (hot swaps).
        ready: ``gnws_ready``: 1 once every model is loaded and warmed.
    """

    def __init__(self, max_batch_size: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gnws_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_latency = Histogram(
            "gnws_http_request_duration_seconds", "HTTP request latency", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.stage_latency = Histogram(
            "gnws_inference_stage_seconds",
            "Per-image latency by stage (prepare, queue, inference, encode)",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size})
        self.batch_size = Histogram(
            "gnws_batch_size", "Images per forward pass", ["model"], buckets=batch_buckets, registry=r
        )
        self.queue_depth = Gauge("gnws_queue_depth", "Images waiting for a forward pass", ["model"], registry=r)
        self.in_flight = Gauge("gnws_in_flight_requests", "Inference requests being processed", registry=r)
        self.uploads = Gauge("gnws_uploads_in_progress", "Request bodies being received", registry=r)
        self.rejected = Counter("gnws_rejected_requests", "Requests refused under load", ["reason"], registry=r)
        self.model_loads = Counter("gnws_model_loads", "Model loads at startup", ["model", "result"], registry=r)
        self.model_reloads = Counter("gnws_model_reloads", "Model hot swaps", ["model", "result"], registry=r)
        self.ready = Gauge("gnws_ready", "1 once every model is loaded and warmed", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPMetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope.get("method", ""), str(status)).inc()
            self.metrics.request_latency.labels(label).observe(time.perf_counter() - start)
