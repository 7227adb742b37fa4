"""Named errors shared by training, export and serving."""

from __future__ import annotations


class GraftError(Exception):
    """Base class for graft's own errors."""


class ArtifactError(GraftError):
    """An artifact folder is missing, malformed, or was changed after export."""


class InvalidInput(GraftError):
    """A request's payload cannot be turned into a model input. Maps to HTTP 4xx."""

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class ParityError(GraftError):
    """The exported ONNX model disagrees with the PyTorch model beyond tolerance."""
