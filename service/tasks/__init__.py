"""Task-specific serving logic; importing this package registers every task."""

from . import (
    detection,  # noqa: F401
    image_classification,  # noqa: F401
    sentiment,  # noqa: F401
)
