"""The inference routes' short way through BentoML's ASGI stack.

`bentoml serve` wraps every request in a dozen generic layers before graft's FastAPI app sees it:
Starlette's error middleware, metrics, OpenTelemetry, the access log, a timeout that starts a task
per request, graft's own request id and body limit, BentoML's request context, Starlette's
exception middleware and router, the mount, then FastAPI's own stack. For /classify on a small
image that was about 0.3 ms of event-loop time a request (docs/BENCHMARKS.md), as much as the
whole gap between graft and a hand-written server for a lone client.

`FastPath` sits outside all of them. A POST to /classify, /detect or /sentiment goes through a
chain built from the layers that do something for it, taken from the very stack BentoML built:
  - BentoML's metrics and access-log middlewares: the same objects (shallow copies pointing at
    the short chain), so /metrics and the log lines are exactly what the full stack gives;
  - a max-concurrency middleware, CORS, graft's RequestId and BodySizeLimit: likewise;
  - the traffic timeout: the same 504 answer, with a timer instead of a task per request;
  - then `InferenceRoutes`, the routes' one dispatch table (service/app.py).
Skipped, because they do nothing for these routes: Starlette's outer error middleware (RequestId
is the error barrier), OpenTelemetry while tracing is off (service/runtime.py turns the SDK off
when no trace would be collected), BentoML's request context (read only by its own API methods),
Starlette's routing and the mount. Every other route, and every request while tracing is on,
takes the full stack. A layer this module does not know turns the short way off (logged once),
so a BentoML upgrade can cost speed, never behaviour. `GRAFT_FASTPATH=0` turns it off.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("graft.http")

# What a layer of BentoML's stack is, by class name, for the inference routes.
KEEP = {  # shallow-copied into the short chain
    "RunnerTrafficMetricsMiddleware",
    "AccessLogMiddleware",
    "MaxConcurrencyMiddleware",
    "CORSMiddleware",
    "RequestId",
    "BodySizeLimit",
}
SKIP = {"ServerErrorMiddleware", "ContextMiddleware"}
TIMEOUT = "TimeoutMiddleware"
TRACING = "OpenTelemetryMiddleware"
END = "ExceptionMiddleware"  # the last middleware; routing follows


class Timeout:
    """BentoML's traffic timeout for the short chain: a request whose answer has not started after
    `timeout` seconds is cancelled and answered 504, as TimeoutMiddleware does, but with a timer
    on the request's own task rather than a second task per request."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        deadline = asyncio.timeout(self.timeout)

        async def send_started(message: Message) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)  # the answer is on its way: no timeout from here on
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, send_started)
        except TimeoutError:
            if started or not deadline.expired():  # the answer is out, or the app's own TimeoutError
                raise
            body = json.dumps({"error": f"Not able to process the request in {self.timeout} seconds"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 504,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})


def short_chain(stack: Any, routes: ASGIApp, *, tracing_off: bool) -> tuple[ASGIApp | None, str]:
    """The short chain for the inference routes from BentoML's built middleware stack (outermost
    first), ending in `routes`; or None and why not."""
    layers: list[Any] = []
    node = stack
    while node is not None and type(node).__name__ != END:
        name = type(node).__name__
        if name == TRACING and not tracing_off:
            return None, "tracing is configured"
        if name in KEEP or name == TIMEOUT:
            layers.append(node)
        elif name not in SKIP and name != TRACING:
            return None, f"unknown layer {name}"
        node = getattr(node, "app", None)
    if node is None:
        return None, "the end of the middleware stack was not found"
    chain = routes
    for layer in reversed(layers):
        if type(layer).__name__ == TIMEOUT:
            chain = Timeout(chain, float(layer.timeout))
            continue
        if hasattr(layer, "_is_setup") and not layer._is_setup:
            layer._setup()  # metrics: register them once, in the original, before copying
        twin = copy.copy(layer)
        twin.app = chain
        chain = twin
    return chain, "ok"


class FastPath:
    """Outermost ASGI app: the inference routes take the short chain once it is built (at the
    first HTTP request, when BentoML's stack exists); everything else goes to `app` unchanged."""

    def __init__(self, app: Any, routes: Any, *, tracing_off: Callable[[], bool]) -> None:
        self.app = app
        self.routes = routes  # InferenceRoutes: its `endpoints` decide what is an inference route
        self.tracing_off = tracing_off
        self.chain: ASGIApp | None = None
        self.state = "not built"  # "on", or why not

    def build(self) -> None:
        stack = getattr(self.app, "middleware_stack", None)
        if stack is None:
            return  # not built by Starlette yet: try again on the next request
        if os.environ.get("GRAFT_FASTPATH", "1").strip() == "0":
            self.chain, why = None, "GRAFT_FASTPATH=0"
        else:
            self.chain, why = self._short_chain(stack)
        self.state = "on" if self.chain is not None else f"off ({why})"
        log.info("inference routes' short way through the ASGI stack: %s", self.state)

    def _short_chain(self, stack: Any) -> tuple[ASGIApp | None, str]:
        try:
            return short_chain(stack, self.routes, tracing_off=self.tracing_off())
        except Exception as e:  # anything unexpected: the full stack, which always works
            return None, f"{type(e).__name__}: {e}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in self.routes.endpoints:
            if self.state == "not built":
                self.build()
            if self.chain is not None:
                await self.chain(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve_inference_first(
    service: Any,
    routes: Any,
    *,
    tracing_off: Callable[[], bool],
    outermost: Callable[[ASGIApp], ASGIApp] | None = None,
) -> None:
    """Make `service.to_asgi()` (what each BentoML worker serves) return its app behind FastPath,
    and that behind `outermost(app)` when given (service/balance.py).

    BentoML offers no hook outside its own middlewares, so the service object becomes an instance
    of a subclass that overrides `to_asgi` and nothing else."""
    base = type(service)

    class InferenceFirst(base):  # type: ignore[misc, valid-type]
        __slots__ = ()

        def to_asgi(self, is_main: bool = True) -> Any:
            asgi = FastPath(super().to_asgi(is_main), routes, tracing_off=tracing_off)
            return asgi if outermost is None else outermost(asgi)

    InferenceFirst.__name__ = InferenceFirst.__qualname__ = f"{base.__name__}InferenceFirst"
    service.__class__ = InferenceFirst
