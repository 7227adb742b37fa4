"""The HTTP routes' FastAPI dependencies (service/app.py, service/v2.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from .pool import ModelPool
from .state import get_pool

Pool = Annotated[ModelPool, Depends(get_pool)]
