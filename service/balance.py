"""Keep-alive connections spread over the server's workers.

`bentoml serve` gives its workers one shared listening socket: whichever worker accepts first takes
a connection, and keeps it for as long as the client keeps it open. A client that opens its pool
at once (a proxy's upstream keep-alive pool, a job with 16 threads, a load generator) often lands
on one worker entirely, and one CPU then does all the work while the other idles, for the life of
those connections. Measured on a 2-worker server: 16 connections opened together all went to one
worker in 2 of 6 tries, and that run served 522 requests per second against 865-912 for an even
split (libuv's UV_TCP_SINGLE_ACCEPT only made it rarer: 1 in 12).

Each worker counts the clients (address and port: one per connection) it served in the last
`WINDOW_S` and publishes the count on the workers' shared board (service/siblings.py). A worker
that serves at least two more clients than the least busy worker answers half the difference of
its next requests, one per client, with `Connection: close`. The answer is whole; the client opens
a new connection for its next request (a TCP handshake on the local network), and the shared
socket gives it to the worker that accepts first: most likely the less busy one, waiting in its
event loop while the busy one runs a batch. Counting only recent requests balances the connections
that carry load, not idle ones in a pool.

A move is judged on the counts published after it: the next one comes at least a window later, and
when a move did not help (the least busy worker did not gain: it is stuck, or the clients came
back here), the wait doubles, up to `MAX_PAUSE_S`, so a worker never churns its clients. Nothing is
refused or cut, and clients that do not keep connections alive are unaffected.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .siblings import Siblings

log = logging.getLogger("graft.balance")

WINDOW_S = 0.5  # a client counts while it sent a request this recently
RECOUNT_S = 0.1  # how often a serving worker counts its clients and publishes them
MAX_PAUSE_S = 30.0  # the longest wait between moves, after moves that did not help

CLOSE = (b"connection", b"close")


class ConnectionBalance:
    """Outermost ASGI app of a worker: counts clients, publishes the count, and asks clients to
    reconnect (`Connection: close` on a whole answer) while this worker serves more than its share."""

    def __init__(self, app: ASGIApp, board: Siblings) -> None:
        self.app = app
        self.board = board
        self.seen: dict[Any, float] = {}  # client (host, port) -> when it last sent a request
        self.next_count = 0.0
        self.to_close = 0  # clients still to ask to reconnect, from the last move
        self.moved_at = float("-inf")
        self.pause = WINDOW_S
        self.fewest_at_move = -1  # the least busy worker's clients when this worker last moved

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client") if scope["type"] == "http" else None
        if client is None:
            await self.app(scope, receive, send)
            return
        client = tuple(client)
        now = time.monotonic()
        self.seen[client] = now
        if now >= self.next_count:
            self.recount(now)
        if self.to_close:
            self.to_close -= 1
            del self.seen[client]  # on its way to another connection, perhaps another worker
            send = _closing(send)
        await self.app(scope, receive, send)

    def recount(self, now: float) -> None:
        """Forget clients quiet for a window, publish the count, and decide whether to move some."""
        self.next_count = now + RECOUNT_S
        cutoff = now - WINDOW_S
        self.seen = {c: t for c, t in self.seen.items() if t >= cutoff}
        mine = len(self.seen)
        self.board.publish_clients(mine, now)
        if now - self.moved_at < self.pause:
            return
        fewest = self.board.fewest_clients_elsewhere(cutoff)
        if self.fewest_at_move >= 0:  # judge the last move: did the least busy worker gain?
            self.pause = WINDOW_S if fewest > self.fewest_at_move else min(2 * self.pause, MAX_PAUSE_S)
            self.fewest_at_move = -1
            if now - self.moved_at < self.pause:
                return
        if mine - fewest >= 2:
            self.to_close = (mine - fewest) // 2
            self.moved_at, self.fewest_at_move = now, fewest
            log.debug("serving %d clients, another worker %d: asking %d to reconnect", mine, fewest, self.to_close)


def _closing(send: Send) -> Send:
    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        await send(message)

    return send_closing
