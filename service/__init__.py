"""graft's serving runtime (BentoML + ONNX Runtime, no torch). `bentoml serve service:Graft`."""

import os

# onnxruntime 1.32 writes a telemetry device id under ~/.cache unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .service import Graft

__all__ = ["Graft"]
