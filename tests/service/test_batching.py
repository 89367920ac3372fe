"""The batcher alone, with a fake predictor: grouping by padded shape, bounds, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from gnws.request.errors import NotReadyError, OverloadedError, RequestTimeoutError
from models import PreparedImage, RawDetections
from service.batching import Batcher
from service.metrics import Metrics


def _image(pad_shape: tuple[int, int], tag: float) -> PreparedImage:
    return PreparedImage(image_chw=torch.full((1,), tag), ori_shape=pad_shape, img_shape=pad_shape,
                         pad_shape=pad_shape, scale_factor=(1.0, 1.0))


@dataclass
class FakePredictor:
    """Records each forward pass; 'detects' one box whose score is the image's tag."""

    delay_s: float = 0.0
    calls: list[list[tuple[tuple[int, int], float]]] = field(default_factory=list)
    gate: threading.Event | None = None
    batched_forward: bool = True

    def infer(self, prepared: list[PreparedImage]) -> list[RawDetections]:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        self.calls.append([(p.pad_shape, float(p.image_chw[0])) for p in prepared])
        labels = torch.zeros(1, dtype=torch.long)
        return [RawDetections(boxes=torch.zeros(1, 4), scores=p.image_chw.clone(), labels=labels) for p in prepared]


def _batcher(executor: ThreadPoolExecutor, **kwargs: Any) -> Batcher:
    options = {"max_batch_size": 4, "max_delay_s": 0.05, "queue_size": 8} | kwargs
    return Batcher("fake", executor=executor, metrics=Metrics(), **options)


@pytest.fixture
def executor() -> Any:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def test_only_equal_padded_shapes_share_a_forward_pass(executor: ThreadPoolExecutor) -> None:
    predictor = FakePredictor(gate=threading.Event())
    a, b = (32, 64), (64, 32)

    async def run() -> list[Any]:
        batcher = _batcher(executor)
        batcher.start()
        # first job occupies the worker (gate closed) while the others queue up in mixed order
        first = asyncio.create_task(batcher.run(predictor, [_image(a, 0)], timeout_s=10))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        rest = [asyncio.create_task(batcher.run(predictor, [_image(shape, float(i))], timeout_s=10))  # type: ignore[arg-type]
                for i, shape in enumerate([b, a, b, a, a, a, a], start=1)]
        await asyncio.sleep(0.05)
        predictor.gate.set()  # type: ignore[union-attr]
        results = await asyncio.gather(first, *rest)
        await batcher.stop(1)
        return results

    results = asyncio.run(run())
    # every job got its own result back
    assert [float(r[0].raw.scores[0]) for r in results] == [0, 1, 2, 3, 4, 5, 6, 7]
    for call in predictor.calls:
        assert len({shape for shape, _ in call}) == 1, predictor.calls
        assert len(call) <= 4
    # after the first, the oldest waiting shape (b) goes next with its partner, then a's in batches of 4
    assert [[tag for _, tag in call] for call in predictor.calls] == [[0], [1, 3], [2, 4, 5, 6], [7]]
    assert results[1][0].batch_size == 2


def test_full_queue_is_refused_and_timeouts_give_places_back(executor: ThreadPoolExecutor) -> None:
    predictor = FakePredictor(gate=threading.Event())

    async def run() -> None:
        batcher = _batcher(executor, queue_size=2, max_delay_s=0)
        batcher.start()
        busy = asyncio.create_task(batcher.run(predictor, [_image((8, 8), 0)], timeout_s=10))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # now running, blocked on the gate
        waiting = [asyncio.create_task(batcher.run(predictor, [_image((8, 8), i)], timeout_s=0.3))  # type: ignore[arg-type]
                   for i in (1, 2)]
        await asyncio.sleep(0.05)
        assert batcher.depth == 2
        with pytest.raises(OverloadedError):
            await batcher.run(predictor, [_image((8, 8), 3)], timeout_s=1)  # type: ignore[arg-type]
        for task in waiting:
            with pytest.raises(RequestTimeoutError):
                await task
        assert batcher.depth == 0  # timed-out requests left the line at once
        predictor.gate.set()  # type: ignore[union-attr]
        await busy
        await batcher.stop(1)
        with pytest.raises(NotReadyError):
            await batcher.run(predictor, [_image((8, 8), 4)], timeout_s=1)  # type: ignore[arg-type]

    asyncio.run(run())
    assert [[tag for _, tag in call] for call in predictor.calls] == [[0]]  # timed-out ones never ran


