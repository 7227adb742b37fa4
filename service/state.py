"""Per-worker runtime state that the HTTP routes reach through FastAPI dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from models.errors import InvalidInput

from .pool import ModelPool
from .reload import Reloader

_state: dict[str, object] = {}


def install(pool: ModelPool, reloader: Reloader) -> None:
    """Called once per worker by the BentoML service after it loaded the registry."""
    _state["pool"] = pool
    _state["reloader"] = reloader


def current_pool() -> ModelPool:
    pool = _state.get("pool")
    if not isinstance(pool, ModelPool):
        raise InvalidInput("the service is starting; no models are loaded yet", status_code=503)
    return pool


async def get_pool() -> ModelPool:
    """The FastAPI dependency. async on purpose: FastAPI runs a plain `def` dependency in a
    worker thread, a thread hop on every request for a dict lookup."""
    return current_pool()


def get_reloader() -> Reloader:
    reloader = _state.get("reloader")
    if not isinstance(reloader, Reloader):
        raise InvalidInput("the service is starting", status_code=503)
    return reloader


Pool = Annotated[ModelPool, Depends(get_pool)]
