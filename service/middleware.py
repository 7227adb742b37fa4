"""ASGI middlewares: a request id on every request and response (which also turns an unexpected
error into a 500 answer without dropping the connection), and a request-body size cap."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .logs import current_request_id

log = logging.getLogger("graft.http")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Request ids need to be unique, not secret: a PRNG seeded from the OS once per process costs
# no system call per request (uuid4 reads /dev/urandom every time).
_ids = random.Random()


def new_request_id() -> str:
    return f"{_ids.getrandbits(128):032x}"


class RequestId:
    """Take X-Request-ID from the client when it is sane, else make one; echo it back. Also the
    error barrier: an unexpected exception becomes a JSON 500 without dropping the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", []):
            if k == b"x-request-id":
                candidate = v.decode("latin-1")
                if _SAFE_ID.match(candidate):
                    rid = candidate
                break
        rid = rid or new_request_id()
        scope["graft.request_id"] = rid
        current_request_id.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The error barrier: Starlette's catch-all handler answers 500 and then re-raises, and
            # under `bentoml serve` a raising app gets its connection torn down, so a keep-alive
            # client's next, innocent request on it was reset. Log, answer, return normally.
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # half an answer is out: only closing the connection can say it failed
                raise
            await send_with_id(internal_error(rid))
            await send_with_id({"type": "http.response.body", "body": _error_body(rid)})


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-stream; an HTTPException so FastAPI's body parsing re-raises it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {limit} byte limit (GRAFT_MAX_BODY_BYTES)")


class BodySizeLimit:
    """Refuse bodies over GRAFT_MAX_BODY_BYTES with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or int(os.environ.get("GRAFT_MAX_BODY_BYTES") or 20 * 1024 * 1024)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {"error": f"request body is larger than the {self.max_bytes} byte limit (GRAFT_MAX_BODY_BYTES)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)


def request_id(scope: dict[str, Any]) -> str:
    return str(scope.get("graft.request_id", ""))


def _error_body(rid: str) -> bytes:
    return json.dumps({"error": f"internal error (request id {rid}); the service is still up"}).encode()


def internal_error(rid: str) -> Message:
    return {
        "type": "http.response.start",
        "status": 500,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_error_body(rid))).encode())],
    }
