"""Task-specific serving logic; importing this package registers every task."""

from . import detection, image_classification  # noqa: F401
