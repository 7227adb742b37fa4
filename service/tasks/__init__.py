"""Task-specific serving logic; importing this package registers every task."""

from . import (
    image_classification,  # noqa: F401
    sentiment,  # noqa: F401
)
