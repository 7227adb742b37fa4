"""graft's serving runtime (BentoML + ONNX Runtime, no torch). `bentoml serve service:Graft`."""

from .service import Graft

__all__ = ["Graft"]
