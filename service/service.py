"""The BentoML service: one instance per worker process, owning that worker's models.

BentoML runs the server (workers, /livez, /readyz, /metrics, /docs.json, `bentoml build`);
graft's routes live in a FastAPI app (service/app.py) mounted here, so that multipart parsing,
size limits and error bodies are under graft's control. Start it with
`bentoml serve service:Graft`.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .runtime import limit_malloc_arenas, serve_supervisor

limit_malloc_arenas()  # before the decode and ONNX Runtime threads exist

import bentoml  # noqa: E402
from starlette.responses import Response  # noqa: E402

from .bento_api import ROUTE_PREFIX, ClassifyInput, DetectInput, SentimentInput, bentoml_errors  # noqa: E402
from .config import Settings  # noqa: E402
from .middleware import BodySizeLimit, RequestId  # noqa: E402
from .runtime import disable_idle_tracing, tracing_disabled  # noqa: E402
from .schemas import ClassifyResponse, DetectResponse, SentimentResponse  # noqa: E402

# `bentoml serve`'s own process reads this class's configuration and starts the workers; it never
# serves a request. There the routes are not imported (service/runtime.py: serve_supervisor) and
# the class mounts a stand-in; every worker imports and mounts the real app.
SUPERVISOR = serve_supervisor()
if SUPERVISOR:

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        raise RuntimeError("graft's routes are served by the workers, not by `bentoml serve`'s own process")

    import atexit

    from .siblings import remove_board

    atexit.register(remove_board, os.getpid())  # the workers' shared board (service/siblings.py)

else:
    from models.checksums import ChecksumCache

    from . import tasks  # noqa: F401  (registers the task runners)
    from .app import InferenceRoutes, app, classify_image, detect_objects, score_texts
    from .balance import ConnectionBalance
    from .budget import MemoryBudget, budget_for_this_worker
    from .crashguard import CrashGuard
    from .fastpath import serve_inference_first
    from .logs import install_request_id_logging
    from .pool import ModelPool
    from .reload import Reloader, ReloadSignal, checksum_dir
    from .siblings import Siblings
    from .state import install

log = logging.getLogger("graft")

SETTINGS = Settings.from_env()
TRACING_OFF = disable_idle_tracing()
# What this worker shares with the server's other workers (service/siblings.py): None in the
# supervisor, with one worker, or outside `bentoml serve`.
BOARD = None if SUPERVISOR else Siblings.for_this_worker(SETTINGS.workers)


def process_age_s() -> float:
    """Seconds since this worker process started (from the kernel's process table; -1 if unknown)."""
    try:
        import psutil  # a BentoML dependency

        return time.time() - psutil.Process().create_time()
    except Exception:  # no psutil, or a platform without process start times
        return -1.0


@bentoml.service(
    name="graft",
    workers=SETTINGS.workers,
    traffic={"timeout": 60},
    # BentoML's access log: one line per request (with the request's trace id). GRAFT_ACCESS_LOG=0
    # turns it off where every request's line costs more than it tells (docs/BENCHMARKS.md).
    logging={"access": {"enabled": os.environ.get("GRAFT_ACCESS_LOG", "1") != "0"}},
)
@bentoml.asgi_app(app, path="/")
class Graft:
    def __init__(self) -> None:
        started = time.perf_counter()
        self.settings = SETTINGS
        # One inference thread per worker: ONNX Runtime's own pool (ort_threads) does the
        # parallel work, and a second concurrent run would only oversubscribe the CPU quota.
        self.infer_executor = ThreadPoolExecutor(1, thread_name_prefix="graft-infer")
        self.cpu_executor = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="graft-decode")
        # The memory budget is sized from what this worker holds once its models are loaded, so
        # it starts at a placeholder and is set right after the first scan.
        self.budget = MemoryBudget(1)
        state_dir = os.environ.get("GRAFT_STATE_DIR")
        checksums = checksum_dir(Path(state_dir) if state_dir else None)
        self.pool = ModelPool(
            self.settings,
            infer_executor=self.infer_executor,
            cpu_executor=self.cpu_executor,
            budget=self.budget,
            checksums=ChecksumCache(checksums),
            crash_guard=CrashGuard(checksums / "opening"),
            siblings=BOARD if self.settings.solo_threads > 1 else None,
        )
        self.pool.scan()
        sized = budget_for_this_worker(
            self.settings.request_memory_mb, self.settings.memory_limit_mb, self.settings.workers
        )
        self.budget.limit, self.budget.source = sized.limit, sized.source
        self.reloader = Reloader(
            self.pool,
            ReloadSignal(self.settings.registry, Path(state_dir) if state_dir else None),
            self.settings.reload_interval_s,
        )
        install(self.pool, self.reloader)
        install_request_id_logging()
        log.info(
            "graft worker ready: registry=%s models=%s ort_threads=%d memory budget=%.0f MB (%s) tracing=%s; "
            "models loaded and warmed up in %.2f s (%s), %.2f s after the process started",
            self.settings.registry,
            [f"{m.name}:{m.version}" for m in self.pool.served()],
            self.settings.ort_threads,
            self.budget.limit / 2**20,
            self.budget.source,
            "off (not configured)" if TRACING_OFF else "off (OTEL_SDK_DISABLED)" if tracing_disabled() else "on",
            time.perf_counter() - started,
            ", ".join(f"{step} {seconds:.2f} s" for step, seconds in self.pool.open_timings.items()),
            process_age_s(),
        )

    @bentoml.on_startup
    async def _start_watcher(self) -> None:
        self.reloader.start()
        if self.pool.siblings is not None:  # the lone-request sessions: after ready, off the loop
            threading.Thread(target=self._open_solo_sessions, name="graft-solo", daemon=True).start()
        # Everything imported and loaded so far lives as long as the worker: move it out of the
        # collector's reach, so that full collections (triggered by per-request garbage) stay
        # short instead of scanning every BentoML, pydantic and FastAPI object each time. No full
        # collection first: it found about a hundred unreachable objects here and took 0.1-0.2 s
        # of the worker's start.
        gc.freeze()

    def _open_solo_sessions(self) -> None:
        self.pool.open_solo_sessions()
        # They hold memory: size the decoding budget again from what the worker now holds.
        sized = budget_for_this_worker(
            self.settings.request_memory_mb, self.settings.memory_limit_mb, self.settings.workers
        )
        self.budget.limit, self.budget.source = sized.limit, sized.source

    @bentoml.on_shutdown
    async def _stop_watcher(self) -> None:
        await self.reloader.stop()

    def __is_ready__(self) -> bool:
        return self.pool.ready

    # ---- BentoML's own API, for bentoml.SyncHTTPClient / AsyncHTTPClient (service/bento_api.py) ----
    @bentoml.api(route=f"{ROUTE_PREFIX}/classify", input_spec=ClassifyInput, output_spec=ClassifyResponse)
    async def classify(self, image: bytes, top_k: int = 5, model: str | None = None) -> Response:
        """Classify one image: the top-k labels with their probabilities (as POST /classify)."""
        with bentoml_errors():
            return await classify_image(self.pool, image, {"top_k": top_k, "model": model})

    @bentoml.api(route=f"{ROUTE_PREFIX}/detect", input_spec=DetectInput, output_spec=DetectResponse)
    async def detect(
        self,
        image: bytes,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        model: str | None = None,
    ) -> Response:
        """Find objects in one image: labels, scores and boxes in its pixels (as POST /detect)."""
        opts = {"score_threshold": score_threshold, "max_detections": max_detections, "model": model}
        with bentoml_errors():
            return await detect_objects(self.pool, image, opts)

    @bentoml.api(route=f"{ROUTE_PREFIX}/sentiment", input_spec=SentimentInput, output_spec=SentimentResponse)
    async def sentiment(self, texts: list[str], model: str | None = None) -> Response:
        """Sentiment of each text: the top label and every label's probability (as POST /sentiment)."""
        with bentoml_errors():
            return await score_texts(self.pool, texts, model)


# Outermost first: every route, graft's and BentoML's, gets a request id and the error barrier,
# then the body size limit.
Graft.add_asgi_middleware(RequestId)
Graft.add_asgi_middleware(BodySizeLimit)
if not SUPERVISOR:
    # Outside all of that: the inference routes' short way through the stack (service/fastpath.py),
    # and outermost the connection balance between workers (service/balance.py).
    balance = BOARD is not None and SETTINGS.balance_connections
    outermost = functools.partial(ConnectionBalance, board=BOARD) if balance else None
    serve_inference_first(Graft, InferenceRoutes(app), tracing_off=tracing_disabled, outermost=outermost)
