"""graft's serving runtime (BentoML + ONNX Runtime, no torch). `bentoml serve service:Graft`."""

import os

# onnxruntime 1.32 writes a telemetry device id under ~/.cache unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .runtime import limit_malloc_arenas

limit_malloc_arenas()  # before the decode and ONNX Runtime threads exist

from .service import Graft  # noqa: E402

__all__ = ["Graft"]