def test_inference_errors_reach_the_request_and_the_worker_survives(executor: ThreadPoolExecutor) -> None:
    class Broken(FakePredictor):
        def infer(self, prepared: list[PreparedImage]) -> list[RawDetections]:
            raise RuntimeError("boom")

    async def run() -> None:
        batcher = _batcher(executor, max_delay_s=0)
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.run(Broken(), [_image((8, 8), 0)], timeout_s=5)  # type: ignore[arg-type]
        ok = await batcher.run(FakePredictor(), [_image((8, 8), 1)], timeout_s=5)  # type: ignore[arg-type]
        assert float(ok[0].raw.scores[0]) == 1
        await batcher.stop(1)

    asyncio.run(run())


def test_without_batched_forward_each_image_runs_alone_and_is_answered_at_once(executor: ThreadPoolExecutor) -> None:
    """A predictor that would run a batch image by image (the CPU default) gets one image per pass:
    the first image's answer does not wait for the forward passes of the others."""
    predictor = FakePredictor(delay_s=0.3, batched_forward=False)

    async def run() -> tuple[list[float], list[Any]]:
        batcher = _batcher(executor, max_delay_s=5.0)  # a delay that must not be waited for
        batcher.start()
        done_at: list[float] = []
        start = time.perf_counter()

        async def one(tag: float) -> Any:
            result = await batcher.run(predictor, [_image((8, 8), tag)], timeout_s=10)  # type: ignore[arg-type]
            done_at.append(time.perf_counter() - start)
            return result

        results = await asyncio.gather(*(one(float(i)) for i in range(3)))
        await batcher.stop(1)
        return done_at, results

    done_at, results = asyncio.run(run())
    assert [[tag for _, tag in call] for call in predictor.calls] == [[0], [1], [2]]
    assert [r[0].batch_size for r in results] == [1, 1, 1]
    # answered one pass apart (0.3 s each), not all together after the last pass or the 5 s delay
    assert done_at[0] < done_at[2] - 0.4, done_at


def test_refusals_estimate_when_the_queue_drains(executor: ThreadPoolExecutor) -> None:
    predictor = FakePredictor(delay_s=0.2, gate=threading.Event(), batched_forward=False)

    async def run() -> None:
        batcher = _batcher(executor, queue_size=2, max_delay_s=0)
        batcher.start()
        assert batcher.drain_estimate_s() is None  # nothing measured yet
        predictor.gate.set()  # type: ignore[union-attr]
        await batcher.run(predictor, [_image((8, 8), 0)], timeout_s=10)  # type: ignore[arg-type]
        predictor.gate.clear()  # type: ignore[union-attr]
        busy = [asyncio.create_task(batcher.run(predictor, [_image((8, 8), 1)], timeout_s=10))]  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # running, blocked on the gate
        busy += [asyncio.create_task(batcher.run(predictor, [_image((8, 8), i)], timeout_s=10))  # type: ignore[arg-type]
                 for i in (2, 3)]
        await asyncio.sleep(0.05)  # both waiting: the line is full
        with pytest.raises(OverloadedError) as refused:
            await batcher.run(predictor, [_image((8, 8), 4)], timeout_s=1)  # type: ignore[arg-type]
        # three images ahead at about 0.2 s each
        assert refused.value.retry_after_s is not None
        assert 0.5 <= refused.value.retry_after_s <= 1.5, refused.value.retry_after_s
        predictor.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(*busy)
        await batcher.stop(1)

    asyncio.run(run())


def test_stop_answers_the_running_batch_too(executor: ThreadPoolExecutor) -> None:
    predictor = FakePredictor(gate=threading.Event())

    async def run() -> None:
        batcher = _batcher(executor, max_delay_s=0)
        batcher.start()
        running = asyncio.create_task(batcher.run(predictor, [_image((8, 8), 0)], timeout_s=30))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # blocked in its forward pass
        await batcher.stop(0.2)
        with pytest.raises(NotReadyError):
            await asyncio.wait_for(running, 5)  # answered at shutdown, not left to its 30 s timeout
        predictor.gate.set()  # type: ignore[union-attr]

    asyncio.run(run())
