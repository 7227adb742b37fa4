"""The inference routes' short way through BentoML's ASGI stack (service/fastpath.py).

Unit tests build the chain from hand-made stacks; the integration test checks, on a real
`bentoml serve`, that the short way is on and that what operators read from the full stack
(/metrics, the access log, request ids, the body limit, error answers) is still there."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from service.fastpath import FastPath, Timeout, short_chain


class Layer:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        scope.setdefault("seen", []).append(type(self).__name__)
        await self.app(scope, receive, send)


class ServerErrorMiddleware(Layer):
    pass


class RunnerTrafficMetricsMiddleware(Layer):
    def __init__(self, app) -> None:
        super().__init__(app)
        self._is_setup = False
        self.setups = 0

    def _setup(self) -> None:
        self.setups += 1
        self._is_setup = True


class OpenTelemetryMiddleware(Layer):
    pass


class TimeoutMiddleware(Layer):
    def __init__(self, app, timeout: float = 60.0) -> None:
        super().__init__(app)
        self.timeout = timeout


class RequestId(Layer):
    pass


class ContextMiddleware(Layer):
    pass


class ExceptionMiddleware(Layer):
    pass


class Mystery(Layer):
    pass


def routes_app(answer: dict):
    async def app(scope, receive, send) -> None:
        answer["seen"] = list(scope.get("seen", []))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def stack(*classes):
    node = ExceptionMiddleware(None)
    for cls in reversed(classes):
        node = cls(node)
    return node


def run(app, scope=None) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope or {"type": "http", "method": "POST", "path": "/classify"}, receive, send))
    return sent


def test_the_chain_keeps_what_serves_the_routes_and_skips_the_rest() -> None:
    full = stack(
        ServerErrorMiddleware,
        RunnerTrafficMetricsMiddleware,
        OpenTelemetryMiddleware,
        TimeoutMiddleware,
        RequestId,
        ContextMiddleware,
    )
    answer: dict = {}
    chain, why = short_chain(full, routes_app(answer), tracing_off=True)
    assert chain is not None, why
    sent = run(chain)
    assert sent[0]["status"] == 200
    assert answer["seen"] == ["RunnerTrafficMetricsMiddleware", "RequestId"]
    metrics = full.app
    assert metrics.setups == 1, "metrics must be registered once, in the original, before it is copied"
    assert isinstance(chain, RunnerTrafficMetricsMiddleware) and chain is not metrics


def test_tracing_on_or_an_unknown_layer_turns_the_short_way_off() -> None:
    full = stack(ServerErrorMiddleware, OpenTelemetryMiddleware, RequestId)
    chain, why = short_chain(full, routes_app({}), tracing_off=False)
    assert chain is None and "tracing" in why
    chain, why = short_chain(stack(ServerErrorMiddleware, Mystery, RequestId), routes_app({}), tracing_off=True)
    assert chain is None and "Mystery" in why


def test_fastpath_sends_only_the_inference_routes_the_short_way(monkeypatch) -> None:
    class Starlette:
        def __init__(self) -> None:
            self.middleware_stack = stack(ServerErrorMiddleware, RequestId)
            self.calls: list[str] = []

        async def __call__(self, scope, receive, send) -> None:
            self.calls.append(scope["path"])
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    class Routes:
        def __init__(self) -> None:
            self.endpoints = {("POST", "/classify"): None}

        async def __call__(self, scope, receive, send) -> None:
            await routes_app({})(scope, receive, send)

    inner = Starlette()
    app = FastPath(inner, Routes(), tracing_off=lambda: True)
    assert run(app)[0]["status"] == 200 and app.state == "on"
    assert run(app, {"type": "http", "method": "GET", "path": "/classify"})[0]["status"] == 404
    assert run(app, {"type": "http", "method": "POST", "path": "/models"})[0]["status"] == 404
    assert inner.calls == ["/classify", "/models"]
    monkeypatch.setenv("GRAFT_FASTPATH", "0")
    off = FastPath(Starlette(), Routes(), tracing_off=lambda: True)
    assert run(off)[0]["status"] == 404 and off.state == "off (GRAFT_FASTPATH=0)"


def test_timeout_answers_504_before_the_answer_starts_and_never_after() -> None:
    async def slow(scope, receive, send) -> None:
        await asyncio.sleep(5)

    started = time.monotonic()
    sent = run(Timeout(slow, 0.2))
    assert sent[0]["status"] == 504 and b"0.2 seconds" in sent[1]["body"]
    assert time.monotonic() - started < 3

    async def slow_body(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.4)  # past the timeout, but the answer has started
        await send({"type": "http.response.body", "body": b"done"})

    sent = run(Timeout(slow_body, 0.2))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"done"


def _request_total(metrics: str, endpoint: str, code: int) -> float:
    total = 0.0
    for line in metrics.splitlines():
        ours = f'endpoint="{endpoint}"' in line and f'http_response_code="{code}"' in line
        if line.startswith("bentoml_service_request_total{") and ours:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.integration
def test_a_real_server_takes_the_short_way_and_keeps_metrics_logs_and_limits(server, fashion_test) -> None:
    from PIL import Image

    from tests.conftest import encode

    url = server.url
    png = encode(Image.fromarray(fashion_test[0][0]))
    with httpx.Client(base_url=url, timeout=30) as client:
        before = client.get("/metrics").text
        n = 5
        for i in range(n):
            files = {"image": ("x.png", png, "image/png")}
            r = client.post("/classify", files=files, headers={"x-request-id": f"fp-{i}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == f"fp-{i}"
        bad = client.post("/classify", files={"image": ("x.png", b"not an image", "image/png")})
        assert bad.status_code in (400, 415) and "error" in bad.json()
        big = client.post("/classify", files={"image": ("big.png", b"\x00" * (21 * 2**20))}, timeout=60)
        assert big.status_code == 413 and "GRAFT_MAX_BODY_BYTES" in big.json()["error"]
        deadline = time.monotonic() + 10
        while True:  # the counters are in files the /metrics worker reads: allow a moment
            after = client.get("/metrics").text
            if _request_total(after, "/classify", 200) - _request_total(before, "/classify", 200) >= n:
                break
            assert time.monotonic() < deadline, "the /classify requests did not reach /metrics"
            time.sleep(0.2)
        assert _request_total(after, "/classify", 400) + _request_total(after, "/classify", 415) >= 1
    log = server.log_path.read_text(errors="replace")
    assert re.search(r"short way through the ASGI stack: on", log), log[-3000:]
    line = r"method=POST,path=/classify,.*status=200.*request_id=fp-0"
    assert re.search(line, log), "no access-log line for /classify with its request id"


@pytest.mark.integration
def test_a_second_server_on_the_host_leaves_the_first_ones_metrics_alone(server, registry) -> None:
    """Every `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts; the
    test and benchmark servers each get their own home (scripts/server_process.py), as the
    deployment notes ask of operators (docs/DEPLOY.md)."""
    from scripts.server_process import BentoServer

    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/sentiment", json={"texts": ["fine"]}).raise_for_status()
        before = _request_total(client.get("/metrics").text, "/sentiment", 200)
        assert before >= 1
        with BentoServer(registry):
            after = _request_total(client.get("/metrics").text, "/sentiment", 200)
        assert after >= before, f"/sentiment count fell from {before} to {after} when a second server started"
