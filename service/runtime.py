"""Worker-process tuning for the server (malloc arenas, tracing); sessions come from models.runtime."""

from __future__ import annotations

import logging
import os

from models.runtime import create_session, session_options  # noqa: F401 (re-exported)

log = logging.getLogger("graft.runtime")


def limit_malloc_arenas() -> int | None:
    """Cap glibc's malloc arenas (GRAFT_MALLOC_ARENA_MAX, default 2; 0 leaves glibc's default).

    glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core;
    decode threads that each hold a few decoded images and ONNX Runtime's pool then keep many
    half-empty arenas resident, and a worker's RSS climbs under load without any leak. Two
    arenas keep RSS flat at no measurable cost here (docs/BENCHMARKS.md). Equivalent to
    MALLOC_ARENA_MAX, which the environment can still set (it then wins).
    """
    import ctypes
    import sys

    raw = os.environ.get("GRAFT_MALLOC_ARENA_MAX", "2")
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ or not raw.isdigit() or raw == "0":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return None
    m_arena_max = -8  # from <malloc.h>
    return int(raw) if libc.mallopt(m_arena_max, int(raw)) == 1 else None


def disable_idle_tracing() -> bool:
    """Turn the OpenTelemetry SDK off in this worker when no traces would be collected.

    BentoML wraps every request in OpenTelemetry's ASGI middleware, which opens a server span
    and one span per body chunk received and per message sent (five or more per upload), even
    at BentoML's default sample rate of 0 with no exporter, where every span is dropped. That
    cost ~1 ms of event-loop time per /classify request here (docs/BENCHMARKS.md). When tracing
    is configured (an exporter and a sample rate above 0 in BentoML's configuration), or
    GRAFT_TRACING=1, nothing changes; GRAFT_TRACING=0 forces it off. Must run before BentoML
    builds its ASGI app (the tracer provider reads OTEL_SDK_DISABLED when it is created).
    Returns True when tracing was turned off.
    """
    choice = os.environ.get("GRAFT_TRACING", "").strip().lower()
    if choice in ("1", "true", "on") or "OTEL_SDK_DISABLED" in os.environ:
        return False
    if choice not in ("0", "false", "off"):
        try:
            from bentoml._internal.configuration.containers import BentoMLContainer

            exporter = BentoMLContainer.config.tracing.exporter_type.get()
            rate = BentoMLContainer.config.tracing.sample_rate.get()
        except Exception:  # a BentoML whose config layout we do not know: leave tracing alone
            return False
        if exporter and rate:
            return False
    os.environ["OTEL_SDK_DISABLED"] = "true"
    return True


def tracing_disabled() -> bool:
    """Whether the OpenTelemetry SDK is off in this process: by `disable_idle_tracing` or by the
    operator's own OTEL_SDK_DISABLED (the one setting the SDK reads)."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def serve_supervisor(argv: list[str] | None = None) -> bool:
    """Whether this process is `bentoml serve` itself rather than one of its workers.

    `bentoml serve service:Graft` imports the service in its own process only to read the class's
    configuration (name, workers, environment) before it starts the workers, which import it
    again and serve every request. That first import delays every start, and graft's worker code
    (FastAPI, ONNX Runtime, numpy, PIL, the tokenizer, graft's routes and models) is most of it:
    about 0.6 s on the 2-core reference machine, more than the whole of bare BentoML's import.
    service/service.py imports only the declarations there. Decided from the command line
    (`bentoml serve ...` or `python -m bentoml serve ...`); anything else (a worker, `bentoml
    build`, a test, a script) imports everything. GRAFT_LEAN_SUPERVISOR=0 turns it off.
    """
    import sys
    from pathlib import Path

    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] != "serve" or os.environ.get("GRAFT_LEAN_SUPERVISOR", "1").strip() == "0":
        return False
    prog = Path(argv[0])
    return prog.name == "bentoml" or (prog.name == "__main__.py" and prog.parent.name == "bentoml")
