"""Keep-alive connections spread over the workers: a worker serving more clients than its share
asks some of them to reconnect (service/balance.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service import balance
from service.balance import MAX_PAUSE_S, WINDOW_S, ConnectionBalance
from service.siblings import Siblings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(balance.time, "monotonic", c)
    return c


async def ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(worker: ConnectionBalance, clients: range) -> list[int]:
    """One request from each client (port); the ports whose answer said `Connection: close`."""
    closed = []

    async def one(port: int) -> None:
        headers: list = []

        async def send(message) -> None:
            if message["type"] == "http.response.start":
                headers.extend(message["headers"])

        scope = {"type": "http", "method": "GET", "path": "/livez", "client": ("127.0.0.1", port), "headers": []}
        await worker(scope, None, send)
        assert (b"content-type", b"text/plain") in headers  # the answer itself is untouched
        if (b"connection", b"close") in headers:
            closed.append(port)

    async def all_of_them() -> None:
        for port in clients:
            await one(port)

    asyncio.run(all_of_them())
    return closed


def test_a_worker_with_more_clients_than_its_sibling_moves_half_the_difference(tmp_path: Path, clock: Clock) -> None:
    busy = ConnectionBalance(ok, Siblings(tmp_path / "board", 0, 2))
    Siblings(tmp_path / "board", 1, 2)  # the other worker: it has served nobody
    assert serve(busy, range(40000, 40016)) == []  # counted at the first request: one client then
    clock.now += 0.1
    closed = serve(busy, range(40000, 40016))  # counted again: 16 clients against none
    assert len(closed) == 8 and len(set(closed)) == 8
    clock.now += 0.1
    assert serve(busy, range(40000, 40016)) == []  # one move per window: judged on what it did first


def test_workers_within_one_client_of_each_other_move_nobody(tmp_path: Path, clock: Clock) -> None:
    board = tmp_path / "board"
    first = ConnectionBalance(ok, Siblings(board, 0, 2))
    second = Siblings(board, 1, 2)
    second.publish_clients(4, clock.now)
    clock.now += 0.05
    assert serve(first, range(41000, 41005)) == []
    clock.now += 0.1
    assert serve(first, range(41000, 41005)) == []  # 5 against 4


def test_a_move_that_did_not_help_doubles_the_wait(tmp_path: Path, clock: Clock) -> None:
    """The other worker never gains (stuck, or every client came back here): moves get rarer."""
    busy = ConnectionBalance(ok, Siblings(tmp_path / "board", 0, 2))
    Siblings(tmp_path / "board", 1, 2)
    moves_at: list[float] = []
    for step in range(100):  # 10 s of 16 clients that always come back to this worker
        port = 42000 + 16 * step  # on new connections (new ports)
        serve(busy, range(port, port + 16))
        if busy.moved_at > float("-inf") and busy.moved_at not in moves_at:
            moves_at.append(busy.moved_at)
        clock.now += 0.1
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(moves_at)]
    assert gaps[:3] == [1.0, 2.0, 4.0], gaps


def test_a_move_that_helped_keeps_the_short_wait(tmp_path: Path, clock: Clock) -> None:
    board = tmp_path / "board"
    busy = ConnectionBalance(ok, Siblings(board, 0, 2))
    other = Siblings(board, 1, 2)
    start = clock.now
    serve(busy, range(43000, 43016))
    clock.now = start + 0.1
    assert len(serve(busy, range(43000, 43016))) == 8
    clock.now = start + 0.3
    other.publish_clients(6, clock.now)  # six of them reconnected to the other worker
    clock.now = start + 0.65  # the move is judged: the other worker gained
    assert serve(busy, range(43100, 43110)) == []
    assert busy.pause == WINDOW_S
    clock.now = start + 0.75
    assert len(serve(busy, range(43100, 43110))) == 2  # 10 against 6: two more, without a longer wait


def _workers(supervisor: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(supervisor).children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline())
    ]


def _connections(worker: psutil.Process, port: int) -> int:
    return sum(1 for c in worker.net_connections(kind="tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)


def test_connections_that_all_landed_on_one_worker_spread_to_the_other(registry: Path, image_artifact: Path) -> None:
    """On a real two-worker `bentoml serve`: one worker is stopped while 16 keep-alive clients
    connect, so the other accepts all of them. Once it runs again, half of them move to it, and
    no request fails: each client just opens a new connection when an answer says so."""
    from scripts.server_process import BentoServer

    with BentoServer(registry, env={"GRAFT_WORKERS": "2"}) as srv:
        workers = _workers(srv.proc.pid)
        assert len(workers) == 2
        first, second = workers
        stop, failures, answers = threading.Event(), [], []

        def client() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    try:
                        answers.append(c.get(srv.url + "/livez").status_code)
                    except httpx.HTTPError as e:
                        failures.append(repr(e))

        os.kill(second.pid, signal.SIGSTOP)
        threads = [threading.Thread(target=client) for _ in range(16)]
        try:
            for t in threads:
                t.start()
            # The running worker takes every connection. It also tries to move some (its stopped
            # sibling counts as idle), and they come straight back to it: count until all 16 are
            # seen at one instant rather than asserting on a second count taken mid-move.
            deadline, landed = time.monotonic() + 30, 0
            while landed < 16 and time.monotonic() < deadline:
                landed = _connections(first, srv.port)
                time.sleep(0.05)
            assert landed == 16  # all on one worker
        finally:
            os.kill(second.pid, signal.SIGCONT)
        try:
            # Its failed moves while the sibling was stopped doubled its wait between moves (up to
            # MAX_PAUSE_S), so on a slow machine the next move may be that far away.
            deadline, counts = time.monotonic() + MAX_PAUSE_S + 15, (16, 0)
            while time.monotonic() < deadline:
                counts = (_connections(first, srv.port), _connections(second, srv.port))
                if abs(counts[0] - counts[1]) <= 2 and sum(counts) == 16:
                    break
                time.sleep(0.1)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert abs(counts[0] - counts[1]) <= 2, counts
        assert failures == [] and set(answers) == {200}, (failures[:3], set(answers))
