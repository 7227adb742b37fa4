"""The adaptive batcher: concurrent requests share runs, results go back to their callers."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching import SETTLE_TURNS, Batcher, QueueFull


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(1)
    yield ex
    ex.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_batches_and_keep_order(executor) -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def fn(items):
        gate.wait(5)  # hold the first run so the rest queue up behind it
        sizes.append(len(items))
        return [x * 10 for x in items]

    async def main():
        b = Batcher(fn, executor=executor, max_batch_size=8)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks), b

    results, b = run(main())
    assert results == [i * 10 for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) <= 8
    assert max(sizes) > 1, "concurrent requests should have been batched"
    assert b.stats.items == 20 and b.stats.batches == len(sizes)


def test_single_request_is_not_delayed(executor) -> None:
    async def main():
        b = Batcher(lambda xs: xs, executor=executor, max_batch_size=32)
        start = time.perf_counter()
        await b.submit(1)
        return time.perf_counter() - start

    assert run(main()) < 0.05


def test_max_latency_waits_for_company(executor) -> None:
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        return items

    async def main():
        b = Batcher(fn, executor=executor, max_batch_size=4, max_latency_ms=200)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 4)]
        await asyncio.gather(first, *rest)

    run(main())
    assert sizes == [4]


def test_a_failing_run_fails_only_its_batch(executor) -> None:
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    async def main():
        b = Batcher(fn, executor=executor, max_batch_size=1)
        with pytest.raises(ValueError, match="boom"):
            await b.submit("bad")
        return await b.submit("good")

    assert run(main()) == "good"


def test_queue_bound_refuses_new_items(executor) -> None:
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        return items

    async def main():
        b = Batcher(fn, executor=executor, max_batch_size=1, max_queue=2)
        running = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.02)  # item 0 is running, the queue is empty again
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(3)
        gate.set()
        return await asyncio.gather(running, *queued)

    assert run(main()) == [0, 1, 2]


def test_cancelled_requests_are_skipped(executor) -> None:
    seen: list[int] = []
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        seen.extend(items)
        return items

    async def main():
        b = Batcher(fn, executor=executor, max_batch_size=8)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.02)
        doomed = asyncio.create_task(b.submit(1))
        kept = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.set()
        return await asyncio.gather(first, kept)

    assert run(main()) == [0, 2]
    assert 1 not in seen


def test_drain_waits_for_queued_items_and_the_loop_exits_when_idle(executor) -> None:
    async def main():
        b = Batcher(lambda xs: [x + 1 for x in xs], executor=executor)
        tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await b.drain()
        assert all(t.done() for t in tasks)
        assert b._task is not None and b._task.done()  # no task lingers on an idle batcher
        late = await b.submit(41)  # and it restarts on demand
        return [t.result() for t in tasks] + [late]

    assert run(main()) == [1, 2, 3, 4, 5, 42]


class FakeClock:
    """Stands in for time.perf_counter in service.batching: a run "takes" what `fn` says it does."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_short_runs_move_to_the_event_loop_and_long_ones_stay_on_the_thread(executor, monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("service.batching.time.perf_counter", clock)
    per_item = {"fast": 0.002, "slow": 0.030}  # seconds per item; loop_run_ms is 10
    threads: dict[str, list[str]] = {"fast": [], "slow": []}
    sizes: list[int] = []

    def model(kind: str):
        def fn(items):
            threads[kind].append("loop" if threading.get_ident() == loop_thread else "executor")
            if kind == "fast":
                sizes.append(len(items))
            clock.now += per_item[kind] * len(items)
            return [x * 2 for x in items]

        return fn

    async def main():
        fast = Batcher(model("fast"), executor=executor, max_batch_size=32, loop_run_ms=10)
        slow = Batcher(model("slow"), executor=executor, max_batch_size=32, loop_run_ms=10)
        for b in (fast, slow):
            assert await b.submit(1) == 2  # unmeasured: the first run goes to the thread
        # Measured at 2 ms an item, 5 items fit in 10 ms: twelve requests queued together run
        # on the loop as 5 + 5 + 2.
        results = await asyncio.gather(*(fast.submit(i) for i in range(12)))
        assert results == [i * 2 for i in range(12)]
        assert await slow.submit(3) == 6
        return fast, slow

    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    fast, slow = run(main())
    assert threads["fast"] == ["executor", "loop", "loop", "loop"]
    assert sizes == [1, 5, 5, 2]
    assert threads["slow"] == ["executor", "executor"]
    assert (fast.stats.on_loop, slow.stats.on_loop) == (3, 0)
    assert fast.stats.items == 13 and slow.stats.items == 2


def test_loop_run_ms_0_keeps_every_run_on_the_thread(executor) -> None:
    async def main():
        b = Batcher(lambda xs: xs, executor=executor, loop_run_ms=0)
        for i in range(3):
            await b.submit(i)
        return b

    assert run(main()).stats.on_loop == 0


def test_requests_read_just_after_a_loop_batch_join_the_next_one(executor, monkeypatch) -> None:
    """A batch on the event loop holds it; the requests that arrived meanwhile are read and prepared
    over the next few turns. They form the next batch together instead of trickling in one by one,
    and a stream that keeps arriving turn after turn is cut after SETTLE_TURNS turns."""
    clock = FakeClock()
    monkeypatch.setattr("service.batching.time.perf_counter", clock)
    sizes: list[int] = []
    late: list[asyncio.Task[int]] = []

    async def arrive(i: int, turns: int) -> int:
        for _ in range(turns):  # read and prepared this many loop turns after the batch ends
            await asyncio.sleep(0)
        return await batcher[0].submit(i)

    def fn(items):
        sizes.append(len(items))
        clock.now += 0.001 * len(items)  # 1 ms an item: up to 10 fit in loop_run_ms
        if items == [100]:  # the trigger: requests arrive while it holds the loop
            late.extend(asyncio.get_running_loop().create_task(arrive(i, turns=i)) for i in range(1, 5))
        if items == [200]:  # a stream: one more request every turn, for longer than the settling
            late.extend(asyncio.get_running_loop().create_task(arrive(300 + i, turns=i)) for i in range(1, 20))
        return items

    batcher: list[Batcher] = []

    async def main():
        b = Batcher(fn, executor=executor, max_batch_size=32, loop_run_ms=10)
        batcher.append(b)
        await b.submit(0)  # unmeasured: runs on the thread, measures 1 ms an item
        assert await b.submit(100) == 100
        assert sorted(await asyncio.gather(*late)) == [1, 2, 3, 4]
        late.clear()
        await b.submit(200)
        await asyncio.gather(*late)

    run(main())
    assert sizes[:3] == [1, 1, 4], sizes  # the four latecomers in one batch
    stream = sizes[4:]
    assert sum(stream) == 19 and len(stream) > 1, sizes  # the stream was not waited for to its end
    assert stream[0] <= SETTLE_TURNS + 1 and stream[0] >= 4, sizes
