"""Adaptive batching: concurrent single-item requests share one ONNX Runtime run.

While the model is idle, a request is dispatched at once (optionally after waiting up to
`max_latency_ms` for company). While a batch runs, new requests queue; when it finishes, the
queue (up to `max_batch_size`) becomes the next batch. Batch size therefore follows load with
no tuning: 1 at low concurrency (no added latency), large under pressure (throughput).

Why not BentoML's own `batchable=True` dispatcher: it takes exactly one list-typed argument,
so preprocessing and per-request options (top_k, thresholds, model) cannot ride along; it
cancels queued requests whose predicted latency exceeds max_latency (clients see errors under
load); and it polls every millisecond. This batcher is event-driven, never drops an admitted
request, and refuses new ones only when its queue bound is reached (HTTP 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The batcher's queue is at its bound; the caller should answer 503 and retry later."""


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    max_seen: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    def record(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.items += n
        self.max_seen = max(self.max_seen, n)
        self.busy_s += seconds
        self.sizes[n] = self.sizes.get(n, 0) + 1


class Batcher(Generic[T, R]):
    """Collects items from concurrent coroutines and runs `fn(list_of_items)` in `executor`.

    `fn` must return one result per item, in order. It runs on the executor's thread, so the
    event loop stays free to accept and decode other requests meanwhile.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R]],
        *,
        executor: Executor,
        max_batch_size: int = 32,
        max_latency_ms: float = 0.0,
        max_queue: int = 1024,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._fn = fn
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_latency_s = max(0.0, max_latency_ms) / 1000.0
        self.max_queue = max_queue
        self.name = name
        self.stats = BatchStats()
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{self.name}: {len(self._queue)} requests already queued")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name=f"{self.name}-loop")
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        assert self._wakeup is not None
        self._wakeup.set()
        return await fut

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, fut = self._queue.popleft()
            if not fut.done():  # skip requests whose client went away
                batch.append((item, fut))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_latency_s and len(self._queue) < self.max_batch_size:
                deadline = time.monotonic() + self.max_latency_s
                while len(self._queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=left)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            items = [item for item, _ in batch]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: batch of {len(items)} returned {len(results)} results")
            except Exception as e:  # one failed run fails its own batch, never the loop
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self.stats.record(len(items), time.perf_counter() - start)
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    async def close(self) -> None:
        """Stop accepting items; let queued ones finish."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
