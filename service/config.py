"""Service settings, read once from the environment. Every knob has a documented default."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from models.runtime import available_cpus, cpu_quota  # noqa: F401 (re-exported: service.config.available_cpus)
from models.versions import default_registry

MAX_AUTO_WORKERS = 4


def _int(name: str, default: int, lo: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not an integer") from e
    if value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}")
    return value


def workers_for(cpus: int) -> int:
    """The default worker count: one per CPU, at most MAX_AUTO_WORKERS.

    Measured on 2 CPUs (docs/BENCHMARKS.md): 2 workers with one ONNX Runtime thread each served
    /classify 36-76% and /sentiment 10-26% more requests per second at concurrency 4-64 than
    1 worker with two threads (/detect, whose time is mostly in ONNX Runtime: -13% to +32%,
    noise-level): a worker's event loop, decoding and postprocessing share one GIL, and a second
    process runs them side by side. Each worker holds every model (~430 MB RSS for the three
    default ones), hence the cap.
    """
    return max(1, min(cpus, MAX_AUTO_WORKERS))


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not a number") from e


@dataclass(frozen=True)
class BatchingConfig:
    """Adaptive batching for one model (see service.batching)."""

    max_batch_size: int = 32
    # How long a request may wait for others to join its batch when the model is idle.
    # 0 dispatches at once; while a batch runs, new requests queue and form the next one.
    max_latency_ms: float = 0.0
    max_queue: int = 1024
    # The longest a batch may be expected to take to run on the event loop instead of the inference
    # thread (service/batching.py); 0 runs every batch on the thread.
    loop_run_ms: float = 10.0


@dataclass(frozen=True)
class Settings:
    registry: Path
    ort_threads: int
    decode_threads: int
    workers: int
    providers: tuple[str, ...]
    batching_default: BatchingConfig
    batching_per_model: dict[str, BatchingConfig] = field(default_factory=dict)
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_texts: int = 64
    max_text_chars: int = 2000
    admin_token: str | None = None
    reload_interval_s: float = 0.0
    # Memory: the pod's limit (GRAFT_MEMORY_MB, else the cgroup's) sizes each worker's budget for
    # decoding images and parsing JSON (service/budget.py); GRAFT_REQUEST_MEMORY_MB sets it outright.
    memory_limit_mb: int | None = None
    request_memory_mb: int | None = None
    # A lone request (a batch of one while no worker has run a model for 50 ms) may run on a second
    # session with this many threads (service/siblings.py); 0 turns it off. Only for model files
    # of at most solo_max_mb: that session is a second copy of the model in memory.
    solo_threads: int = 0
    solo_max_mb: int = 64
    # With 2 or more workers, a worker serving at least two more clients than another asks some to
    # reconnect (`Connection: close`), so keep-alive connections spread over the workers
    # (service/balance.py).
    balance_connections: bool = True

    def batching(self, model_name: str) -> BatchingConfig:
        return self.batching_per_model.get(model_name, self.batching_default)

    @classmethod
    def from_env(cls) -> Settings:
        cpus = available_cpus()
        default_batching = BatchingConfig(
            max_batch_size=_int("GRAFT_MAX_BATCH_SIZE", 32, lo=1),
            max_latency_ms=_float("GRAFT_MAX_LATENCY_MS", 0.0),
            max_queue=_int("GRAFT_MAX_QUEUE", 1024, lo=1),
            loop_run_ms=_float("GRAFT_LOOP_RUN_MS", 10.0),
        )
        per_model: dict[str, BatchingConfig] = {}
        raw = os.environ.get("GRAFT_BATCHING")
        if raw:
            try:
                parsed = json.loads(raw)
                for name, cfg in parsed.items():
                    merged = {**default_batching.__dict__, **cfg}
                    per_model[name] = BatchingConfig(**merged)
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f'GRAFT_BATCHING must be JSON like {{"name": {{"max_batch_size": 16}}}}: {e}') from e
        raw_workers = os.environ.get("GRAFT_WORKERS", "").strip().lower()
        workers = workers_for(cpus) if raw_workers in ("", "auto") else _int("GRAFT_WORKERS", 1, lo=1)
        providers = tuple(
            p.strip() for p in os.environ.get("GRAFT_ORT_PROVIDERS", "CPUExecutionProvider").split(",") if p.strip()
        )
        token = os.environ.get("GRAFT_ADMIN_TOKEN") or None
        return cls(
            registry=default_registry(),
            # Each worker gets an equal share of the CPU quota for ONNX Runtime's intra-op pool.
            ort_threads=_int("GRAFT_ORT_THREADS", max(1, cpus // workers), lo=1),
            decode_threads=_int("GRAFT_DECODE_THREADS", max(2, cpus // workers), lo=1),
            workers=workers,
            providers=providers,
            batching_default=default_batching,
            batching_per_model=per_model,
            max_body_bytes=_int("GRAFT_MAX_BODY_BYTES", 20 * 1024 * 1024, lo=1024),
            max_image_pixels=_int("GRAFT_MAX_IMAGE_PIXELS", 40_000_000, lo=1),
            max_texts=_int("GRAFT_MAX_TEXTS", 64, lo=1),
            max_text_chars=_int("GRAFT_MAX_TEXT_CHARS", 2000, lo=1),
            admin_token=token,
            reload_interval_s=_float("GRAFT_RELOAD_INTERVAL", 0.0),
            memory_limit_mb=_int("GRAFT_MEMORY_MB", 0, lo=0) or None,
            request_memory_mb=_int("GRAFT_REQUEST_MEMORY_MB", 0, lo=0) or None,
            solo_threads=_int("GRAFT_SOLO_THREADS", cpus if workers > 1 else 0, lo=0),
            solo_max_mb=_int("GRAFT_SOLO_MAX_MB", 64, lo=0),
            balance_connections=_int("GRAFT_BALANCE_CONNECTIONS", 1, lo=0) != 0,
        )
