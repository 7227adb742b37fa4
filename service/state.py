"""Per-worker runtime state: the model pool and reloader that the HTTP routes and BentoML's API
methods reach. Free of any web framework, so that BentoML's API declarations (service/bento_api.py)
import it without FastAPI (service/runtime.py: `serve_supervisor`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.errors import InvalidInput

if TYPE_CHECKING:
    from .pool import ModelPool
    from .reload import Reloader

_state: dict[str, object] = {}


def install(pool: ModelPool, reloader: Reloader) -> None:
    """Called once per worker by the BentoML service after it loaded the registry."""
    _state["pool"] = pool
    _state["reloader"] = reloader


def current_pool() -> ModelPool:
    pool = _state.get("pool")
    if pool is None:
        raise InvalidInput("the service is starting; no models are loaded yet", status_code=503)
    return pool  # type: ignore[return-value]


async def get_pool() -> ModelPool:
    """The routes' FastAPI dependency (service/deps.py). async on purpose: FastAPI runs a plain
    `def` dependency in a worker thread, a thread hop on every request for a dict lookup."""
    return current_pool()


def get_reloader() -> Reloader:
    reloader = _state.get("reloader")
    if reloader is None:
        raise InvalidInput("the service is starting", status_code=503)
    return reloader  # type: ignore[return-value]
