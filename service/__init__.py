"""graft's serving runtime (BentoML + ONNX Runtime, no torch). `bentoml serve service:Graft`.

Importing this package is cheap: the BentoML service class (and BentoML, FastAPI, Starlette
with it) loads only when `Graft` is asked for, so tools that need a helper from `service`
do not pay for the server. `bentoml serve service:Graft`
resolves it through the module's `__getattr__`.
"""

import os

# onnxruntime 1.32 writes a telemetry device id under ~/.cache unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__all__ = ["Graft"]


def __getattr__(name: str) -> object:
    if name == "Graft":
        from .service import Graft

        return Graft
    raise AttributeError(f"module 'service' has no attribute {name!r}")
