"""Adaptive batching: concurrent single-item requests share one ONNX Runtime run.

While the model is idle, a request is dispatched at once (optionally after waiting up to
`max_latency_ms` for company). While a batch runs, new requests queue; when it finishes, the
queue (up to `max_batch_size`) becomes the next batch. Batch size therefore follows load with
no tuning: 1 at low concurrency (no added latency), large under pressure (throughput).

A request that finds itself alone in its worker (`Occupancy`) does not need any of this: the
model's task code prepares and runs it right on the event loop (service/served.py), which
saves the four thread hand-offs (loop -> decode thread -> loop -> inference thread -> loop)
that cost a lone request more than its ONNX run on a busy machine.

Why not BentoML's own `batchable=True` dispatcher: it takes exactly one list-typed argument,
so preprocessing and per-request options (top_k, thresholds, model) cannot ride along; it
cancels queued requests whose predicted latency exceeds max_latency (clients see errors under
load); and it polls every millisecond. This batcher is event-driven, never drops an admitted
request, and refuses new ones only when its queue bound is reached (HTTP 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The batcher's queue is at its bound; the caller should answer 503 and retry later."""


class Occupancy:
    """How many model requests this worker process is serving right now (all models together).

    `async with occupancy.enter() as alone:` counts the request in for the duration of the block;
    `alone` is true when no other model request is in flight in this worker. The count is taken
    after one turn of the event loop, so that requests whose bytes arrived together (while the
    loop was busy) have all registered before any of them decides: they then see each other and
    go through the batcher together instead of running one by one.
    """

    def __init__(self) -> None:
        self.count = 0

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[bool]:
        self.count += 1
        try:
            await asyncio.sleep(0)
            alone = self.count == 1
            yield alone
        finally:
            self.count -= 1


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    max_seen: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)
    inline: int = 0  # runs of a lone request on the caller's thread (`Batcher.run_now`)

    def record(self, n: int, seconds: float, *, inline: bool = False) -> None:
        self.inline += inline
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
        self._arrived: asyncio.Event | None = None
        # The dispatch loop runs only while there is work and exits when the queue is empty, so
        # a retired model (after a hot swap) holds no task and is freed once its last request ends.
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def run_now(self, item: T) -> R:
        """Run one item on the calling thread, past the queue: for a request alone in its worker
        (see `Occupancy`), where there is nobody to batch with. Same `fn`, same answer."""
        start = time.perf_counter()
        try:
            (result,) = self._fn([item])
        finally:
            self.stats.record(1, time.perf_counter() - start, inline=True)
        return result

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{self.name}: {len(self._queue)} requests already queued")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._run(), name=f"{self.name}-loop")
        elif self._arrived is not None:
            self._arrived.set()
        return await fut

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, fut = self._queue.popleft()
            if not fut.done():  # skip requests whose client went away
                batch.append((item, fut))
        return batch

    async def _gather_company(self) -> None:
        """Wait up to max_latency for the batch to fill (only when configured)."""
        assert self._arrived is not None
        deadline = time.monotonic() + self.max_latency_s
        while len(self._queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except TimeoutError:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_latency_s and len(self._queue) < self.max_batch_size:
                await self._gather_company()
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

    async def drain(self) -> None:
        """Wait until every queued item has been answered."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
