"""Dynamic batching per model that never changes results.

Follows LitServe's decode → batch → predict → unbatch shape and TorchServe's
``batch_size``/``max_batch_delay``: a worker task takes the oldest waiting image, waits up to
``max_delay`` for more images with the **same padded shape and the same predictor** (GroupNorm
statistics include the padding, so only equal padded shapes may share a forward pass; see
:mod:`models.detector`, difference 3), and runs :meth:`models.Predictor.infer` in a worker
thread. Images of other shapes keep their place in the line. A predictor whose
``batched_forward`` is off (the CPU default) would run a batch image by image anyway, so its
images are taken one at a time, without the delay, and each gets its result when its own
forward pass ends. The line is bounded: a full one refuses new images with
:class:`~gnws.request.errors.OverloadedError` (429 + ``Retry-After``, estimated from the queue depth
and the recent forward-pass time per image).

Each job carries the predictor it was prepared for, so a model reload (an atomic reference swap in
:mod:`service.registry`) lets queued images finish on the old weights while new ones use the new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from gnws.request.errors import NotReadyError, OverloadedError, RequestTimeoutError
from models import Predictor, PreparedImage, RawDetections

from .metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """What one image got from the batcher.

    Attributes:
        raw: network output for the image (from the predictor the job was queued with).
        queue_s: time from submission to the start of its forward pass.
        inference_s: duration of the forward pass it was part of.
        batch_size: images in that forward pass.
    """

    raw: RawDetections
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class _Job:
    predictor: Predictor
    prepared: PreparedImage
    future: asyncio.Future[BatchResult]
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, tuple[int, int]]:
        return id(self.predictor), self.prepared.pad_shape


class Batcher:
    """Bounded line of images for one served model, and the task that batches them.

    Args:
        name: served model name (metrics label).
        executor: where forward passes run (one thread: forward passes never overlap).
        metrics: the app's metrics.
        max_batch_size: most images per forward pass.
        max_delay_s: longest wait for more images of the same padded shape.
        queue_size: most images waiting; more are refused.
        workers: forward passes in flight at once (1 for a local model, whose passes would only
            fight over the cores; the number of inference replicas when the model runs remotely).
    """

    def __init__(
        self,
        name: str,
        *,
        executor: Executor,
        metrics: Metrics,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        workers: int = 1,
    ) -> None:
        self.name = name
        self._executor = executor
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []  # the jobs of every batch in a forward pass now
        self._wakeup = asyncio.Event()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._seconds_per_image: float | None = None  # moving average of recent forward passes

    @property
    def depth(self) -> int:
        """Images waiting for a forward pass."""
        return len(self._waiting)

    def has_room(self, count: int = 1) -> bool:
        return not self._closed and len(self._waiting) + count <= self.queue_size

    def drain_estimate_s(self) -> float | None:
        """Seconds until the images now waiting and running are done, from recent forward passes
        (``None`` before the first one)."""
        if self._seconds_per_image is None:
            return None
        return (len(self._waiting) + len(self._running)) * self._seconds_per_image

    def overloaded(self) -> OverloadedError:
        """The error for a request refused because this line is full."""
        self._metrics.rejected.labels("queue_full").inc()
        return OverloadedError(
            f"the queue for {self.name} is full ({self.queue_size} images waiting); retry after Retry-After seconds",
            retry_after_s=self.drain_estimate_s(),
        )

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._work(), name=f"batcher-{self.name}-{i}")
                           for i in range(self._workers)]

    async def stop(self, grace_s: float) -> None:
        """Refuse new images, let waiting and running ones finish for up to ``grace_s``, then fail the rest."""
        self._closed = True
        deadline = time.monotonic() + grace_s
        while (self._waiting or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = [*self._running, *self._waiting]  # taken before the cancel empties ``_running``
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for job in unfinished:
            if not job.future.done():
                job.future.set_exception(NotReadyError("the server is shutting down; retry on another instance"))
        self._running = []
        self._waiting.clear()
        self._metrics.queue_depth.labels(self.name).set(0)

    async def run(
        self, predictor: Predictor, prepared: Sequence[PreparedImage], *, timeout_s: float
    ) -> list[BatchResult]:
        """Queue ``prepared`` images for ``predictor`` and wait for all their results.

        Raises:
            OverloadedError: the line has no room for all of them.
            RequestTimeoutError: results did not come within ``timeout_s``.
        """
        if self._closed:
            raise NotReadyError("the server is shutting down; retry on another instance")
        if not self.has_room(len(prepared)):
            raise self.overloaded()
        loop = asyncio.get_running_loop()
        jobs = [_Job(predictor=predictor, prepared=p, future=loop.create_future()) for p in prepared]
        self._waiting.extend(jobs)
        self._metrics.queue_depth.labels(self.name).set(len(self._waiting))
        self._wakeup.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), timeout_s))
        except TimeoutError:
            self._metrics.rejected.labels("timeout").inc()
            raise RequestTimeoutError(
                f"no result within the {timeout_s:.1f} s request timeout; the server is busy, retry later",
                retry_after_s=self.drain_estimate_s(),
            ) from None
        finally:
            # A timed-out or disconnected request gives its places in the line back at once.
            for job in jobs:
                if not job.future.done():
                    job.future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(job)
            self._metrics.queue_depth.labels(self.name).set(len(self._waiting))

    async def _work(self) -> None:
        while True:
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._next_batch()

    async def _next_batch(self) -> None:
        loop = asyncio.get_running_loop()
        head = self._waiting[0]
        limit = self.max_batch_size if head.predictor.batched_forward else 1
        key = head.key
        deadline = loop.time() + self.max_delay_s
        while limit > 1 and self._count(key) < limit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
            if not self._waiting:
                break
        batch = self._take(key, limit)
        if not batch:
            return
        self._running.extend(batch)
        try:
            await self._run_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not stop the line: log it, fail that batch, go on
            logger.exception("the batcher of %s failed; its current images get an error", self.name)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("internal batching error"))
        finally:
            self._running = [job for job in self._running if job not in batch]

    def _count(self, key: tuple[int, tuple[int, int]]) -> int:
        return sum(1 for job in self._waiting if job.key == key)

    def _take(self, key: tuple[int, tuple[int, int]], limit: int) -> list[_Job]:
        """Remove and return up to ``limit`` live jobs with ``key``, oldest first."""
        batch: list[_Job] = []
        rest: deque[_Job] = deque()
        for job in self._waiting:
            if job.future.done():
                continue  # cancelled while waiting
            if job.key == key and len(batch) < limit:
                batch.append(job)
            else:
                rest.append(job)
        self._waiting = rest
        self._metrics.queue_depth.labels(self.name).set(len(rest))
        return batch

    async def _run_batch(self, batch: list[_Job]) -> None:
        predictor = batch[0].predictor
        start = time.perf_counter()
        try:
            raws = await asyncio.get_running_loop().run_in_executor(
                self._executor, predictor.infer, [job.prepared for job in batch]
            )
        except Exception as exc:
            logger.exception("forward pass of %d image(s) on %s failed", len(batch), self.name)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        inference_s = time.perf_counter() - start
        per_image = inference_s / len(batch)
        previous = self._seconds_per_image
        self._seconds_per_image = per_image if previous is None else 0.7 * previous + 0.3 * per_image
        self._metrics.batch_size.labels(self.name).observe(len(batch))
        for job, raw in zip(batch, raws, strict=True):
            queue_s = start - job.submitted
            self._metrics.stage_latency.labels(self.name, "queue").observe(queue_s)
            self._metrics.stage_latency.labels(self.name, "inference").observe(inference_s)
            if not job.future.done():
                job.future.set_result(
                    BatchResult(raw=raw, queue_s=queue_s, inference_s=inference_s,
                                batch_size=len(batch))
                )
